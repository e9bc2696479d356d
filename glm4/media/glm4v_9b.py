"""Images and prompts for GLM-4V-9B (`chatglm` with a `vision_config`), torch-free.

Pixels (the checkpoint's tokenizer: torchvision Resize((S, S), BICUBIC) on a PIL image, ToTensor, Normalize):
RGB (glm4.media.image.load_image), PIL bicubic to S x S whatever the aspect ratio (S = image_size, 1120), x / 255
in float32, then (x - CLIP mean) / CLIP std in float32 -> float32 [n, 3, S, S]. No min / max pixel bounds: every
image becomes the same 1602 vectors, so the only limit is how large a file may be decoded.

Prompt: the tokenizer writes an image as the 3 tokens `<|begin_of_image|><|endoftext|><|end_of_image|>` at the
start of its user message (`PLACEHOLDER`). The model takes that form with `images=` (as the remote code); the engine
takes the expanded form, `expand_image_placeholders`: boi + (num_image_tokens - 2) fillers + eoi, one prompt row
per vector the tower gives.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from glm4.media.image import CLIP_MEAN, CLIP_STD, MediaError, load_image

PLACEHOLDER = "<|begin_of_image|><|endoftext|><|end_of_image|>"


def preprocess_square(images, image_size: int = 1120, mean=CLIP_MEAN, std=CLIP_STD,
                      patch_size: int = 14) -> dict[str, np.ndarray]:
    """Images (PIL, bytes or paths) -> {"pixel_values": float32 [n, 3, S, S], "image_grid_thw": int64 [n, 3]}
    (the grid is (1, S/P, S/P), the same for every image; the engine keys on it like the GLM-4.xV grids)."""
    out = []
    for image in images:
        img = load_image(image)
        rgb = np.asarray(img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC))  # [S, S, 3] uint8
        x = rgb.astype(np.float32) / np.float32(255)
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)))
    if not out:
        raise MediaError("no images given")
    side = image_size // patch_size
    return {"pixel_values": np.stack(out), "image_grid_thw": np.array([(1, side, side)] * len(out), dtype=np.int64)}


def expand_image_placeholders(ids: list[int], boi: int, eoi: int, filler: int, num_image_tokens: int = 1602) -> list[int]:
    """Each 3-token placeholder (boi, any, eoi) -> boi + (num_image_tokens - 2) x filler + eoi; a boi not followed
    two tokens later by eoi is an error (the model could not place the image)."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == boi:
            if i + 2 >= len(ids) or ids[i + 2] != eoi:
                raise MediaError("<|begin_of_image|> must be followed by one token and <|end_of_image|> (GLM-4V-9B)")
            out += [boi] + [filler] * (num_image_tokens - 2) + [eoi]
            i += 3
        else:
            out.append(ids[i])
            i += 1
    return out
