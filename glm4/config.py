"""Checkpoint configs: one slotted dataclass per `model_type`, fields = config.json keys (the vision-language
configs nest theirs: `text_config`, `vision_config`).

`load_config(folder_or_dict)` reads config.json, picks the class by `model_type` and normalizes
the two RoPE styles found on the hub (transformers 4.x top-level `rope_theta` /
`partial_rotary_factor` / `rope_scaling`, and 5.x `rope_parameters`). Stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclass(slots=True)
class RopeSpec:
    """Everything `layers/rope.py` needs, derived from a config of any family."""

    head_dim: int
    rotary_dim: int  # leading dims of each head that rotate; the rest pass through
    theta: float
    interleaved: bool  # GPT-J pairs (x[2i], x[2i+1]) vs NeoX halves (x[i], x[i+d/2])
    max_position_embeddings: int
    scaling: dict | None = None  # {"rope_type": "linear"|"dynamic"|"yarn", "factor": ..., ...}
    # 3-D M-RoPE (GLM-4.xV): rotary frequencies split into (temporal, height, width) groups of these sizes
    mrope_section: tuple[int, ...] | None = None


def _norm_scaling(s: dict | None) -> dict | None:
    if not s:
        return None
    s = dict(s)
    kind = s.pop("rope_type", None) or s.pop("type", None) or "default"
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic", "yarn"):
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: linear, dynamic, yarn)")
    if "factor" not in s:
        raise ConfigError(f"rope scaling {kind!r} needs a 'factor'")
    s["rope_type"] = kind
    return s


@dataclass(slots=True)
class _BaseConfig:
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _BaseConfig:
        d = dict(d)
        _lift_rope_parameters(d)
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"{d.get('model_type', cls.__name__)} config is missing required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def eos_token_ids(self) -> list[int]:
        e = getattr(self, "eos_token_id", None)
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [int(e)]


def _lift_rope_parameters(d: dict) -> None:
    """transformers 5.x nests rope settings in `rope_parameters`; lift them to the 4.x keys."""
    rp = d.pop("rope_parameters", None)
    if not rp:
        return
    rp = dict(rp)
    if "rope_theta" in rp:
        d["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:
        d["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        d["rope_scaling"] = rp


@dataclass(slots=True)
class ChatGLMConfig(_BaseConfig):
    """glm-4-9b-chat / -1m, original remote-code layout (`model_type: chatglm`)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    padded_vocab_size: int
    kv_channels: int
    model_type: str = "chatglm"
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    seq_length: int = 131072
    rope_ratio: float = 1.0
    layernorm_epsilon: float = 1.5625e-07
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    rmsnorm: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    eos_token_id: Any = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int | None = 151329
    torch_dtype: str | None = None

    def __post_init__(self):
        if not self.rmsnorm or self.apply_residual_connection_post_layernorm or self.add_bias_linear:
            raise ConfigError("chatglm: only rmsnorm=true, add_bias_linear=false, pre-norm residuals are supported (GLM-4)")

    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def rope(self) -> RopeSpec:
        # remote code: RotaryEmbedding(kv_channels // 2, base=10000 * rope_ratio), GPT-J pairs
        return RopeSpec(self.kv_channels, self.kv_channels // 2, 10000.0 * self.rope_ratio, True,
                        self.seq_length, _norm_scaling(self.rope_scaling))


