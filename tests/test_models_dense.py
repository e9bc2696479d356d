"""Parity of the dense models (glm, glm4, chatglm) with transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, rewrite_config, to_chatglm

import glm4
from glm4.config import RopeSpec
from glm4.layers.attention import Causal, KVCache
from glm4.layers.rope import Rope, apply_rope

TOL = 1e-4  # fp32 logits, max abs diff


def _ids(B: int, T: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _ref_logits(ref, ids, attention_mask=None):
    with torch.no_grad():
        return ref(ids, attention_mask=attention_mask).logits


def _max_diff(model, ref, ids) -> float:
    with torch.no_grad():
        return (model(ids) - _ref_logits(ref, ids)).abs().max().item()


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_logits_and_greedy_match_transformers(hf_checkpoint, model_type):
    folder, ref = hf_checkpoint(model_type)
    model = glm4.load_model(folder)
    assert type(model).__name__ == {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}[model_type]
    ids = _ids(2, 24)
    diff = _max_diff(model, ref, ids)
    print(f"{model_type}: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    prompt = ids[:1, :8]
    expected = hf_greedy(ref, prompt, 32)
    got = glm4.generate(model, prompt, max_new_tokens=32, eos_token_ids=[])
    assert got.shape == (1, 40)
    assert torch.equal(got, expected)


def test_sharded_checkpoint(hf_checkpoint):
    folder, ref = hf_checkpoint("glm4", max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    model = glm4.load_model(folder)
    assert _max_diff(model, ref, _ids(1, 16)) <= TOL


def test_transformers_4x_style_config(hf_checkpoint):
    rp = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 5e5,
          "partial_rotary_factor": 0.5}
    folder, ref = hf_checkpoint("glm4", rope_parameters=rp, max_position_embeddings=128)

    def to_4x(d):
        p = d.pop("rope_parameters")
        d["rope_theta"] = p.pop("rope_theta")
        d["partial_rotary_factor"] = p.pop("partial_rotary_factor")
        p["type"] = p.pop("rope_type")  # 4.x spelled it "type"
        d["rope_scaling"] = p
        d["torch_dtype"] = d.pop("dtype", "float32")

    d = rewrite_config(folder, to_4x)
    assert "rope_parameters" not in d and d["rope_scaling"]["type"] == "yarn"
    model = glm4.load_model(folder)
    assert model.config.rope.theta == 5e5 and model.config.rope.scaling["rope_type"] == "yarn"
    assert _max_diff(model, ref, _ids(1, 80)) <= TOL


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.3},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_rope_scaling_past_original_length(hf_checkpoint, scaling):
    # dynamic grows its base once positions pass max_position_embeddings (48), so go past that too
    rp = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **scaling}
    folder, ref = hf_checkpoint("glm", rope_parameters=rp, max_position_embeddings=48)
    model = glm4.load_model(folder)
    ids = _ids(1, 72, seed=1)
    assert _max_diff(model, ref, ids) <= TOL
    # greedy decoding that crosses the original length token by token (KV cache + per-step rope)
    prompt = ids[:, :40]
    assert torch.equal(glm4.generate(model, prompt, max_new_tokens=24, eos_token_ids=[]),
                       hf_greedy(ref, prompt, 24))


def test_chatglm_original_layout_matches_glm(hf_checkpoint, tmp_path):
    rp = {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}  # rope_ratio 5
    folder, ref = hf_checkpoint("glm", rope_parameters=rp)
    chat = to_chatglm(folder, tmp_path / "chatglm")
    model = glm4.load_model(chat)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert model.config.rope.theta == 50000.0
    names = set(model.checkpoint_state_dict())
    assert "transformer.encoder.layers.0.self_attention.query_key_value.bias" in names
    ids = _ids(2, 24)
    diff = _max_diff(model, ref, ids)
    print(f"chatglm: max |logits diff| = {diff:.3g}")
    assert diff <= TOL
    prompt = ids[:1, :8]
    assert torch.equal(glm4.generate(model, prompt, max_new_tokens=32, eos_token_ids=[]), hf_greedy(ref, prompt, 32))


def test_tied_embeddings_and_mha_without_bias(hf_checkpoint):
    folder, ref = hf_checkpoint("glm", tie_word_embeddings=True, attention_bias=False, num_key_value_heads=4)
    model = glm4.load_model(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert _max_diff(model, ref, _ids(1, 16)) <= TOL


@pytest.mark.parametrize("model_type", ["glm", "glm4"])
def test_left_padded_rows_match_unbatched(hf_checkpoint, model_type):
    folder, ref = hf_checkpoint(model_type)
    model = glm4.load_model(folder)
    lens = [12, 7, 3]
    T = max(lens)
    rows = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lens)]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, positions=positions, ctx=Causal(key_mask=mask.bool()))
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (batched[i, T - len(r):] - alone).abs().max().item() <= 1e-5
            # and transformers agrees on the padded batch
            ref_rows = _ref_logits(ref, ids, attention_mask=mask)
            assert (batched[i, T - len(r):] - ref_rows[i, T - len(r):]).abs().max().item() <= TOL


@pytest.mark.parametrize("last_rows_only", [False, True])
def test_kv_cache_decoding_equals_full_recompute(hf_checkpoint, last_rows_only):
    folder, _ = hf_checkpoint("glm4")
    model = glm4.load_model(folder)
    cfg = model.config
    ids = _ids(2, 20, seed=3)
    P = 8
    cache = KVCache(cfg.num_hidden_layers, 2, 20, cfg.num_key_value_heads, cfg.head_dim)
    with torch.no_grad():
        full = model(ids)
        if last_rows_only:  # the prompt's last rows only: the last layer's K / V must still cover every position
            first = model(ids[:, :P], positions=torch.arange(P).expand(2, P), ctx=cache,
                          logits_indices=torch.tensor([P - 1, 2 * P - 1]))
            assert (first - full[:, P - 1]).abs().max().item() <= 1e-5
            step = []
        else:
            step = [model(ids[:, :P], positions=torch.arange(P).expand(2, P), ctx=cache)]
        cache.advance(P)
        for t in range(P, 20):
            step.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), ctx=cache))
            cache.advance(1)
    got = torch.cat(step, dim=1)  # [2, 20] or, after the last rows only, the 12 decoded positions
    assert (got - full[:, -got.shape[1]:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["glm", "glm4", "glm4_moe", "chatglm"])
def test_logits_indices_run_the_last_layer_on_those_rows_only(hf_checkpoint, tmp_path, model_type):
    folder, _ = hf_checkpoint("glm" if model_type == "chatglm" else model_type)
    if model_type == "chatglm":
        folder = to_chatglm(folder, tmp_path / "chatglm")
    model = glm4.load_model(folder)
    layers = model.transformer.encoder.layers if model_type == "chatglm" else model.model.layers
    mlp_rows = []  # rows each layer's MLP ran on, in order
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda m, args: mlp_rows.append(args[0].numel() // args[0].shape[-1]))
    ids = _ids(3, 10)
    idx = torch.tensor([9, 19, 29, 4])
    with torch.no_grad():
        full = model(ids).reshape(30, -1)
        assert mlp_rows == [30] * len(layers)
        mlp_rows.clear()
        part = model(ids, logits_indices=idx)
    assert mlp_rows == [30] * (len(layers) - 1) + [4]
    assert part.shape == (4, 128)
    torch.testing.assert_close(part, full[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(hf_checkpoint, dtype):
    folder, ref = hf_checkpoint("glm4")
    model = glm4.load_model(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref_sd = ref.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_sd[name].to(dtype)), name
    with torch.no_grad():
        logits = model(_ids(1, 12))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_two_d_positions_rotate_each_half():
    spec = RopeSpec(head_dim=16, rotary_dim=8, theta=10000.0, interleaved=True, max_position_embeddings=64)
    half = RopeSpec(head_dim=8, rotary_dim=4, theta=10000.0, interleaved=True, max_position_embeddings=64)
    x = torch.randn(2, 5, 3, 16)
    p1, p2 = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 5))
    out = apply_rope(x, Rope(spec).cos_sin(torch.stack([p1, p2], -1)))
    h = Rope(half)
    assert torch.equal(out[..., :4], apply_rope(x[..., :4], h.cos_sin(p1))[..., :4])
    assert torch.equal(out[..., 4:8], apply_rope(x[..., 4:8], h.cos_sin(p2))[..., :4])
    assert torch.equal(out[..., 8:], x[..., 8:])
    # (p, 0) differs from plain 1-D positions: the second half does not turn
    assert not torch.allclose(out, apply_rope(x, Rope(spec).cos_sin(p1)))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_is_relative(interleaved):
    # <rope(q, m), rope(k, n)> depends only on m - n
    spec = RopeSpec(head_dim=16, rotary_dim=16, theta=10000.0, interleaved=interleaved, max_position_embeddings=64)
    r = Rope(spec)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        cq, ck = r.cos_sin(torch.tensor([[m]]), torch.float64), r.cos_sin(torch.tensor([[n]]), torch.float64)
        return (apply_rope(q, cq) * apply_rope(k, ck)).sum().item()

    assert abs(score(7, 3) - score(30, 26)) < 1e-5
    assert abs(score(7, 3) - score(7, 4)) > 1e-3


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_table_rows_equal_the_tables_computed_for_those_positions(interleaved, dtype):
    # cos_sin looks rows up in tables of every position (grown as positions grow); each row must be, bit for bit,
    # what computing the tables for that position alone gives (decode: one position a sequence)
    spec = RopeSpec(head_dim=64, rotary_dim=32, theta=10000.0, interleaved=interleaved, max_position_embeddings=1 << 20)
    r = Rope(spec)
    cases = [torch.tensor([[5]]), torch.tensor([[300], [7]]), torch.arange(1000, 1700)[None],
             torch.tensor([[4095], [0], [65535]]), torch.tensor([[70000]])]  # the last past the tables: computed
    for pos in cases:
        got = r.cos_sin(pos, dtype)
        want = r._compute(pos, spec.rotary_dim, dtype, 0)
        assert got.cos.shape == want[0].shape == (*pos.shape, 1, 32)
        assert torch.equal(got.cos, want[0]) and torch.equal(got.sin, want[1])
    assert r._tables[(32, dtype)][0].shape[0] == 65536  # grown to the largest position looked up


def test_model_forward_defaults_and_grad(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    model = glm4.load_model(folder)
    ids = _ids(2, 6)
    with torch.no_grad():
        a = model(ids)
        b = model(ids, positions=torch.arange(6).expand(2, 6), ctx=Causal())
    assert torch.equal(a, b) and a.shape == (2, 6, 128)
    model.train()
    model(ids).sum().backward()  # trainable: every parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_two_d_positions_through_the_model(hf_checkpoint):
    folder, _ = hf_checkpoint("glm")
    model = glm4.load_model(folder)
    ids = _ids(2, 7)
    p1 = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        flat = model(ids, positions=p1)
        two = model(ids, positions=torch.stack([p1, torch.zeros_like(p1)], -1))
        two_b = model(ids, positions=torch.stack([p1, p1], -1))
    assert two.shape == flat.shape and torch.isfinite(two).all()
    assert not torch.allclose(two, two_b)  # the second coordinate is used
