"""Videos for the GLM-4.xV vision tower: frames with timestamps, sampled and packed as the checkpoints expect.

A `Video` is frames (PIL images) plus each frame's time in seconds. Make one from a list of images
(`video_from_images(images, fps=...)` or explicit `timestamps=`), or decode a file with `load_video(path)`, which
needs PyAV (the `video` extra: `pip install 'glm4[video]'`; without it a `MediaError` says so).

Sampling (`sample_frame_indices`, transformers' Glm4vVideoProcessor rule): `fps` frames per second (default 2) of
the video; longer than `max_duration` seconds -> that many seconds' worth spread evenly; repeated indices dropped; an
odd count gets its last frame repeated. GLM-4.6V's processor samples by the video's length instead
(`sample_frame_indices_glm46v`; `load_video(..., sampler="glm46v")`, chosen by VisionSpec.video_sampler from the
checkpoint's video_preprocessor_config.json). `preprocess_video` then resizes every frame alike (`smart_resize`
with the frame count, PIL bicubic), normalizes, pads the frames to a multiple of temporal_patch_size with the last
one and packs them: one (t, h, w) grid, t = frames / 2. The prompt shows one timestamp per temporal patch: the
time of its first frame (`Video.timestamps[::2]`), as `VisionSpec.timestamp_text` writes it (whole seconds;
GLM-4.6V: "1.5 seconds").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from glm4.media.image import (
    DEFAULT_SPEC,
    MediaError,
    VisionSpec,
    load_image,
    normalize,
    pack_patches,
    resized_rgb,
    smart_resize,
)


@dataclass
class Video:
    frames: list[Image.Image]
    timestamps: list[float]  # seconds, one per frame

    def __post_init__(self):
        if not self.frames:
            raise MediaError("video has no frames")
        if len(self.timestamps) != len(self.frames):
            raise MediaError(f"video has {len(self.frames)} frames but {len(self.timestamps)} timestamps")


def video_from_images(images, fps: float | None = 2.0, timestamps: list[float] | None = None) -> Video:
    """Frames already sampled (PIL images, bytes or paths): timestamps given, or frame i at i / fps seconds."""
    frames = [load_image(im) for im in images]
    if timestamps is None:
        if not fps or fps <= 0:
            raise MediaError("video frames need timestamps or a positive fps")
        timestamps = [i / fps for i in range(len(frames))]
    return Video(frames, [float(t) for t in timestamps])


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = 2.0, max_duration: float = 300.0,
                         duration: float | None = None) -> list[int]:
    """Which decoded frames to keep (see the module docstring)."""
    if total_frames <= 0 or not video_fps or video_fps <= 0:
        raise MediaError(f"video has {total_frames} frames at {video_fps} fps: nothing to sample")
    last = total_frames - 1
    duration = duration or round(last / video_fps) + 1
    if duration <= max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        picks = [min(last, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    else:
        n = int(max_duration * fps)
        if n >= total_frames:
            picks = list(range(total_frames))
        else:
            picks = [min(last, int(math.ceil(t * video_fps))) for t in np.linspace(0, duration, n, endpoint=True)]
    uniq = list(dict.fromkeys(picks))
    if len(uniq) % 2:
        uniq.append(uniq[-1])
    return uniq


def sample_frame_indices_glm46v(total_frames: int, video_fps: float, duration: float | None = None,
                                temporal_patch_size: int = 2) -> list[int]:
    """GLM-4.6V's frame choice (transformers' Glm46VVideoProcessor): 3 frame pairs per second up to 30 s of video,
    1 up to 300 s, 0.5 beyond (counting at most 2400 s), at most 640 frames; frames taken at that rate by their
    timestamps, then spread evenly (np.linspace, truncated) when they come out too few or too many; repeated
    indices dropped; an odd count gets its last frame repeated."""
    if total_frames <= 0 or not video_fps or video_fps <= 0:
        raise MediaError(f"video has {total_frames} frames at {video_fps} fps: nothing to sample")
    last = total_frames - 1
    duration = duration or round(last / video_fps) + 1
    counted = min(duration, 2400)
    rate = 3 if counted <= 30 else 1 if counted <= 300 else 0.5
    want = min(int(counted * rate * temporal_patch_size), 640)
    if total_frames < want:
        picks = np.linspace(0, last, want, dtype=int).tolist()
    else:
        picks, due, step, stop = [], 0, 1 / (temporal_patch_size * rate), int(duration)
        per_frame = 1 / video_fps
        for i in range(total_frames):
            if i * per_frame >= due:
                due += step
                picks.append(i)
                if due >= stop:
                    break
    if len(picks) < want:
        lo, hi = (picks[0], picks[-1]) if picks else (0, last)
        picks = np.linspace(lo, hi, want, dtype=int).tolist()
    elif len(picks) > want:
        picks = np.linspace(0, last, want, dtype=int).tolist()
    uniq = list(dict.fromkeys(picks))
    if len(uniq) % 2:
        uniq.append(uniq[-1])
    return uniq


def load_video(path: str, fps: float = 2.0, max_duration: float = 300.0, max_frames: int | None = None,
               sampler: str = "glm4v", temporal_patch_size: int = 2) -> Video:
    """Decode a video file with PyAV and sample it: `sampler` "glm4v" (`sample_frame_indices` at `fps`, GLM-4.1V)
    or "glm46v" (`sample_frame_indices_glm46v`). The frame count, rate (average_rate) and duration (frames / rate)
    are what transformers' PyAV reader gives the samplers; only the picked frames are kept (RGB PIL images),
    timestamps index / rate."""
    try:
        import av
    except ImportError as e:
        raise MediaError("reading video files needs PyAV (pip install 'glm4[video]' or pip install av); "
                         "or pass the frames as a list of images") from e
    if sampler not in ("glm4v", "glm46v"):
        raise ValueError(f"unknown video sampler {sampler!r} (glm4v, glm46v)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("the file has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames or 0)
            if total <= 0:  # the container does not say: count by decoding
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if sampler == "glm46v":
                picks = sample_frame_indices_glm46v(total, rate, total / rate if rate else None, temporal_patch_size)
            else:
                picks = sample_frame_indices(total, rate, fps, max_duration, total / rate if rate else None)
            if max_frames is not None and len(picks) > max_frames:
                raise MediaError(f"video gives {len(picks)} frames, over the limit of {max_frames}")
            wanted, frames = set(picks), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= picks[-1]:
                    break
    except (OSError, av.error.FFmpegError, IndexError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"not a readable video ({e})") from e
    missing = [i for i in picks if i not in frames]
    if missing:  # the stream held fewer frames than its header said: take the last decoded one
        if not frames:
            raise MediaError("the video has no decodable frames")
        last = max(frames)
        frames.update({i: frames[last] for i in missing})
    return Video([frames[i] for i in picks], [i / rate for i in picks])


def preprocess_video(video: Video, spec: VisionSpec = DEFAULT_SPEC) -> tuple[np.ndarray, tuple[int, int, int], list[float]]:
    """-> (patches float32 [t*h*w, C*T*P*P], grid (t, h, w), one timestamp per temporal patch)."""
    T = spec.temporal_patch_size
    first = video.frames[0]
    n = len(video.frames)
    h, w = smart_resize(max(n, T), first.height, first.width, T, spec.factor, spec.video_min_pixels,
                        spec.video_max_pixels)
    rgb = np.stack([resized_rgb(f.convert("RGB"), h, w) for f in video.frames])  # [F, h, w, 3]
    if n % T:  # pad with the last frame to whole temporal patches
        rgb = np.concatenate([rgb, np.repeat(rgb[-1:], T - n % T, axis=0)])
    patches, grid = pack_patches(normalize(rgb, spec), spec)
    stamps = list(video.timestamps[::T])[:grid[0]]
    while len(stamps) < grid[0]:
        stamps.append(stamps[-1])
    return patches, grid, stamps


def preprocess_videos(videos, spec: VisionSpec = DEFAULT_SPEC) -> dict:
    """Videos -> {"pixel_values_videos": float32 [N, D], "video_grid_thw": int64 [n, 3], "video_timestamps": [[s]]}."""
    patches, grids, stamps = [], [], []
    for v in videos:
        p, g, s = preprocess_video(v, spec)
        patches.append(p)
        grids.append(g)
        stamps.append(s)
    if not patches:
        raise MediaError("no videos given")
    return {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.array(grids, dtype=np.int64),
            "video_timestamps": stamps}
