"""The shipped default model (glm4/assets/default): files, config schema, tokenizer, chat prompt, forward, generation.

Skips when the asset is not built yet (recipes/default/ builds it). GLM4_DEFAULT_ASSET overrides the folder.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import torch

ASSET = Path(os.environ.get("GLM4_DEFAULT_ASSET", Path(__file__).parent.parent / "glm4" / "assets" / "default"))
FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
         "MODEL_CARD.md")
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]

pytestmark = pytest.mark.skipif(not (ASSET / "model.safetensors").exists(),
                                reason=f"default model not built yet ({ASSET})")


@pytest.fixture(scope="module")
def tok():
    from glm4.tokenizer import load_tokenizer

    return load_tokenizer(ASSET)


@pytest.fixture(scope="module")
def model():
    from glm4.weights import load_model

    return load_model(ASSET, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fmt():
    from glm4.chat import ChatFormat

    tpl = json.loads((ASSET / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    return ChatFormat("chatglm", tpl)


def test_files_present_and_small():
    for name in FILES:
        assert (ASSET / name).is_file(), name
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"asset is {size / 2**20:.1f} MiB"


def test_config_schema():
    from glm4.config import Glm4MoeConfig, load_config

    raw = json.loads((ASSET / "config.json").read_text())
    cfg = load_config(ASSET)
    assert isinstance(cfg, Glm4MoeConfig)
    assert raw["model_type"] == "glm4_moe" and raw["architectures"] == ["Glm4MoeForCausalLM"]
    # GLM-4.5's checkpoint keys are all there, with the softmax top-2 router of 8 experts
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "partial_rotary_factor", "rope_theta", "rms_norm_eps",
                "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor", "eos_token_id", "pad_token_id",
                "tie_word_embeddings", "torch_dtype", "max_position_embeddings"):
        assert key in raw, key
    assert (cfg.scoring_func, cfg.n_routed_experts, cfg.num_experts_per_tok) == ("softmax", 8, 2)
    assert cfg.router_aux_loss_coef > 0
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.rope.rotary_dim < cfg.head_dim  # partial RoPE
    gen = json.loads((ASSET / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw["eos_token_id"]


def test_tokenizer_file_format_and_specials(tok):
    lines = (ASSET / "tokenizer.model").read_text(encoding="ascii").splitlines()
    ranks = [int(line.split()[1]) for line in lines]
    assert ranks == list(range(len(lines)))
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert len(set(tokens)) == len(tokens) and all(bytes([b]) in set(tokens) for b in range(256))
    n = len(lines)
    assert [tok.special_tokens[s] for s in GLM4_SPECIALS] == list(range(n, n + 14))
    assert tok.vocab_size == n + 14
    cfg = json.loads((ASSET / "config.json").read_text())
    assert tok.vocab_size <= cfg["vocab_size"]
    assert sorted(tok.eos_token_ids) == sorted(cfg["eos_token_id"])


def test_tokenizer_roundtrip(tok):
    for text in ["你好，世界！今天天气很好。", "It is a truth universally acknowledged.", '{"city": "北京"}\n    x',
                 "emoji 😀 and <|user|> as plain text"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.special_tokens["<|user|>"] not in tok.encode("<|user|>")  # special strings in text stay text


def test_chat_prompt_renders_and_encodes(tok, fmt):
    msgs = [{"role": "user", "content": "你好"}]
    assert fmt.render(msgs) == "[gMASK]<sop><|user|>\n你好<|assistant|>"
    ids = fmt.encode(tok, msgs)
    sp = tok.special_tokens
    assert ids[:3] == [sp["[gMASK]"], sp["<sop>"], sp["<|user|>"]] and ids[-1] == sp["<|assistant|>"]
    assert tok.decode(ids[3:-1]) == "\n你好"
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    with_tools = [{"role": "system", "content": "", "tools": tools}, *msgs]
    # the shipped template is glm-4-9b-chat's: it renders exactly like the built-in chatglm format
    from glm4.chat import ChatFormat

    assert fmt.render(with_tools) == ChatFormat("chatglm").render(with_tools)
    assert fmt.encode(tok, with_tools).count(sp["<|system|>"]) == 1
    _, calls = fmt.parse('get_weather\n{"city": "北京"}', tools)
    assert calls[0]["function"]["name"] == "get_weather"


def test_forward(model, tok):
    ids = torch.tensor([[tok.special_tokens["[gMASK]"], tok.special_tokens["<sop>"]] + tok.encode("话说天下大势")])
    logits, router = model(ids, return_router_logits=True)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    n_moe = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert len(router) == n_moe and router[0].shape == (ids.shape[1], 8)


def test_greedy_generation_matches_full_recompute(model, tok, fmt):
    from glm4.reference import generate

    ids = fmt.encode(tok, [{"role": "user", "content": "你好"}])
    eos = tok.eos_token_ids
    out = generate(model, torch.tensor([ids]), max_new_tokens=6, temperature=0.0, eos_token_ids=eos)
    new = out[0, len(ids):].tolist()
    assert 1 <= len(new) <= 6 and all(0 <= t < model.config.vocab_size for t in new)
    # KV-cached greedy decoding == argmax over a full forward of the growing sequence (stopping at an EOS id)
    seq = list(ids)
    with torch.no_grad():
        while len(seq) - len(ids) < 6 and (len(seq) == len(ids) or seq[-1] not in eos):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(ids):] == new
    assert isinstance(tok.decode(new), str)


def test_model_card_reports_numbers():
    card = (ASSET / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needle in ("perplexity", "live_simple", "format validity", "correct function", "active", "license"):
        assert needle.lower() in card.lower(), needle
    if "training_curves.png" in card:
        assert (ASSET / "training_curves.png").is_file()
