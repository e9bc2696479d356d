"""The engine with images (glm4v / glm4v_moe): batched multimodal requests equal a full-recompute greedy loop over the
model (itself checked against transformers in test_vision.py), with prefix caching on, chunk boundaries inside
image spans and preemption; the prefix cache shares blocks for the same image and never for a different one."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from glm4.config import config_from_dict
from glm4.engine import LLM, SamplingParams
from glm4.media.prompt import process
from glm4.models import get_model_class

VOCAB = 160
IDS = {"<|begin_of_image|>": 150, "<|end_of_image|>": 151, "<|begin_of_video|>": 152, "<|end_of_video|>": 153,
       "<|image|>": 154, "<|video|>": 155}
NEW = 6


def encode(text: str) -> list[int]:
    out = []
    for piece in re.split("(" + "|".join(map(re.escape, IDS)) + ")", text):
        out += [IDS[piece]] if piece in IDS else [3 + ord(c) % 130 for c in piece]
    return out


def tiny_vl(kind: str):
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, eos_token_id=[1],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [1, 1, 2]})
    if kind == "glm4v_moe":
        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1)
    cfg = config_from_dict({"model_type": kind, "text_config": text, "image_token_id": 154, "video_token_id": 155,
                            "vision_config": dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48,
                                                  out_hidden_size=64, image_size=28)})
    return randomize_(get_model_class(kind).from_config(cfg).eval(), seed=3)


def picture(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def request(text: str, images):
    out = process(text, images, (), encode)
    mm = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    return out["input_ids"].tolist(), mm


def reference(model, ids, mm, new=NEW):
    """Greedy by recomputing the whole sequence with its images every step."""
    seq = torch.tensor([ids])
    media = {k: torch.from_numpy(v) for k, v in mm.items()}
    with torch.no_grad():
        for _ in range(new):
            nxt = model(seq, **media)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    return seq[0, len(ids):].tolist()


def run(llm, reqs):
    eng = llm.engine
    for i, (ids, mm) in enumerate(reqs):
        eng.add_request(f"r{i}", ids, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
                        multi_modal_data=mm)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(reqs))]


PROMPT = "[user]\n<|begin_of_image|><|image|><|end_of_image|>What is it?[assistant]\n"
TWO = "[user]\n<|begin_of_image|><|image|><|end_of_image|>and<|begin_of_image|><|image|><|end_of_image|>?[assistant]\n"


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
@pytest.mark.parametrize("engine_args", [
    {"block_size": 4},
    {"block_size": 4, "max_num_batched_tokens": 5},  # chunks end inside image spans, mixed with decodes
    {"block_size": 4, "enable_prefix_caching": False},
    {"block_size": 4, "kv_cache_tokens": 64, "max_num_batched_tokens": 7},  # preemption by recompute
], ids=["default", "tiny-chunks", "no-prefix-cache", "preemption"])
def test_multimodal_batch_equals_reference(kind, engine_args):
    model = tiny_vl(kind)
    reqs = [request(PROMPT, [picture(64, 64, 1)]), request(TWO, [picture(100, 60, 2), picture(60, 90, 3)]),
            request(PROMPT, [picture(64, 64, 4)]), (encode("plain text, no image"), None)]
    refs = [reference(model, ids, mm or {}) for ids, mm in reqs]
    outs = run(LLM.from_model(model, linear="torch", **engine_args), reqs)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_prefix_cache_keys_on_image_content():
    model = tiny_vl("glm4v")
    llm = LLM.from_model(model, linear="torch", block_size=4)
    a = request(PROMPT, [picture(64, 64, 1)])
    first_image_token = a[0].index(154)
    (base,) = run(llm, [a])
    assert base.num_cached_tokens == 0
    (same,) = run(llm, [a])  # same text, same picture: everything but the last block comes from the cache
    assert same.num_cached_tokens >= len(a[0]) - 4 and same.outputs[0].token_ids == base.outputs[0].token_ids
    b = request(PROMPT, [picture(64, 64, 9)])  # same tokens, another picture
    assert b[0] == a[0]
    (other,) = run(llm, [b])
    assert other.num_cached_tokens == first_image_token // 4 * 4  # only the blocks before the image are shared
    assert other.outputs[0].token_ids == reference(model, *b)


def test_bad_multimodal_request_is_a_value_error():
    llm = LLM.from_model(tiny_vl("glm4v"), linear="torch", block_size=4)
    ids, mm = request(PROMPT, [picture(64, 64, 1)])
    short = list(ids)
    short.remove(154)  # one image placeholder too few
    with pytest.raises(ValueError, match="placeholder"):
        llm.engine.add_request("x", short, SamplingParams(max_tokens=2), multi_modal_data=mm)
    with pytest.raises(ValueError, match="no image"):
        llm.engine.add_request("y", ids, SamplingParams(max_tokens=2), multi_modal_data={"pixel_values_videos": None})


def count_tower_calls(model) -> list[int]:
    """Wrap the model's image tower; the returned list gets the number of images of every tower call."""
    calls, tower = [], model.image_features

    def counting(pixels, grids):
        calls.append(len(grids))
        return tower(pixels, grids)

    model.image_features = counting
    return calls


def test_encoder_runs_once_per_step_for_all_requests():
    model = tiny_vl("glm4v")
    reqs = [request(PROMPT, [picture(64, 64, 1)]), request(TWO, [picture(100, 60, 2), picture(60, 90, 3)])]
    refs = [reference(model, ids, mm) for ids, mm in reqs]
    calls = count_tower_calls(model)
    outs = run(LLM.from_model(model, linear="torch", block_size=4), reqs)
    assert calls == [3]  # both prompts fit the first step: their three images in one tower call
    assert [o.outputs[0].token_ids for o in outs] == refs
