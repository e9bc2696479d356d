"""Images and videos in engine requests (GLM-4.xV models): what a sequence carries and how a step uses it.

A request's prompt ids already hold the expanded placeholders (`glm4.media.prompt`); its media come as the model's
inputs (pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw). `MultimodalPrompt.build` splits them
into `MediaItem`s, one per image or video, each knowing the prompt indices its embeddings go to and a content key
(sha256 of its pixels and grid), and computes the prompt's 3-D M-RoPE positions and rope delta once.

In a step (`glm4.engine.model_runner`): every item with a placeholder in the scheduled chunk and no embeddings yet is
encoded, the step's items batched across requests into as few tower calls as the encoder budget allows
(`encoder_batches`: summed `model.encoder_bytes` estimates within `max_encoder_bytes`; one item over the budget is
refused when its request is added, so a big image errors before it can run the machine out of memory); the chunk's placeholder rows of
the token embeddings are replaced by the matching rows of the item's output, so a chunk boundary may fall anywhere
inside an image; an item's embeddings are dropped once the prefill has passed its last placeholder. Positions:
prompt tokens from the table, later tokens at index + rope delta (all three axes).

Prefix caching: a block's key is its token ids plus the content keys of the items with placeholders inside it
(`Sequence.block_key`); as block hashes chain, every later block depends on the images before it too. Same image and
text: shared blocks; a different image behind the same placeholder tokens: different keys from its first block on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

IMAGE, VIDEO = 1, 2  # token types (glm4.models.glm4v)


@dataclass
class MediaItem:
    kind: int  # IMAGE or VIDEO
    pixel_values: torch.Tensor  # [patches, C*T*P*P], CPU
    grid_thw: tuple[int, int, int]
    slots: torch.Tensor  # [n] prompt indices of its placeholder tokens, ascending; n = its output rows
    key: int  # content hash of pixels + grid
    encoder_bytes: int = 0  # the tower's estimated peak activations for this item (model.encoder_bytes)
    embeds: torch.Tensor | None = None  # the tower's output while the prefill still needs it


def content_key(pixels: torch.Tensor, grid: tuple[int, int, int]) -> int:
    h = hashlib.sha256(np.asarray(grid, dtype=np.int64).tobytes())
    h.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little")


def _as_tensor(x) -> torch.Tensor | None:
    if x is None:
        return None
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


class MultimodalPrompt:
    """The media of one prompt: items in prompt order, positions [P, 3] of the prompt tokens, rope delta."""

    INPUTS = frozenset({"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"})

    def __init__(self, items: list[MediaItem], positions: torch.Tensor, rope_delta: int):
        self.items, self.positions, self.rope_delta = items, positions, rope_delta
        self.num_prompt_tokens = positions.shape[0]

    @classmethod
    def build(cls, model, ids: list[int], pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, max_encoder_bytes: int | None = None) -> MultimodalPrompt:
        """ValueError (one line) when the prompt's placeholders do not match the media, or when one item's
        estimated encoder activations (`model.encoder_bytes`) are over `max_encoder_bytes`."""
        if not hasattr(model, "rope_index"):
            raise ValueError(f"{model.config.model_type} takes no images or videos")
        ids_t = torch.tensor([ids], dtype=torch.long)
        types = model.token_types(ids_t)[0]
        items: list[MediaItem] = []
        for kind, pixels, grids, name in ((IMAGE, pixel_values, image_grid_thw, "image"),
                                          (VIDEO, pixel_values_videos, video_grid_thw, "video")):
            pixels, grids = _as_tensor(pixels), _as_tensor(grids)
            if (pixels is None) != (grids is None):
                raise ValueError(f"{name} pixels and {name}_grid_thw come together")
            slots = (types == kind).nonzero().flatten()
            if pixels is None:
                if len(slots):
                    raise ValueError(f"the prompt has {len(slots)} {name} placeholder tokens but no {name} was given")
                continue
            grid_list = [tuple(int(v) for v in g) for g in grids.tolist()]
            rows, outs = (list(x) for x in zip(*(model.media_layout(g) for g in grid_list)))
            if sum(rows) != pixels.shape[0]:
                raise ValueError(f"{name} pixel rows {pixels.shape[0]} do not match the grids ({sum(rows)})")
            if sum(outs) != len(slots):
                raise ValueError(f"the prompt has {len(slots)} {name} placeholder tokens but the {name} grids give "
                                 f"{sum(outs)}")
            for px, g, sl in zip(pixels.split(rows), grid_list, slots.split(outs)):
                need = model.encoder_bytes(g)
                if max_encoder_bytes is not None and need > max_encoder_bytes:
                    raise ValueError(f"an {name} of grid {g} ({len(sl)} tokens) needs about {need / 2**20:.0f} MB of "
                                     f"vision-encoder activations, over the limit of {max_encoder_bytes / 2**20:.0f} MB "
                                     f"(--max-encoder-mb); send a smaller {name}")
                items.append(MediaItem(kind, px, g, sl, content_key(px, g), need))
        items.sort(key=lambda it: int(it.slots[0]))
        positions, deltas = model.rope_index(ids_t, image_grid_thw=_as_tensor(image_grid_thw),
                                             video_grid_thw=_as_tensor(video_grid_thw), mm_token_type_ids=types[None])
        return cls(items, positions[0], int(deltas[0]))

    def keys_in(self, lo: int, hi: int) -> tuple[int, ...]:
        """Content keys of the items with a placeholder in prompt indices [lo, hi)."""
        return tuple(it.key for it in self.items if bool(((it.slots >= lo) & (it.slots < hi)).any()))

    def positions_for(self, start: int, n: int) -> torch.Tensor:
        """[n, 3] positions of sequence indices start..start+n-1 (prompt: the table; after it: index + delta)."""
        P = self.num_prompt_tokens
        parts = []
        if start < P:
            parts.append(self.positions[start:min(start + n, P)])
        if start + n > P:
            idx = torch.arange(max(start, P), start + n) + self.rope_delta
            parts.append(idx[:, None].expand(-1, 3))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def mrope_positions(spans) -> torch.Tensor:
    """spans: (seq, start, n) of a step -> [1, N, 3] (a text-only sequence: its index on all three axes)."""
    rows = []
    for seq, c, n in spans:
        if seq.mm is not None:
            rows.append(seq.mm.positions_for(c, n))
        else:
            rows.append(torch.arange(c, c + n)[:, None].expand(-1, 3))
    return torch.cat(rows)[None]


def encoder_batches(items: list[MediaItem], max_bytes: int | None) -> list[list[MediaItem]]:
    """Items in order, grouped into tower calls whose summed `encoder_bytes` stay within `max_bytes` (an item over
    it alone was refused when its request came in; None: one call for all)."""
    if max_bytes is None:
        return [items] if items else []
    batches, cur, used = [], [], 0
    for it in items:
        if cur and used + it.encoder_bytes > max_bytes:
            batches.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += it.encoder_bytes
    return batches + [cur] if cur else batches


def multimodal_embeddings(model, input_ids: torch.Tensor, spans, max_encoder_bytes: int | None = None) -> torch.Tensor:
    """Token embeddings [1, N, H] of a step with the media rows placed (encoding what is missing, as few tower calls
    as the encoder budget allows)."""
    h = model.get_input_embeddings()(input_ids)
    todo, seen = [], set()
    for seq, c, n in spans:
        for it in seq.mm.items if seq.mm is not None else ():
            if it.embeds is None and id(it) not in seen and bool(((it.slots >= c) & (it.slots < c + n)).any()):
                todo.append(it)
                seen.add(id(it))
    dev = h.device
    for batch in encoder_batches(todo, max_encoder_bytes):
        feats = model.image_features(torch.cat([it.pixel_values for it in batch]).to(dev), [it.grid_thw for it in batch])
        for it, f in zip(batch, feats.split([len(it.slots) for it in batch])):
            it.embeds = f
    start = 0
    for seq, c, n in spans:
        for it in seq.mm.items if seq.mm is not None else ():
            inside = (it.slots >= c) & (it.slots < c + n)
            if bool(inside.any()):
                h[0, start + it.slots[inside].to(h.device) - c] = it.embeds[inside.to(it.embeds.device)].to(h.dtype)
            if c + n > int(it.slots[-1]):
                it.embeds = None  # the prefill is past this item
        start += n
    return h
