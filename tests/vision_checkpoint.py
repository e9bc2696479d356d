"""A tiny random GLM-4.1V-style checkpoint folder with a real tokenizer, for chat / server tests of vision models.

transformers' Glm4vForConditionalGeneration (save_pretrained) + a byte-level BPE tokenizer.json whose added special
tokens are GLM-4's plus the vision ones; the config's image / video token ids are the tokenizer's."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

VISION_SPECIALS = ("<|image|>", "<|video|>", "<|begin_of_box|>", "<|end_of_box|>")
CORPUS = ["What is in this picture? A red square and a blue circle.", "图里有什么？一个红色的正方形。",
          "<think>I see shapes.</think><answer>A square.</answer>", "Describe the image briefly, please."] * 20


def write_tokenizer(folder: Path) -> dict[str, int]:
    """tokenizer.json in `folder`; returns the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm4.tokenizer import GLM4_SPECIAL_TOKENS

    specials = list(GLM4_SPECIAL_TOKENS) + list(VISION_SPECIALS)
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    t.save(str(folder / "tokenizer.json"))
    return {s: t.token_to_id(s) for s in specials}


def write_checkpoint(folder: Path, kind: str = "glm4v", seed: int = 1) -> Path:
    import transformers
    from conftest import randomize_

    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=0,
                eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [1, 1, 2]})
    if kind == "glm4v_moe":
        text.update(attention_bias=True, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True)
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  image_size=28, spatial_merge_size=2, temporal_patch_size=2, rms_norm_eps=1e-5)
    token_ids = dict(image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                     image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                     video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    if kind == "glm4v_moe":
        cfg = transformers.Glm4vMoeConfig(text_config=text, vision_config=vision, **token_ids)
        model = transformers.Glm4vMoeForConditionalGeneration(cfg)
    else:
        cfg = transformers.Glm4vConfig(text_config=text, vision_config=vision, **token_ids)
        model = transformers.Glm4vForConditionalGeneration(cfg)
    randomize_(model.float().eval(), seed=seed)
    model.save_pretrained(folder)
    return folder


def picture(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image | bytes, mime: str = "image/png") -> str:
    raw = img if isinstance(img, bytes) else png_bytes(img)
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


# fixtures for the test modules that import them
@pytest.fixture(scope="module", name="llm")
def vision_llm(tmp_path_factory):
    from glm4.engine import LLM

    return LLM(write_checkpoint(tmp_path_factory.mktemp("v") / "glm4v"), linear="torch", block_size=4)


@pytest.fixture(scope="module", name="planner")
def vision_planner(llm):
    from glm4.engine.chat import chat_layer_for

    return chat_layer_for(llm)[0]