@dataclass(slots=True)
class EVA2CLIPVisionConfig(_BaseConfig):
    """GLM-4V-9B's EVA2-CLIP tower (`vision_config` of its chatglm config.json): a square `image_size` image, one
    learned position per patch plus a CLS row, post-sublayer LayerNorm blocks; outputs divided by `scaling_factor`."""

    model_type: str = "eva2clip_vision"
    image_size: int = 1120
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    num_positions: int = 6401
    dropout_prob: float = 0.0
    scaling_factor: float = 8.0

    def __post_init__(self):
        side = self.grid_side
        if self.image_size % self.patch_size or side % 2:
            raise ConfigError(f"vision_config: image_size {self.image_size} must be an even number of "
                              f"{self.patch_size}-pixel patches per side (the 2x2 conv halves the grid)")
        if self.num_positions != side * side + 1:
            raise ConfigError(f"vision_config: num_positions {self.num_positions} must be (image_size / patch_size)^2"
                              f" + 1 = {side * side + 1} (one per patch plus the CLS row)")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision_config: hidden_act {self.hidden_act!r} unsupported (only gelu)")
        if self.hidden_size % self.num_heads:
            raise ConfigError("vision_config: hidden_size must be a multiple of num_heads")

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Vectors one image becomes in the language model: boi + (side/2)^2 merged patches + eoi (1602)."""
        return (self.grid_side // 2) ** 2 + 2


@dataclass(slots=True)
class ChatGLMVisionConfig(ChatGLMConfig):
    """GLM-4V-9B: `model_type: chatglm` with a `vision_config` (remote code `visual.py`, `transformer.vision.*`)."""

    vision_config: EVA2CLIPVisionConfig = field(default_factory=EVA2CLIPVisionConfig)
    boi_token_id: int = 151339
    eoi_token_id: int = 151340

    architecture = "chatglm_vision"  # registry key (glm4.models): same model_type, a different model class

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatGLMVisionConfig:
        d = dict(d)
        if isinstance(d.get("vision_config"), dict):
            d["vision_config"] = EVA2CLIPVisionConfig.from_dict(d["vision_config"])
        return _BaseConfig.from_dict.__func__(cls, d)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["vision_config"] = self.vision_config.to_dict()
        return out


@dataclass(slots=True)
class GlmConfig(_BaseConfig):
    """The -hf checkpoints (`model_type: glm`, GlmForCausalLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    model_type: str = "glm"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    eos_token_id: Any = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int | None = 151329
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:  # HF default; set explicitly in real configs
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ConfigError(f"{self.model_type}: hidden_act {self.hidden_act!r} unsupported (only silu)")

    @property
    def rope(self) -> RopeSpec:
        return RopeSpec(self.head_dim, int(self.head_dim * self.partial_rotary_factor), float(self.rope_theta),
                        True, self.max_position_embeddings, _norm_scaling(self.rope_scaling))


@dataclass(slots=True)
class Glm4Config(GlmConfig):
    """GLM-4-0414 (`model_type: glm4`): Glm plus sandwich norms."""

    model_type: str = "glm4"


@dataclass(slots=True)
class Glm4MoeConfig(GlmConfig):
    """GLM-4.5 family (`model_type: glm4_moe`), plus the softmax top-k router GLM-4's MoE is described with.

    `scoring_func` is ours: "sigmoid" (GLM-4.5, with `e_score_correction_bias`) or "softmax"
    (top-k over softmax probabilities, Switch/Mixtral style, trained with a load-balancing loss).
    """

    model_type: str = "glm4_moe"
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    use_qk_norm: bool = False
    num_nextn_predict_layers: int = 0
    scoring_func: str = "sigmoid"
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        GlmConfig.__post_init__(self)
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"glm4_moe: scoring_func {self.scoring_func!r} unsupported (sigmoid, softmax)")
        if self.n_routed_experts % self.n_group:
            raise ConfigError("glm4_moe: n_routed_experts must be divisible by n_group")

    @property
    def rope(self) -> RopeSpec:
        # Glm4Moe rotates NeoX-style halves (rotate_half over the first rotary_dim dims)
        return RopeSpec(self.head_dim, int(self.head_dim * self.partial_rotary_factor), float(self.rope_theta),
                        False, self.max_position_embeddings, _norm_scaling(self.rope_scaling))


# ---- GLM-4.xV: a vision tower and a language half with 3-D M-RoPE (`text_config` / `vision_config`) ----------

def _pop_mrope_section(d: dict) -> list[int] | None:
    """`mrope_section` sits in `rope_parameters` (transformers 5), `rope_scaling` (4.x, type default or mrope) or
    at the top of text_config; take it out so the rest reads as a plain text config."""
    section = d.pop("mrope_section", None)
    for key in ("rope_parameters", "rope_scaling"):
        rp = d.get(key)
        if isinstance(rp, dict) and "mrope_section" in rp:
            rp = dict(rp)
            section = rp.pop("mrope_section")
            if rp.pop("type", None) == "mrope" or rp.get("rope_type") == "mrope":
                rp["rope_type"] = "default"
            d[key] = rp
    return section


def _mrope_text_from_dict(cls, d: dict):
    d = dict(d)
    section = _pop_mrope_section(d)
    if section is not None:
        d["mrope_section"] = [int(x) for x in section]
    return _BaseConfig.from_dict.__func__(cls, d)


def _mrope_spec(cfg, interleaved: bool) -> RopeSpec:
    rotary = int(cfg.head_dim * cfg.partial_rotary_factor)
    if len(cfg.mrope_section) != 3 or sum(cfg.mrope_section) != rotary // 2:
        raise ConfigError(f"{cfg.model_type}: mrope_section {cfg.mrope_section} must be 3 groups summing to "
                          f"rotary_dim/2 = {rotary // 2}")
    if _norm_scaling(cfg.rope_scaling) is not None:
        raise ConfigError(f"{cfg.model_type}: rope scaling together with M-RoPE is unsupported")
    return RopeSpec(cfg.head_dim, rotary, float(cfg.rope_theta), interleaved, cfg.max_position_embeddings, None,
                    tuple(cfg.mrope_section))


@dataclass(slots=True)
class Glm4vTextConfig(Glm4Config):
    """GLM-4.1V / 4.6V-Flash language half: glm4 layers, M-RoPE over interleaved pairs. transformers' default
    `partial_rotary_factor` here is 1.0 (real checkpoints say 0.5)."""

    model_type: str = "glm4v_text"
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])

    from_dict = classmethod(_mrope_text_from_dict)

    @property
    def rope(self) -> RopeSpec:
        return _mrope_spec(self, interleaved=True)


