"""GLM-4.xV: glm4v / glm4v_moe against transformers' Glm4vForConditionalGeneration / Glm4vMoeForConditionalGeneration
(tiny random checkpoints written by save_pretrained, loaded with glm4.load_model) and glm4.media against
Glm4vImageProcessorPil (byte-equal pixel values), the processor's token types and the video frame sampler."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import glm4
from glm4.config import ConfigError, load_config
from glm4.layers.attention import KVCache
from glm4.media.image import DEFAULT_SPEC, MediaError, VisionSpec, load_image, preprocess_images, smart_resize
from glm4.media.prompt import expand_placeholders, process
from glm4.media.video import load_video, sample_frame_indices, video_from_images
from glm4.weights import save_checkpoint

transformers = pytest.importorskip("transformers")
from conftest import randomize_  # noqa: E402

VOCAB = 160
SPECIAL = {"<|begin_of_image|>": 150, "<|end_of_image|>": 151, "<|begin_of_video|>": 152, "<|end_of_video|>": 153,
           "<|image|>": 154, "<|video|>": 155, "[gMASK]": 140, "<sop>": 141, "<|user|>": 142, "<|assistant|>": 143}
TOKEN_IDS = {"image": 154, "video_start": 152, "video_end": 153}
EOS = [1, 2]
_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")


def encode(text: str) -> list[int]:
    """A character-level test tokenizer: the special strings as their ids, every other character 3..132."""
    ids = []
    for piece in _SPLIT.split(text):
        ids += [SPECIAL[piece]] if piece in SPECIAL else [3 + ord(c) % 130 for c in piece]
    return ids


def hf_config(kind: str):
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, pad_token_id=0,
                eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 3, 3]})
    if kind == "glm4v_moe":
        text.update(attention_bias=True, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=128, patch_size=14,
                  image_size=56, spatial_merge_size=2, temporal_patch_size=2, rms_norm_eps=1e-5)
    ids = dict(image_token_id=154, video_token_id=155, image_start_token_id=150, image_end_token_id=151,
               video_start_token_id=152, video_end_token_id=153)
    cls = transformers.Glm4vMoeConfig if kind == "glm4v_moe" else transformers.Glm4vConfig
    return cls(text_config=text, vision_config=vision, **ids)


@pytest.fixture(scope="module", params=["glm4v", "glm4v_moe"])
def pair(request, tmp_path_factory):
    """(transformers model, glm4 model loaded from its save_pretrained folder, folder)."""
    kind = request.param
    cls = transformers.Glm4vMoeForConditionalGeneration if kind == "glm4v_moe" else transformers.Glm4vForConditionalGeneration
    torch.manual_seed(0)
    hf = randomize_(cls(hf_config(kind)).float().eval(), seed=1)
    folder = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(folder)
    ours = glm4.load_model(folder, progress=False)
    assert ours.config.model_type == kind
    return hf, ours, folder


def picture(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def model_inputs(text: str, images=(), videos=(), spec: VisionSpec = DEFAULT_SPEC) -> dict[str, torch.Tensor]:
    out = process(text, images, videos, encode, spec, TOKEN_IDS)
    t = {"input_ids": torch.from_numpy(out["input_ids"])[None],
         "mm_token_type_ids": torch.from_numpy(out["mm_token_type_ids"])[None]}
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if k in out:
            t[k] = torch.from_numpy(np.ascontiguousarray(out[k]))
    return t


def hf_logits(hf, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return hf(**inputs, **extra).logits


def our_logits(model, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra)


USER = "[gMASK]<sop><|user|>\n"
IMG = "<|begin_of_image|><|image|><|end_of_image|>"
VID = "<|begin_of_video|><|video|><|end_of_video|>"


def _check(hf, ours, inputs, tol=1e-4) -> float:
    ref, got = hf_logits(hf, inputs), our_logits(ours, inputs)
    assert got.shape == ref.shape
    diff = (ref - got).abs().max().item()
    assert diff < tol, diff
    return diff


# ---- models against transformers ---------------------------------------------------------------------------------

def test_one_image_logits(pair):
    hf, ours, _ = pair
    inputs = model_inputs(USER + IMG + "What is in the picture?<|assistant|>\n", [picture(64, 64)])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    _check(hf, ours, inputs)
    # the same call without mm_token_type_ids: the model derives them from input_ids
    no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert torch.equal(our_logits(ours, no_types), our_logits(ours, inputs))


def test_text_only_logits(pair):
    hf, ours, _ = pair
    inputs = {"input_ids": torch.tensor([encode(USER + "Hello there, how are you?<|assistant|>\n")])}
    _check(hf, ours, inputs)


def test_several_images_logits(pair):
    hf, ours, _ = pair
    imgs = [picture(64, 64, 1), picture(200, 60, 2), picture(90, 150, 3, mode="L")]
    inputs = model_inputs(USER + IMG + "and" + IMG + IMG + "compare them.<|assistant|>\n", imgs)
    assert len(inputs["image_grid_thw"]) == 3
    _check(hf, ours, inputs)


def test_video_logits(pair):
    hf, ours, _ = pair
    video = video_from_images([picture(64, 48, s) for s in range(4)], fps=2.0)  # 0, 0.5, 1.0, 1.5 s
    inputs = model_inputs(USER + VID + "What happens?<|assistant|>\n", videos=[video])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(SPECIAL["<|begin_of_image|>"]) == 2 and ids.count(154) == 8
    _check(hf, ours, inputs)


def test_multi_turn_images_logits(pair):
    hf, ours, _ = pair
    text = (USER + IMG + "Describe it.<|assistant|>\nA field.<|user|>\n" + IMG + "And this one?<|assistant|>\n"
            "A road.<|user|>\nWhich is brighter?<|assistant|>\n")
    _check(hf, ours, model_inputs(text, [picture(120, 80, 5), picture(70, 140, 6)]))


def test_left_padded_batch_logits(pair):
    hf, ours, _ = pair
    a = model_inputs(USER + IMG + "Short.<|assistant|>\n", [picture(64, 64, 7)])
    b = model_inputs(USER + IMG + "A much longer question about it?<|assistant|>\n", [picture(100, 64, 8)])
    T = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(x):
        return torch.cat([torch.zeros(1, T - x.shape[1], dtype=x.dtype), x], 1)

    inputs = {"input_ids": torch.cat([pad(a["input_ids"]), pad(b["input_ids"])]),
              "mm_token_type_ids": torch.cat([pad(a["mm_token_type_ids"]), pad(b["mm_token_type_ids"])]),
              "attention_mask": torch.cat([pad(torch.ones_like(a["input_ids"])), pad(torch.ones_like(b["input_ids"]))]),
              "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
              "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]])}
    ref, got = hf_logits(hf, inputs), our_logits(ours, inputs)
    real = inputs["attention_mask"].bool()
    assert (ref[real] - got[real]).abs().max().item() < 1e-4


def test_greedy_tokens_match(pair):
    hf, ours, _ = pair
    inputs = model_inputs(USER + IMG + "Say something.<|assistant|>\n", [picture(84, 56, 9)])
    n = 6
    with torch.no_grad():
        ref = hf.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=n,
                          do_sample=False, eos_token_id=EOS, pad_token_id=0)[0].tolist()
    T = inputs["input_ids"].shape[1]
    media = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}  # types follow the ids

    # full recompute: the whole sequence (prompt + tokens so far) with the media, every step
    ids = inputs["input_ids"]
    for _ in range(n):
        nxt = our_logits(ours, {**media, "input_ids": ids})[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
        if int(nxt) in EOS:
            break
    assert ids[0].tolist() == ref

    # KV cache: prefill with the 3-D positions, then decode at arange + rope_deltas
    cfg = ours.config
    positions, deltas = ours.rope_index(inputs["input_ids"], inputs["image_grid_thw"])
    cache = KVCache(cfg.num_hidden_layers, 1, T + n, cfg.num_key_value_heads, cfg.head_dim)
    with torch.no_grad():
        logits = ours(**inputs, positions=positions, ctx=cache)[:, -1]
        cache.advance(T)
        out = inputs["input_ids"][0].tolist()
        for i in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            if tok in EOS:
                break
            logits = ours(torch.tensor([[tok]]), positions=torch.tensor([[T + i]]) + deltas[:, None], ctx=cache)[:, -1]
            cache.advance(1)
    assert out == ref


def test_rope_index_matches_transformers(pair):
    hf, ours, _ = pair
    video = video_from_images([picture(64, 48, s) for s in range(6)], fps=1.0)
    inputs = model_inputs(USER + IMG + VID + "x<|assistant|>\n", [picture(150, 60, 1)], [video])
    ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 inputs["image_grid_thw"], inputs["video_grid_thw"])
    pos, delta = ours.rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"])
    assert torch.equal(pos.permute(2, 0, 1), ref_pos) and delta.tolist() == ref_delta.view(-1).tolist()


def test_checkpoint_names_and_config(pair):
    hf, ours, folder = pair
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert any(n.startswith("model.visual.blocks.0.attn.qkv") for n in names)
    assert any(n.startswith("model.language_model.layers.0.") for n in names)
    assert set(ours.checkpoint_state_dict()) == {n for n in names if not ours.skip_checkpoint_key(n)}
    cfg = load_config(folder)
    spec = cfg.rope
    assert spec.mrope_section == (2, 3, 3) and spec.rotary_dim == 16
    assert spec.interleaved == (cfg.model_type == "glm4v")  # 4.1V pairs, 4.5V halves


def test_save_and_reload(pair, tmp_path):
    _, ours, _ = pair
    inputs = model_inputs(USER + IMG + "Again.<|assistant|>\n", [picture(64, 80, 4)])
    again = glm4.load_model(save_checkpoint(ours, tmp_path / "re"), progress=False)
    assert torch.equal(our_logits(again, inputs), our_logits(ours, inputs))


def test_legacy_rope_scaling_config(tmp_path):
    """transformers 4.x writes rope_theta / partial_rotary_factor at the top and mrope_section in rope_scaling."""
    d = {"model_type": "glm4v", "text_config": {
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rope_theta": 500.0, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "default", "mrope_section": [4, 2, 2]}}, "vision_config": {"depth": 1}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    spec = load_config(tmp_path).rope
    assert (spec.mrope_section, spec.rotary_dim, spec.theta, spec.scaling) == ((4, 2, 2), 16, 500.0, None)
    d["text_config"]["rope_scaling"]["mrope_section"] = [4, 4, 4]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="mrope_section"):
        _ = load_config(tmp_path).rope


def test_placeholder_count_mismatch_is_clear(pair):
    _, ours, _ = pair
    inputs = model_inputs(USER + IMG + "q<|assistant|>\n", [picture(64, 64)])
    inputs["input_ids"] = inputs["input_ids"][:, :-12]  # cut into the image span
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="placeholder"):
        our_logits(ours, inputs)


# ---- processing against transformers -----------------------------------------------------------------------------

SIZES = [(64, 64), (112, 112), (224, 224), (500, 375), (1000, 20), (20, 1000), (1, 1), (333, 777), (6000, 30),
         (1920, 1080), (27, 29)]


@pytest.mark.parametrize("w,h", SIZES)
def test_image_processor_matches_transformers(w, h):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    img = picture(w, h, seed=w * 7 + h)
    ref = Glm4vImageProcessorPil()(images=[img], return_tensors="np")
    ours = preprocess_images([img])
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert ours["pixel_values"].dtype == np.float32
    assert np.array_equal(ours["pixel_values"], ref["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_image_modes_match_transformers(mode):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    img = picture(90, 70, seed=3)
    if mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90), dtype=np.uint8)))
        img = rgba.convert(mode)
    else:
        img = img.convert(mode)
    ref = Glm4vImageProcessorPil()(images=[img], return_tensors="np")
    assert np.array_equal(preprocess_images([img])["pixel_values"], ref["pixel_values"])


def test_pixel_bounds_match_transformers():
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    size = {"shortest_edge": 28 * 28 * 2 * 40, "longest_edge": 28 * 28 * 2 * 64}
    spec = VisionSpec.from_config({"size": size})
    for w, h in [(500, 375), (40, 40), (1000, 30)]:
        img = picture(w, h, 2)
        ref = Glm4vImageProcessorPil(size=size)(images=[img], return_tensors="np")
        ours = preprocess_images([img], spec)
        assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        assert np.array_equal(ours["pixel_values"], ref["pixel_values"])
        t, gh, gw = ours["image_grid_thw"][0]
        if max(w, h) / min(w, h) < 4:  # thin images may end over the bound: each side is at least 28 (as the reference)
            assert 40 <= gh * gw // 4 <= 64


def test_token_types_match_transformers_processor():
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    video = video_from_images([picture(64, 48, s) for s in range(4)], fps=2.0)
    out = process(USER + IMG + VID + IMG + "?", [picture(64, 64), picture(80, 64)], [video], encode,
                  token_ids=TOKEN_IDS)
    fake = SimpleNamespace(image_token_id=154, video_start_id=152, video_end_id=153)
    ref = Glm4vProcessor.create_mm_token_type_ids(fake, [out["input_ids"].tolist()])[0]
    assert out["mm_token_type_ids"].tolist() == ref
    assert set(ref) == {0, 1, 2}


def test_expand_placeholders():
    text = expand_placeholders("a" + IMG + "b" + VID, [(1, 4, 6)], [(2, 2, 4)], [[0.0, 3.7]])
    assert text == ("a<|begin_of_image|>" + "<|image|>" * 6 + "<|end_of_image|>b<|begin_of_video|>"
                    + "<|begin_of_image|><|image|><|image|><|end_of_image|>0"
                    + "<|begin_of_image|><|image|><|image|><|end_of_image|>3<|end_of_video|>")
    with pytest.raises(MediaError, match="1 image and 0 video placeholder"):
        expand_placeholders(IMG, [(1, 2, 2), (1, 2, 2)])


@pytest.mark.parametrize("total,fps,duration", [(100, 30.0, None), (9000, 24.0, 375.0), (7, 25.0, None),
                                                (31, 10.0, 3.1), (1, 30.0, None)])
def test_frame_sampling_matches_transformers(total, fps, duration):
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=total, fps=fps, duration=duration)
    ref = Glm4vVideoProcessor.sample_frames(SimpleNamespace(fps=2, max_duration=300), meta)
    assert sample_frame_indices(total, fps, 2.0, 300.0, duration) == ref.tolist()


# ---- bad input -------------------------------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_raise_media_error():
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(b"this is not an image")
    data = _png(picture(64, 64))
    with pytest.raises(MediaError):
        load_image(data[: len(data) // 2])  # truncated
    with pytest.raises(MediaError, match="no pixels"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(MediaError, match="over the limit"):
        load_image(data, max_input_pixels=1000)
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(2, 4, 1000)
    assert load_image(data).size == (64, 64)


def test_video_file_without_pyav_is_clear(tmp_path):
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(MediaError, match="PyAV"):
            load_video(tmp_path / "clip.mp4")
    else:
        with pytest.raises(MediaError):
            load_video(tmp_path / "missing.mp4")
