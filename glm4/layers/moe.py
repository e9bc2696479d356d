"""Mixture-of-experts pieces: a pure router, stacked SwiGLU experts, and the training losses.

- `route(logits, top_k, ...)` -> (indices [N, k], weights [N, k]) for GLM-4.5 sigmoid routing
  (correction bias used only for the choice, group-limited top-k, routed scaling) and for softmax
  top-k routing (GLM-4's MoE as publicly described: softmax gate, top-2, renormalized).
- `StackedExperts`: `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`; `expert_glu` dispatches tokens by
  sorting the N*k (token, expert) pairs by expert so each expert sees one contiguous segment.
- `load_balancing_loss`, `router_z_loss`, `expert_counts` for training and logging.

Dispatch: the sorted pairs go through `torch._grouped_mm` (one kernel for all experts, no host sync)
when the build and the tensors allow it, else through one matmul per *non-empty* segment (one host
sync for the segment sizes). Never a loop over all E experts. On CPU both run at the same speed
(`benchmarks/bench_moe.py`); grouped_mm is what makes the layer capturable on GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCORING = ("sigmoid", "softmax")


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `top_k` experts per token from router logits [N, E] (computed in fp32).

    sigmoid (GLM-4.5): s = sigmoid(logits); the choice ranks s + correction_bias, first keeping the
    `topk_group` best of `n_group` groups (group score = sum of its two best biased scores); the
    weights are the *unbiased* s of the chosen experts.
    softmax: s = softmax(logits); choice ranks s (no bias).
    Both: weights ÷ (sum + 1e-20) when `norm_topk_prob`, then × `routed_scaling_factor`.
    Returns indices [N, k] (int64) and fp32 weights [N, k].
    """
    if scoring_func not in SCORING:
        raise ValueError(f"scoring_func must be one of {SCORING}, got {scoring_func!r}")
    N, E = logits.shape
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in 1..{E}")
    if E % n_group or not 0 < topk_group <= n_group:
        raise ValueError(f"need n_group | E and 0 < topk_group <= n_group (E={E}, n_group={n_group}, topk_group={topk_group})")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (E // n_group)} experts of the kept groups")
    logits = logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(N, n_group, E // n_group)  # [N, G, E/G]
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [N, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    indices = choice.topk(top_k, dim=-1).indices  # [N, k]
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, weights * routed_scaling_factor


def _grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    # The kernel needs 16-byte aligned rows and base pointers; on CUDA it is bf16-only (SM80+).
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[-2:] if s != 1):
            return False
    dev = tensors[0].device
    if dev.type == "cuda":
        return tensors[0].dtype == torch.bfloat16 and torch.cuda.get_device_capability(dev) >= (8, 0)
    return dev.type == "cpu"


def _segment_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # x [S, in] sorted by expert, w [E, out, in]; one matmul per expert that received tokens
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append(x[start:start + c] @ w[e].T)
            start += c
    return torch.cat(out) if out else x.new_zeros(0, w.shape[1])


def dispatch_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                     experts_mm: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor], num_experts: int,
                     hidden: int, combine: Callable | None = None) -> torch.Tensor:
    """Σ_j weights[n, j] · down[e] (silu(gate[e] x_n) * up[e] x_n) with e = indices[n, j], for any expert storage.

    x [N, H], indices/weights [N, k] -> [N, hidden]. The (token, slot) pairs are sorted by expert and handed to
    `experts_mm(xs [S, in], counts [E], "gate_up" | "down") -> [S, out]`, which multiplies each expert's rows by its
    own weight (one call per projection, no loop over experts here). `combine(y [S, hidden], order [S], weights
    [N, k]) -> [N, hidden]`, if given, replaces the weighted sum below (the same sums, e.g. as one kernel)."""
    N, k = indices.shape
    flat = indices.reshape(-1)  # [N*k]
    order = flat.argsort(stable=True)  # pairs grouped by expert
    xs = x[order // k]  # [N*k, H]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    g, u = experts_mm(xs, counts, "gate_up").chunk(2, dim=-1)
    y = experts_mm((F.silu(g) * u).contiguous(), counts, "down")  # [N*k, H]
    if combine is not None:
        return combine(y, order, weights).to(x.dtype)
    y = y * weights.reshape(-1)[order, None]  # fp32 weights: the weighted sum is accumulated in fp32
    out = torch.empty_like(y)
    out[order] = y  # back to (token, slot) order
    return out.view(N, k, hidden).sum(dim=1).to(x.dtype)


class _StackedMM:
    """experts_mm over stacked [E, out, in] tensors: torch's grouped matmul, else one matmul per busy expert."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, impl: str):
        self.w = {"gate_up": gate_up, "down": down}
        self.impl = impl

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor, which: str) -> torch.Tensor:
        w = self.w[which]
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if _grouped_mm_ok(xs, *self.w.values()) else "segments"
        if impl == "grouped_mm":
            return torch._grouped_mm(xs, w.transpose(1, 2), offs=counts.cumsum(0, dtype=torch.int32))
        if impl == "segments":
            return _segment_mm(xs, w, counts.tolist())
        raise ValueError(f"impl must be auto, grouped_mm or segments, got {impl!r}")


def expert_glu(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """dispatch_experts over stacked tensors: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
    `impl`: "auto" | "grouped_mm" | "segments"."""
    if impl not in ("auto", "grouped_mm", "segments"):
        raise ValueError(f"impl must be auto, grouped_mm or segments, got {impl!r}")
    return dispatch_experts(x, indices, weights, _StackedMM(gate_up, down, impl), gate_up.shape[0], down.shape[1])


class StackedExperts(nn.Module):
    """E SwiGLU experts as two stacked tensors (names = transformers' fused layout)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.impl = "auto"

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_glu(x, indices, weights, self.gate_up_proj, self.down_proj, self.impl)


def _cat_logits(router_logits: torch.Tensor | Sequence[torch.Tensor], token_mask: torch.Tensor | None) -> torch.Tensor:
    # [N, E] or a list of L per-layer [N, E] -> [L*N', E] fp32, keeping only tokens where token_mask [N] is true
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits is empty")
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool()
        if any(r.shape[0] != keep.shape[0] for r in layers):
            raise ValueError(f"token_mask has {keep.shape[0]} tokens, router logits have {[r.shape[0] for r in layers]}")
        layers = [r[keep] for r in layers]
    return torch.cat([r.float() for r in layers], dim=0)


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E · Σ_e f_e · P_e over all tokens (and layers, if a list).

    f_e = share of the N·k routing assignments that go to expert e (top-k of the softmax), P_e = mean
    softmax probability of e. Both sum to 1, so perfectly uniform routing gives exactly 1.0.
    (transformers' `load_balancing_loss_func` counts f over tokens, not assignments: it is k × this.)
    `token_mask` [B*T] (e.g. the attention mask flattened) drops padding tokens.
    """
    logits = _cat_logits(router_logits, token_mask)
    if logits.shape[-1] != num_experts:
        raise ValueError(f"router logits have {logits.shape[-1]} experts, expected {num_experts}")
    probs = logits.softmax(dim=-1)  # [N, E]
    chosen = probs.topk(top_k, dim=-1).indices
    f = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k  # [E], no gradient (as in Switch)
    return num_experts * (f * probs.mean(0)).sum()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)², keeps router logits small."""
    return _cat_logits(router_logits, token_mask).logsumexp(dim=-1).square().mean()


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: indices [N, k] -> LongTensor [E]."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)
