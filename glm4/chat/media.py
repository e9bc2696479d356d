"""Images and videos in chat messages (GLM-4.xV checkpoints), torch-free: content parts -> template placeholders
-> the model's inputs (numpy, as glm4.media gives them; the engine turns them into tensors).

    policy = MediaPolicy.for_checkpoint(folder, tokenizer, allowed_local_path="/data")
    messages, media = extract_media(messages, policy)      # image parts -> {"type": "image"}, loaded pictures
    ids = format.encode(tok, messages)                      # one <|image|> per image, one <|video|> per video
    ids, mm = media.prompt_inputs(ids, policy, tok.encode)  # placeholders expanded; pixel_values, image_grid_thw...

Content parts accepted in user messages:
- OpenAI `{"type": "image_url", "image_url": {"url": ...}}` with a `data:` URI (base64), a local path or
  `file://` URL (only under `allowed_local_path`), or an `http(s)` URL (only with `allow_remote`, then within
  `remote_timeout` seconds and `remote_max_bytes`);
- `{"type": "video_url", "video_url": {"url": ...}}` (same sources; decoding a video file needs PyAV);
- Python API: `{"type": "image", "image": PIL image | bytes | path}` and `{"type": "video", "video": [frames...]
  | path, "fps": 2}`.
Limits per request (`max_images`, `max_videos`, `max_image_pixels` of a decoded picture, `max_video_frames`) and bad
media raise `MediaError` whose one-line message names the part and the limit: a 400 for the server.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from glm4.media.image import DEFAULT_SPEC, MediaError, VisionSpec, load_image, preprocess_images
from glm4.media.prompt import BEGIN_IMAGE, BEGIN_VIDEO, END_IMAGE, END_VIDEO, IMAGE_TOKEN, VIDEO_TOKEN
from glm4.media.video import Video, load_video, preprocess_videos, video_from_images

MEDIA_PART_TYPES = ("image_url", "video_url", "image", "video")


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may bring, and the checkpoint's processor settings and placeholder token ids."""

    spec: VisionSpec = DEFAULT_SPEC
    token_ids: dict = field(default_factory=dict)  # <|image|>, <|video|>, begin/end of image/video -> id
    max_images: int = 16
    max_videos: int = 2
    max_image_pixels: int = 40_000_000  # of a decoded picture, before resizing
    max_video_frames: int = 256
    allowed_local_path: str | None = None  # local files only under this folder (None: no local files)
    allow_remote: bool = False
    remote_timeout: float = 10.0
    remote_max_bytes: int = 20 * 2**20
    # GLM-4V-9B: every image resized to this square; the prompt's <|begin_of_image|><|endoftext|><|end_of_image|>
    # becomes num_image_tokens rows (glm4.media.glm4v_9b); None: the GLM-4.xV processors
    square_image_size: int | None = None
    num_image_tokens: int = 0

    @classmethod
    def for_checkpoint(cls, folder, tokenizer, **limits) -> MediaPolicy:
        """The processor settings in the folder's preprocessor_config.json / video_preprocessor_config.json (the
        GLM-4.1V defaults where absent) and the tokenizer's placeholder ids."""
        configs = []
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            p = Path(folder) / name if folder is not None else None
            configs.append(json.loads(p.read_text(encoding="utf-8")) if p is not None and p.is_file() else None)
        spec = VisionSpec.from_config(*configs)
        specials = getattr(tokenizer, "special_tokens", {})
        ids = {s: specials[s] for s in (IMAGE_TOKEN, VIDEO_TOKEN, BEGIN_IMAGE, END_IMAGE, BEGIN_VIDEO, END_VIDEO)
               if s in specials}
        if IMAGE_TOKEN not in ids:
            raise MediaError(f"the tokenizer has no {IMAGE_TOKEN} token: it cannot carry images")
        return cls(spec=spec, token_ids=ids, **limits)

    @classmethod
    def for_glm4v_9b(cls, tokenizer, image_size: int, num_image_tokens: int, patch_size: int = 14,
                     **limits) -> MediaPolicy:
        """GLM-4V-9B: one image per conversation, square resize, its 3-token placeholder's ids."""
        specials = getattr(tokenizer, "special_tokens", {})
        names = (BEGIN_IMAGE, END_IMAGE, "<|endoftext|>")
        if not all(n in specials for n in names):
            raise MediaError(f"the tokenizer lacks {', '.join(n for n in names if n not in specials)}: it cannot "
                             "carry GLM-4V-9B images")
        return cls(spec=VisionSpec(patch_size=patch_size), token_ids={n: specials[n] for n in names},
                   square_image_size=image_size,
                   num_image_tokens=num_image_tokens, **{"max_images": 1, "max_videos": 0, **limits})

    def with_limits(self, **limits) -> MediaPolicy:
        return replace(self, **{k: v for k, v in limits.items() if v is not None})


