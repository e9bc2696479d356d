"""The prompt side of images and videos: placeholders expanded to one token per vision-tower output.

A chat template writes one `<|image|>` per image (inside `<|begin_of_image|>…<|end_of_image|>`) and one
`<|video|>` per video (inside `<|begin_of_video|>…<|end_of_video|>`). `expand_placeholders` turns them, in order,
into what the model reads (transformers' Glm4vProcessor text, character for character):

    <|image|>  ->  n x <|image|>                       n = t*h*w / merge^2 of the image's grid
    <|video|>  ->  per temporal patch k: <|begin_of_image|> + n x <|image|> + <|end_of_image|> + str(int(seconds_k))
                   (GLM-4.6V: f"{seconds_k:.1f} seconds")

`token_types(ids, ...)` gives mm_token_type_ids (0 text, 1 image token, 2 image token inside a video span), the
input the model's position rule reads. `process(text, images, videos, encode, spec)` does it all for one prompt.
"""

from __future__ import annotations

import re

import numpy as np

from glm4.media.image import DEFAULT_SPEC, MediaError, VisionSpec, preprocess_images
from glm4.media.video import preprocess_videos

IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
BEGIN_IMAGE, END_IMAGE = "<|begin_of_image|>", "<|end_of_image|>"
BEGIN_VIDEO, END_VIDEO = "<|begin_of_video|>", "<|end_of_video|>"
_PLACEHOLDER = re.compile(re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))


def expand_placeholders(text: str, image_grids=(), video_grids=(), video_timestamps=(), merge_size: int = 2,
                        timestamp_text=lambda s: str(int(s))) -> str:
    """Each placeholder, in order, replaced by its tokens (see the module docstring); counts must match.
    `timestamp_text`: seconds -> the text after a video frame (GLM-4.6V: `VisionSpec.timestamp_text`)."""
    images, videos = [list(map(int, g)) for g in image_grids], [list(map(int, g)) for g in video_grids]
    stamps = list(video_timestamps)
    found = _PLACEHOLDER.findall(text)
    n_img, n_vid = found.count(IMAGE_TOKEN), found.count(VIDEO_TOKEN)
    if n_img != len(images) or n_vid != len(videos):
        raise MediaError(f"the prompt has {n_img} image and {n_vid} video placeholder(s) but {len(images)} image(s) "
                         f"and {len(videos)} video(s) were given")
    if len(stamps) != len(videos):
        raise MediaError(f"{len(videos)} video(s) but timestamps for {len(stamps)}")
    it_img, it_vid = iter(images), iter(zip(videos, stamps))

    def one(m: re.Match) -> str:
        if m.group(0) == IMAGE_TOKEN:
            t, h, w = next(it_img)
            return IMAGE_TOKEN * (t * h * w // merge_size ** 2)
        (t, h, w), secs = next(it_vid)
        if len(secs) < t:
            raise MediaError(f"a video of {t} temporal patches has only {len(secs)} timestamps")
        per_frame = IMAGE_TOKEN * (h * w // merge_size ** 2)
        return "".join(f"{BEGIN_IMAGE}{per_frame}{END_IMAGE}{timestamp_text(secs[k])}" for k in range(t))

    return _PLACEHOLDER.sub(one, text)


def token_types(ids, image_token_id: int, video_start_id: int, video_end_id: int) -> np.ndarray:
    """mm_token_type_ids for one id sequence: 1 = `<|image|>`, 2 = `<|image|>` inside a video span, 0 = text."""
    ids = np.asarray(ids)
    in_video = np.cumsum(ids == video_start_id) > np.cumsum(ids == video_end_id)
    out = np.zeros(ids.shape, dtype=np.int64)
    is_image = ids == image_token_id
    out[is_image & in_video] = 2
    out[is_image & ~in_video] = 1
    return out


def process(text: str, images=(), videos=(), encode=None, spec: VisionSpec = DEFAULT_SPEC,
            token_ids: dict[str, int] | None = None) -> dict:
    """One prompt with its media -> model inputs (numpy): input_ids (when `encode`, str -> ids, is given),
    mm_token_type_ids (needs `token_ids`: {"image", "video_start", "video_end"} ids), pixel_values /
    image_grid_thw, pixel_values_videos / video_grid_thw, and the expanded `text`."""
    out: dict = {}
    grids, vgrids, stamps = (), (), ()
    if images:
        out.update(preprocess_images(images, spec))
        grids = out["image_grid_thw"]
    if videos:
        v = preprocess_videos(videos, spec)
        out.update(pixel_values_videos=v["pixel_values_videos"], video_grid_thw=v["video_grid_thw"])
        vgrids, stamps = v["video_grid_thw"], v["video_timestamps"]
    out["text"] = expand_placeholders(text, grids, vgrids, stamps, spec.merge_size, spec.timestamp_text)
    if encode is not None:
        ids = np.asarray(encode(out["text"]), dtype=np.int64)
        out["input_ids"] = ids
        if token_ids is not None:
            out["mm_token_type_ids"] = token_types(ids, token_ids["image"], token_ids["video_start"],
                                                   token_ids["video_end"])
    return out