@dataclass(slots=True)
class Glm4vMoeTextConfig(Glm4MoeConfig):
    """GLM-4.5V / 4.6V language half: glm4_moe layers, M-RoPE over NeoX halves."""

    model_type: str = "glm4v_moe_text"
    attention_bias: bool = True
    max_position_embeddings: int = 65536
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])

    from_dict = classmethod(_mrope_text_from_dict)

    @property
    def rope(self) -> RopeSpec:
        return _mrope_spec(self, interleaved=False)


@dataclass(slots=True)
class Glm4vVisionConfig(_BaseConfig):
    """The GLM-4.1V/4.5V/4.6V ViT (`vision_config`); the MLP inside each block is `out_hidden_size` wide and the
    merger's is `intermediate_size`, as in the checkpoints."""

    model_type: str = "glm4v_vision"
    depth: int = 24
    hidden_size: int = 1536
    hidden_act: str = "silu"
    attention_bias: bool = False
    num_heads: int = 12
    in_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "temporal_patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"vision_config.{name} must be one integer, got {getattr(self, name)!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"vision_config: hidden_act {self.hidden_act!r} unsupported (only silu)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError("vision_config: hidden_size / num_heads must be a multiple of 4 (2-D rotary)")


@dataclass(slots=True)
class Glm4vConfig(_BaseConfig):
    """GLM-4.1V-Thinking, GLM-4.6V-Flash (`model_type: glm4v`). The text properties (vocab_size, num_hidden_layers,
    rope, eos_token_ids, ...) read `text_config`, so the engine and generator treat it as a text model."""

    text_config: Glm4vTextConfig
    vision_config: Glm4vVisionConfig = field(default_factory=Glm4vVisionConfig)
    model_type: str = "glm4v"
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    eos_token_id: Any = None
    torch_dtype: str | None = None

    text_config_class = Glm4vTextConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Glm4vConfig:
        d = dict(d)
        for key, sub in (("text_config", cls.text_config_class), ("vision_config", Glm4vVisionConfig)):
            if isinstance(d.get(key), dict):
                d[key] = sub.from_dict(d[key])
        if "text_config" not in d:
            raise ConfigError(f"{d.get('model_type', cls.__name__)} config is missing required field(s): text_config")
        if d.get("tie_word_embeddings") is None:
            d["tie_word_embeddings"] = d["text_config"].tie_word_embeddings
        return _BaseConfig.from_dict.__func__(cls, d)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["text_config"], out["vision_config"] = self.text_config.to_dict(), self.vision_config.to_dict()
        return out

    # the language half's shape, for the engine, generator and trainer
    vocab_size = property(lambda self: self.text_config.vocab_size)
    hidden_size = property(lambda self: self.text_config.hidden_size)
    num_hidden_layers = property(lambda self: self.text_config.num_hidden_layers)
    num_attention_heads = property(lambda self: self.text_config.num_attention_heads)
    num_key_value_heads = property(lambda self: self.text_config.num_key_value_heads)
    head_dim = property(lambda self: self.text_config.head_dim)
    rms_norm_eps = property(lambda self: self.text_config.rms_norm_eps)
    max_position_embeddings = property(lambda self: self.text_config.max_position_embeddings)
    pad_token_id = property(lambda self: self.text_config.pad_token_id)
    rope = property(lambda self: self.text_config.rope)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id if self.eos_token_id is not None else self.text_config.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [int(e)]


@dataclass(slots=True)
class Glm4vMoeConfig(Glm4vConfig):
    """GLM-4.5V, GLM-4.6V (`model_type: glm4v_moe`): the same tower on the GLM-4.5-Air MoE language model."""

    text_config: Glm4vMoeTextConfig
    model_type: str = "glm4v_moe"
    image_token_id: int = 151363
    video_token_id: int = 151364

    text_config_class = Glm4vMoeTextConfig


CONFIGS: dict[str, type[_BaseConfig]] = {
    "chatglm": ChatGLMConfig,
    "glm": GlmConfig,
    "glm4": Glm4Config,
    "glm4_moe": Glm4MoeConfig,
    "glm4v": Glm4vConfig,
    "glm4v_moe": Glm4vMoeConfig,
}

AnyConfig = ChatGLMConfig | ChatGLMVisionConfig | GlmConfig | Glm4Config | Glm4MoeConfig | Glm4vConfig | Glm4vMoeConfig


def config_from_dict(d: dict[str, Any]) -> AnyConfig:
    mt = d.get("model_type")
    if mt is None:
        raise ConfigError("config.json has no 'model_type'")
    if mt not in CONFIGS:
        raise ConfigError(f"unsupported model_type {mt!r}; supported: {', '.join(CONFIGS)}")
    if mt == "chatglm" and d.get("vision_config"):  # GLM-4V-9B
        return ChatGLMVisionConfig.from_dict(d)
    return CONFIGS[mt].from_dict(d)


def load_config(path: str | Path) -> AnyConfig:
    """Read `config.json` from a checkpoint folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return config_from_dict(d)