@dataclass
class RequestMedia:
    """The pictures and videos of one request, in prompt order."""

    images: list = field(default_factory=list)  # PIL images
    videos: list[Video] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.images or self.videos)

    def _square_inputs(self, ids: list[int], policy: MediaPolicy) -> tuple[list[int], dict]:
        """GLM-4V-9B: its 3-token placeholders expanded, pixel_values [n, 3, S, S] (glm4.media.glm4v_9b)."""
        from glm4.media.glm4v_9b import expand_image_placeholders, preprocess_square

        if self.videos:
            raise MediaError("this model takes no videos")
        boi, eoi, eot = (policy.token_ids[n] for n in (BEGIN_IMAGE, END_IMAGE, "<|endoftext|>"))
        if ids.count(boi) != len(self.images):
            raise MediaError(f"the prompt has {ids.count(boi)} image placeholder(s) but {len(self.images)} image(s)")
        if not self.images:
            return list(ids), {}
        spec = policy.spec
        inputs = preprocess_square(self.images, policy.square_image_size, spec.image_mean, spec.image_std, spec.patch_size)
        return expand_image_placeholders(list(ids), boi, eoi, eot, policy.num_image_tokens), inputs

    def prompt_inputs(self, ids: list[int], policy: MediaPolicy, encode) -> tuple[list[int], dict]:
        """Prompt ids with one `<|image|>` / `<|video|>` per item -> (ids with the placeholders expanded, the
        model's inputs: pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw, numpy).
        `encode`: text -> ids, for a video's timestamps (between special tokens, so encoded on their own)."""
        if policy.square_image_size is not None:
            return self._square_inputs(ids, policy)
        spec, tid = policy.spec, policy.token_ids
        inputs: dict = {}
        image_tokens: list[int] = []
        video_spans: list[list[int]] = []
        merge = spec.merge_size ** 2
        if self.images:
            inputs.update(preprocess_images(self.images, spec))
            image_tokens = [int(t * h * w) // merge for t, h, w in inputs["image_grid_thw"]]
        if self.videos:
            if not all(k in tid for k in (VIDEO_TOKEN, BEGIN_IMAGE, END_IMAGE)):
                raise MediaError("this model's tokenizer has no video tokens")
            v = preprocess_videos(self.videos, spec)
            inputs.update(pixel_values_videos=v["pixel_values_videos"], video_grid_thw=v["video_grid_thw"])
            for (t, h, w), stamps in zip(v["video_grid_thw"], v["video_timestamps"]):
                frame = [tid[BEGIN_IMAGE]] + [tid[IMAGE_TOKEN]] * (int(h * w) // merge) + [tid[END_IMAGE]]
                span: list[int] = []
                for k in range(int(t)):  # the processor's text: per temporal patch, the frame then its time
                    span += frame + list(encode(spec.timestamp_text(stamps[k])))
                video_spans.append(span)
        out: list[int] = []
        it_img, it_vid = iter(image_tokens), iter(video_spans)
        for i in ids:
            if i == tid[IMAGE_TOKEN]:
                n = next(it_img, None)
                if n is None:
                    raise MediaError("the prompt has more image placeholders than images")
                out += [i] * n
            elif i == tid.get(VIDEO_TOKEN):
                span = next(it_vid, None)
                if span is None:
                    raise MediaError("the prompt has more video placeholders than videos")
                out += span
            else:
                out.append(i)
        if next(it_img, None) is not None or next(it_vid, None) is not None:
            raise MediaError("the chat template did not place every image or video (is it a vision template?)")
        return out, inputs


# ---------------------------------------------------------------------------------------------
# sources: data URIs, local files, remote URLs


def _url_of(part: dict, key: str) -> str:
    ref = part.get(key)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise MediaError(f"a {part.get('type')} part needs {key}.url")
    return url


def _data_uri_bytes(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise MediaError("a data: URI must be base64 (data:<mime>;base64,<data>)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URI is not valid base64") from None


def _local_file(url: str, policy: MediaPolicy) -> Path:
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url)
    if policy.allowed_local_path is None:
        raise MediaError("local media paths are off (start the server with --allowed-local-media-path DIR); "
                         "send the picture as a data: URI")
    root = Path(policy.allowed_local_path).resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise MediaError(f"{path} is outside the allowed media folder {root}")
    if not real.is_file():
        raise MediaError(f"media file not found: {path}")
    return real


def _remote_bytes(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise MediaError("remote media URLs are off (start the server with --allow-remote-media); "
                         "send the picture as a data: URI")
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout) as r:  # noqa: S310 (scheme checked by caller)
            data = r.read(policy.remote_max_bytes + 1)
    except OSError as e:  # URLError, timeouts, refused connections
        raise MediaError(f"could not fetch {url[:100]}: {getattr(e, 'reason', e)}") from None
    if len(data) > policy.remote_max_bytes:
        raise MediaError(f"{url[:100]} is over the limit of {policy.remote_max_bytes} bytes")
    return data


def fetch(url: str, policy: MediaPolicy) -> bytes | Path:
    """The bytes (data: / http(s)) or the checked local path a media URL names."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if url.startswith("data:"):
        return _data_uri_bytes(url)
    if scheme in ("http", "https"):
        return _remote_bytes(url, policy)
    if scheme in ("", "file") or len(scheme) == 1:  # a path (C: on Windows)
        return _local_file(url, policy)
    raise MediaError(f"unsupported media URL scheme {scheme!r} (use data:, a local path, or http(s))")


def _image(source, policy: MediaPolicy):
    if isinstance(source, str):
        source = fetch(source, policy)
    return load_image(source, max_input_pixels=policy.max_image_pixels)


def _video(part: dict, policy: MediaPolicy) -> Video:
    if part.get("type") == "video" and isinstance(part.get("video"), (list, tuple)):
        frames = part["video"]
        if len(frames) > policy.max_video_frames:
            raise MediaError(f"a video has {len(frames)} frames, over the limit of {policy.max_video_frames} per video")
        return video_from_images([_image(f, policy) if isinstance(f, str) else load_image(
            f, max_input_pixels=policy.max_image_pixels) for f in frames], fps=part.get("fps", 2.0),
            timestamps=part.get("timestamps"))
    source = part.get("video") if part.get("type") == "video" else fetch(_url_of(part, "video_url"), policy)
    if isinstance(source, str):
        source = fetch(source, policy)
    kw = dict(fps=policy.spec.fps, max_duration=policy.spec.max_duration, max_frames=policy.max_video_frames,
              sampler=policy.spec.video_sampler, temporal_patch_size=policy.spec.temporal_patch_size)
    if isinstance(source, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(source)
            f.flush()
            return load_video(f.name, **kw)
    return load_video(str(source), **kw)


# ---------------------------------------------------------------------------------------------
# messages


def first_media_message(messages: Any) -> int | None:
    """The index of the first message with an image or video part, or None."""
    if not isinstance(messages, list):
        return None
    return next((i for i, m in enumerate(messages) if isinstance(m, dict) and isinstance(m.get("content"), list)
                 and any(isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES for p in m["content"])), None)


def _located(message: str, i: int) -> MediaError:
    e = MediaError(message)
    e.param = f"messages.{i}.content"  # where, for the server's error object
    return e


def extract_media(messages: list[dict], policy: MediaPolicy) -> tuple[list[dict], RequestMedia]:
    """Messages with every media part replaced by the template's `{"type": "image"}` / `{"type": "video"}`, and
    the decoded media in order. MediaError names the message and part (`messages[i].content[j]: ...`)."""
    media = RequestMedia()
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") in MEDIA_PART_TYPES
                                                    for p in content):
            out.append(m)
            continue
        if m.get("role") != "user":
            raise _located(f"messages[{i}]: only user messages may carry images or videos", i)
        parts = []
        for j, p in enumerate(content):
            kind = p.get("type") if isinstance(p, dict) else None
            try:
                if kind in ("image_url", "image"):
                    if len(media.images) >= policy.max_images:
                        raise MediaError(f"over the limit of {policy.max_images} images per request")
                    media.images.append(_image(p["image"] if kind == "image" else _url_of(p, "image_url"), policy))
                    parts.append({"type": "image"})
                elif kind in ("video_url", "video"):
                    if len(media.videos) >= policy.max_videos:
                        raise MediaError(f"over the limit of {policy.max_videos} videos per request")
                    media.videos.append(_video(p, policy))
                    parts.append({"type": "video"})
                else:
                    parts.append(p)
            except MediaError as e:
                raise _located(f"messages[{i}].content[{j}]: {e}", i) from None
            except KeyError as e:
                raise _located(f"messages[{i}].content[{j}]: a {kind} part needs {e}", i) from None
        out.append({**m, "content": parts})
    return out, media
