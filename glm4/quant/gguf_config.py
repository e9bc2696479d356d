"""The glm4 config a GGUF header describes: `gguf_config(header)` (llama.cpp's metadata keys -> config.json
fields of chatglm / glm / glm4 / glm4_moe; see glm4.quant.gguf for the architectures and tensor names)."""

from __future__ import annotations

from glm4.config import ConfigError, config_from_dict
from glm4.tokenizer import CHAT_EOS_TOKENS
from glm4.tokenizer.gguf_meta import GGUFHeader
from glm4.weights import CheckpointError

__all__ = ["ARCHITECTURES", "gguf_config"]

ARCHITECTURES = ("chatglm", "glm4", "glm4moe")


def _fail(path, msg: str):
    raise CheckpointError(f"{path}: {msg}")


def _scalar(hdr: GGUFHeader, key: str, default=None, required: bool = False):
    v = hdr.arch_key(key, default)
    if v is None and required:
        _fail(hdr.path, f"metadata {hdr.architecture}.{key} is missing")
    if isinstance(v, list):  # per-layer arrays (llama.cpp allows them): only a uniform value maps to our configs
        if len(set(v)) != 1:
            _fail(hdr.path, f"metadata {hdr.architecture}.{key} differs between layers ({v[:8]}...); unsupported")
        v = v[0]
    return v


def _rope_scaling(hdr: GGUFHeader) -> dict | None:
    kind = hdr.arch_key("rope.scaling.type")
    factor = hdr.arch_key("rope.scaling.factor") or hdr.arch_key("rope.scale_linear")
    if kind in (None, "none") and not (kind is None and factor):
        return None
    kind = kind or "linear"
    if kind not in ("linear", "yarn"):
        _fail(hdr.path, f"rope scaling {kind!r} is not supported (linear, yarn)")
    s = {"rope_type": kind, "factor": float(factor or 1.0)}
    extra = {"original_max_position_embeddings": "rope.scaling.original_context_length",
             "attention_factor": "rope.scaling.yarn_attn_factor", "beta_fast": "rope.scaling.yarn_beta_fast",
             "beta_slow": "rope.scaling.yarn_beta_slow"}
    s.update({k: hdr.arch_key(v) for k, v in extra.items() if kind == "yarn" and hdr.arch_key(v) is not None})
    return s


def _special_ids(hdr: GGUFHeader) -> tuple[list[int], int | None]:
    tokens = hdr.metadata.get("tokenizer.ggml.tokens") or []
    want = set(CHAT_EOS_TOKENS)
    found = {t: i for i, t in enumerate(tokens) if t in want}
    eos = [found[t] for t in CHAT_EOS_TOKENS if t in found]
    for key in ("eos", "eot", "eom"):
        i = hdr.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and i not in eos:
            eos.append(i)
    pad = hdr.metadata.get("tokenizer.ggml.padding_token_id")
    return eos, pad if isinstance(pad, int) else (eos[0] if eos else None)


def gguf_config(hdr: GGUFHeader):
    """The glm4 config (glm4.config) a GGUF header describes."""
    try:
        return config_from_dict(_config_dict(hdr))
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:  # missing or ill-typed metadata
        _fail(hdr.path, f"metadata does not describe a supported {hdr.architecture} model: {e}")


def _config_dict(hdr: GGUFHeader) -> dict:
    arch, t, path = hdr.architecture, hdr.tensors, hdr.path
    if arch not in ARCHITECTURES:
        _fail(path, f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if "token_embd.weight" not in t:
        _fail(path, "missing tensor 'token_embd.weight'")
    nextn = _scalar(hdr, "nextn_predict_layers", 0)
    layers = _scalar(hdr, "block_count", required=True) - nextn
    hidden, heads = _scalar(hdr, "embedding_length", required=True), _scalar(hdr, "attention.head_count", required=True)
    kv = _scalar(hdr, "attention.head_count_kv", heads)
    head_dim = _scalar(hdr, "attention.key_length", hidden // heads)
    rope_dim = _scalar(hdr, "rope.dimension_count", head_dim // 2)
    theta = float(_scalar(hdr, "rope.freq_base", 10000.0))
    eos, pad = _special_ids(hdr)
    has = lambda name: f"blk.0.{name}" in t  # noqa: E731
    d = dict(vocab_size=t["token_embd.weight"].shape[0], hidden_size=hidden, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
             partial_rotary_factor=rope_dim / head_dim, rope_theta=theta, rope_scaling=_rope_scaling(hdr),
             rms_norm_eps=_scalar(hdr, "attention.layer_norm_rms_epsilon", required=True),
             max_position_embeddings=_scalar(hdr, "context_length"), intermediate_size=_scalar(hdr, "feed_forward_length"),
             attention_bias=has("attn_q.bias") or has("attn_qkv.bias"), tie_word_embeddings="output.weight" not in t,
             eos_token_id=eos, pad_token_id=pad)
    # chatglm's layout needs fused q|k|v, half-head rotary and a base that 10000 * rope_ratio reproduces exactly
    if arch == "chatglm" and has("attn_qkv.weight") and rope_dim == head_dim // 2 and theta / 1e4 * 1e4 == theta:
        d = dict(model_type="chatglm", hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                 ffn_hidden_size=d["intermediate_size"], padded_vocab_size=d["vocab_size"], kv_channels=head_dim,
                 multi_query_attention=kv != heads, multi_query_group_num=kv, seq_length=d["max_position_embeddings"],
                 rope_ratio=theta / 10000.0, layernorm_epsilon=d["rms_norm_eps"], rope_scaling=d["rope_scaling"],
                 add_qkv_bias=d["attention_bias"] or has("attn_q.bias"), tie_word_embeddings=d["tie_word_embeddings"],
                 eos_token_id=eos, pad_token_id=pad)
    elif arch == "chatglm":
        d["model_type"] = "glm"
    elif arch == "glm4":
        d["model_type"] = "glm4"
    else:
        gating = _scalar(hdr, "expert_gating_func", 2)  # llama.cpp: unset means sigmoid for glm4moe
        if gating not in (1, 2):
            _fail(path, f"{arch}.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
        d.update(model_type="glm4_moe", moe_intermediate_size=_scalar(hdr, "expert_feed_forward_length", required=True),
                 n_routed_experts=_scalar(hdr, "expert_count", required=True),
                 num_experts_per_tok=_scalar(hdr, "expert_used_count", required=True),
                 n_shared_experts=_scalar(hdr, "expert_shared_count", 0),
                 first_k_dense_replace=_scalar(hdr, "leading_dense_block_count", 0),
                 routed_scaling_factor=float(_scalar(hdr, "expert_weights_scale", 1.0)),
                 norm_topk_prob=bool(_scalar(hdr, "expert_weights_norm", False)),
                 n_group=_scalar(hdr, "expert_group_count", 1), topk_group=_scalar(hdr, "expert_group_used_count", 1),
                 use_qk_norm=has("attn_q_norm.weight"), num_nextn_predict_layers=nextn,
                 scoring_func="sigmoid" if gating == 2 else "softmax")
    return d
