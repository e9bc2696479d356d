"""Images for the GLM-4.xV vision tower, with PIL and numpy only (no torchvision).

The steps and numbers of transformers' `Glm4vImageProcessorPil` (its output is the reference the tests compare
against byte for byte):

1. RGB: alpha composited onto white, palette / grey / CMYK converted;
2. `smart_resize`: height and width rounded to multiples of patch x merge (28), aspect kept, sides under 28
   scaled up, then the pixel count (counted as temporal_patch x h x w, i.e. two frames for a still image) brought
   inside [min_pixels, max_pixels]; PIL bicubic;
3. x / 255 in float64, cast to float32, then (x - CLIP mean) / CLIP std in float32;
4. packing: one row per 14 x 14 patch, C x T x 14 x 14 values (a still image repeated over the T = 2 temporal
   slots), patches ordered by 2 x 2 merge block (row-major), then row-major inside the block.

`preprocess_images(images, spec)` -> {"pixel_values": float32 [N, 1176], "image_grid_thw": int64 [n, 3]}.
Bad input raises `MediaError` with a one-line reason (not an image, truncated, empty, too large, aspect > 200).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200


class MediaError(ValueError):
    """An image or video that cannot be used; the message is one line, fit for a 400 reply."""


@dataclass(frozen=True)
class VisionSpec:
    """The processor settings of a checkpoint (preprocessor_config.json); defaults = GLM-4.1V / 4.5V / 4.6V."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112  # compared with temporal_patch_size * h * w
    max_pixels: int = 28 * 28 * 15000
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # videos (video_preprocessor_config.json)
    video_min_pixels: int = 112 * 112
    video_max_pixels: int = 28 * 28 * 2 * 30000
    fps: float = 2.0
    max_duration: float = 300.0
    # "glm4v": GLM-4.1V's frame sampler (fps, then max_duration) and whole-second timestamps; "glm46v": GLM-4.6V's
    # processor (Glm46VVideoProcessor: 3 / 1 / 0.5 frame pairs per second by duration, timestamps "1.5 seconds")
    video_sampler: str = "glm4v"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def timestamp_text(self, seconds: float) -> str:
        """What the prompt shows after a video frame: its time, as the checkpoint's processor writes it."""
        return f"{seconds:.1f} seconds" if self.video_sampler == "glm46v" else str(int(seconds))

    @classmethod
    def from_config(cls, image: dict | None = None, video: dict | None = None) -> VisionSpec:
        """From the parsed preprocessor_config.json (and video_preprocessor_config.json) of a checkpoint."""
        kw: dict = {}
        for src, lo, hi in ((image or {}, "min_pixels", "max_pixels"), (video or {}, "video_min_pixels", "video_max_pixels")):
            size = src.get("size") or {}
            if "shortest_edge" in size:
                kw[lo] = int(size["shortest_edge"])
            if "longest_edge" in size:
                kw[hi] = int(size["longest_edge"])
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if src.get(key) is not None:
                    kw[key] = int(src[key])
        img = image or {}
        if img.get("image_mean") is not None:
            kw["image_mean"] = tuple(float(x) for x in img["image_mean"])
        if img.get("image_std") is not None:
            kw["image_std"] = tuple(float(x) for x in img["image_std"])
        vid = video or {}
        for key in ("fps", "max_duration"):
            if vid.get(key) is not None:
                kw[key] = float(vid[key])
        kinds = " ".join(str(src.get(k, "")) for src in (image or {}, vid)
                         for k in ("processor_class", "video_processor_type", "image_processor_type"))
        if "Glm46V" in kinds:
            kw["video_sampler"] = "glm46v"
        return cls(**kw)


DEFAULT_SPEC = VisionSpec()


