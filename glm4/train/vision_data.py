"""Vision SFT data: GLM-4V fine-tuning jsonl with image paths -> samples, and the task that trains on them.

A record is GLM-4's fine-tuning conversation with pictures on user turns, as GLM-4's `finetune_vision.py` reads it:

    {"messages": [{"role": "user", "content": "what color is the shape?", "image": "images/12.png"},
                  {"role": "assistant", "content": "red"}, {"role": "user", "content": "..."}, ...]}

`image` is one path or a list (relative paths are read from the jsonl's folder); GLM-4V-9B's data puts it on the
first user turn only, any user turn may carry one here. Content may also be a list of parts,
`{"type": "image", "image": path}` / `{"type": "text", "text": ...}` (the Python API's shape). A message's `image`
goes before its text, as GLM-4V's template renders it.

Encoding: the chat format renders each picture as `<|begin_of_image|><|image|><|end_of_image|>`; the single
`<|image|>` becomes one token per tower output (t*h*w/4 of the picture's grid, from its size alone) and is never a
target. Labels follow the text SFT (glm4/train/data.py: assistant tokens and the token ending each assistant turn).
Positions are the 3-D M-RoPE table [T, 3] of the model (glm4.models.glm4v.rope_index). Pixels are read when a batch
is built (`VisionTask.loss`): a sample holds image paths, not 64 x 1176 floats per picture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm4.train.data import DataError, NothingToTrain, encode_records, epoch_index, sft_labels, sft_sample
from glm4.train.loop import LMTask
from glm4.train.objectives import IGNORE


def vision_messages(record: dict, base_dir: Path) -> tuple[list[dict], list[Path]]:
    """A record -> (messages with `{"type": "image"}` parts for the chat format, image paths in prompt order)."""
    from glm4.train.data import normalize_messages

    messages, _ = normalize_messages(record)
    out, paths = [], []
    for i, m in enumerate(messages):
        m = dict(m)
        images = m.pop("image", None)
        if images is None and not isinstance(m.get("content"), list):
            out.append(m)
            continue
        if m["role"] != "user":
            raise DataError(f"message {i}: only user messages may carry images")
        parts: list[dict] = []
        for src in [images] if isinstance(images, str) else list(images or []):
            if not isinstance(src, str) or not src:
                raise DataError(f"message {i}: 'image' must be a path or a list of paths")
            paths.append(_resolve(src, base_dir))
            parts.append({"type": "image"})
        content = m.get("content")
        for p in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
            if isinstance(p, dict) and p.get("type") == "image":
                if not isinstance(p.get("image"), str):
                    raise DataError(f"message {i}: an image part needs 'image': a path")
                paths.append(_resolve(p["image"], base_dir))
                parts.append({"type": "image"})
            elif isinstance(p, dict) and p.get("type") == "text":
                parts.append({"type": "text", "text": str(p.get("text", ""))})
            else:
                raise DataError(f"message {i}: content parts must be text or image")
        m["content"] = parts
        out.append(m)
    return out, paths


def _resolve(src: str, base_dir: Path) -> Path:
    p = Path(src)
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    return p


class ImageCache:
    """Decoded pictures by path (RGB PIL images: small next to their pixel rows), and their sizes."""

    def __init__(self):
        self.images: dict[Path, object] = {}

    def get(self, path: Path):
        from glm4.media.image import MediaError, load_image

        if path not in self.images:
            try:
                self.images[path] = load_image(str(path))
            except MediaError as e:
                raise DataError(f"{path}: {e}") from e
        return self.images[path]


def encode_vision_conversation(record: dict, tok, fmt, policy, cache: ImageCache, base_dir: Path,
                               max_length: int | None = None) -> dict:
    """One record -> a sample: input_ids, targets (shifted), positions [T, 3], images (paths), grids [(t, h, w)]."""
    from glm4.chat import ChatFormatError
    from glm4.media.image import smart_resize
    from glm4.media.prompt import IMAGE_TOKEN, token_types
    from glm4.models.glm4v import rope_index

    messages, paths = vision_messages(record, base_dir)
    try:
        segments = fmt.encode_segments(tok, messages, add_generation_prompt=False, close_final_turn=False)
    except ChatFormatError as e:
        raise DataError(str(e)) from e
    ids, labels = sft_labels(segments, tok.special_tokens.get("<|user|>", 151336))
    spec, image_id = policy.spec, policy.token_ids[IMAGE_TOKEN]
    grids = []
    for p in paths:
        w, h = cache.get(p).size
        rh, rw = smart_resize(spec.temporal_patch_size, h, w, spec.temporal_patch_size, spec.factor, spec.min_pixels,
                              spec.max_pixels)
        grids.append((1, rh // spec.patch_size, rw // spec.patch_size))
    counts = iter(t * h * w // spec.merge_size ** 2 for t, h, w in grids)
    full_ids, full_labels = [], []
    for t, lab in zip(ids, labels):
        n = next(counts, None) if t == image_id else 1
        if n is None:
            raise DataError("the chat format wrote more image placeholders than the record has images")
        full_ids += [t] * n
        full_labels += [lab if t != image_id else IGNORE] * n
    if next(counts, None) is not None:
        raise DataError("the chat format did not place every image (is the checkpoint's format a vision one?)")
    if max_length and len(full_ids) > max_length:
        raise NothingToTrain(f"{len(full_ids)} tokens with the image tokens, over max_length {max_length}")
    if all(t == IGNORE for t in full_labels):
        raise NothingToTrain("no assistant tokens to train on")
    types = torch.from_numpy(token_types(full_ids, image_id, policy.token_ids.get("<|begin_of_video|>", -1),
                                         policy.token_ids.get("<|end_of_video|>", -1)))[None]
    positions, _ = rope_index(types, grids or None, None, spec.merge_size)
    sample = sft_sample(full_ids, full_labels)
    # one array, not T lists of 3 ints: 30k samples of nested lists make every garbage collection crawl
    sample.update(positions=positions[0].numpy(), images=paths, grids=grids)
    return sample


class VisionSFTDataset:
    """Encoded image-text conversations, sampled by `epoch_index` (a pure function of seed and step)."""

    def __init__(self, samples: list[dict], cache: ImageCache, seed: int = 0):
        if not samples:
            raise DataError("no training examples")
        self.rows, self.cache, self.seed = samples, cache, seed

    @classmethod
    def from_jsonl(cls, path, tok, fmt, policy, max_length: int | None = None, seed: int = 0,
                   cache: ImageCache | None = None) -> VisionSFTDataset:
        cache = cache or ImageCache()
        base = Path(path).resolve().parent
        rows = encode_records(path, lambda rec: encode_vision_conversation(rec, tok, fmt, policy, cache, base,
                                                                           max_length))
        return cls(rows, cache, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def global_batch(self, step: int, size: int) -> list[dict]:
        return [self.rows[epoch_index(step * size + k, len(self.rows), self.seed)] for k in range(size)]


class VisionTask(LMTask):
    """LMTask whose batches carry the pictures: pixel_values / image_grid_thw in batch order, positions [B, T, 3]."""

    target_logits_only = True

    def __init__(self, base_model, args, policy, cache: ImageCache, pad_id: int = 0):
        super().__init__(base_model, args, None, pad_id)
        self.policy, self.cache = policy, cache

    def model_inputs(self, samples: list[dict], batch: dict, device) -> dict:
        from glm4.media.image import preprocess_images

        kw = {"positions": batch["positions"].to(device)}
        paths = [p for s in samples for p in s["images"]]
        if paths:
            px = preprocess_images([self.cache.get(p) for p in paths], self.policy.spec)
            grids = [tuple(int(v) for v in g) for g in px["image_grid_thw"]]
            if grids != [g for s in samples for g in s["grids"]]:
                raise DataError("an image's grid changed since its sample was encoded (the file was rewritten?)")
            kw.update(pixel_values=torch.from_numpy(px["pixel_values"]).to(device),
                      image_grid_thw=torch.tensor(grids))
        return kw