def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 28,
                 min_pixels: int = 112 * 112, max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """(height, width) to resize to: multiples of `factor`, aspect kept, t x h x w within the pixel bounds."""
    if height <= 0 or width <= 0:
        raise MediaError(f"image has no pixels ({width}x{height})")
    if num_frames < temporal_factor:
        raise MediaError(f"{num_frames} frame(s): at least {temporal_factor} are needed")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise MediaError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over {MAX_ASPECT}:1")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(source, max_input_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, bytes, or a file path; alpha composited onto white (as the reference)."""
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source))
            if max_input_pixels is not None and img.width * img.height > max_input_pixels:
                raise MediaError(f"image is {img.width}x{img.height}, over the limit of {max_input_pixels} pixels")
            img.load()
        except MediaError:
            raise
        except Image.DecompressionBombError as e:  # PIL refuses to decode it at all
            raise MediaError(f"image is over {2 * Image.MAX_IMAGE_PIXELS} pixels, too large to decode") from e
        except UnidentifiedImageError as e:
            raise MediaError(f"not a readable image ({type(e).__name__})") from e
        except FileNotFoundError as e:
            raise MediaError(f"image file not found: {source}") from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated data as OSError
            raise MediaError(f"broken image data ({e})") from e
    if img.width <= 0 or img.height <= 0:
        raise MediaError(f"image has no pixels ({img.width}x{img.height})")
    if max_input_pixels is not None and img.width * img.height > max_input_pixels:
        raise MediaError(f"image is {img.width}x{img.height}, over the limit of {max_input_pixels} pixels")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def normalize(rgb: np.ndarray, spec: VisionSpec) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: x/255 in float64, then (x - mean) / std in float32."""
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(spec.image_mean, dtype=np.float32)) / np.array(spec.image_std, dtype=np.float32)
    return np.moveaxis(x, -1, -3)


def pack_patches(frames: np.ndarray, spec: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [F, C, H, W] (F a multiple of temporal_patch_size) -> ([t*h*w, C*T*P*P], (t, h, w) in patches)."""
    F_, C, H, W = frames.shape
    T, P, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    gt, gh, gw = F_ // T, H // P, W // P
    x = frames.reshape(gt, T, C, gh // m, m, P, gw // m, m, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, block row, block col, row in block, col in block, C, T, P, P)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, C * T * P * P), (gt, gh, gw)


def resized_rgb(img: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic to (height, width) -> uint8 [H, W, 3]."""
    return np.asarray(img.resize((width, height), resample=Image.Resampling.BICUBIC))


def preprocess_image(image, spec: VisionSpec = DEFAULT_SPEC) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (PIL, bytes or path) -> (patches float32 [h*w, C*T*P*P], grid (1, h, w))."""
    img = load_image(image)
    h, w = smart_resize(spec.temporal_patch_size, img.height, img.width, spec.temporal_patch_size, spec.factor,
                        spec.min_pixels, spec.max_pixels)
    x = normalize(resized_rgb(img, h, w), spec)  # [3, h, w]
    frames = np.broadcast_to(x[None], (spec.temporal_patch_size, *x.shape))  # a still image fills every slot
    return pack_patches(frames, spec)


def preprocess_images(images, spec: VisionSpec = DEFAULT_SPEC) -> dict[str, np.ndarray]:
    """Images -> {"pixel_values": float32 [N, C*T*P*P], "image_grid_thw": int64 [n, 3]} (rows concatenated)."""
    patches, grids = [], []
    for image in images:
        p, g = preprocess_image(image, spec)
        patches.append(p)
        grids.append(g)
    if not patches:
        raise MediaError("no images given")
    return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.array(grids, dtype=np.int64)}


def image_token_count(height: int, width: int, spec: VisionSpec = DEFAULT_SPEC) -> int:
    """`<|image|>` tokens an image of this size becomes (without reading its pixels)."""
    h, w = smart_resize(spec.temporal_patch_size, height, width, spec.temporal_patch_size, spec.factor,
                        spec.min_pixels, spec.max_pixels)
    return (h // spec.patch_size) * (w // spec.patch_size) // spec.merge_size ** 2
