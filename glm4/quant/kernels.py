"""What this CPU has, and the one place that picks a kernel for each linear.

`glm4.quant._C` (glm4/quant/csrc/, built by `pip install -e .`) holds weight-streaming kernels for small M
(decode): dense fp32 / bf16 / fp16 weights and grouped int8 / int4 weights, widened to fp32 in registers with
fp32 accumulation. One set is compiled for AVX2 + FMA + F16C (any x86-64 since Haswell / Zen 1), one for AVX-512
with VNNI (Zen 4 / 5, Ice Lake and later: integer weights against int16 activations by vpdpwssd); the op picks
per call what the CPU has. Where neither runs, and without a compiler at install time, torch's own kernels run.
Large M (prefill) goes through an fp32 GEMM: glm4's own (AVX2, the weight widened while it is packed) on AVX2-only
AMD CPUs, else oneDNN / MKL with the weight widened a chunk at a time.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch

try:  # built by setup.py; optional
    from glm4.quant import _C  # noqa: F401  (loading it registers torch.ops.glm4.*)
    HAVE_EXT = True
except ImportError:
    HAVE_EXT = False

if HAVE_EXT and os.environ.get("GLM4_ISA"):  # e.g. GLM4_ISA=avx2 on an AVX-512 CPU: compare the kernel sets
    if os.environ["GLM4_ISA"] in ("avx2", "avx512_vnni"):
        torch.ops.glm4.set_isa(os.environ["GLM4_ISA"])
    else:
        warnings.warn(f"GLM4_ISA={os.environ['GLM4_ISA']!r} ignored: avx2 or avx512_vnni", stacklevel=1)


class _Ops:
    """torch.ops.glm4's ops by their one overload (`ops.quant_mm` is torch.ops.glm4.quant_mm.default): a call
    through the overload packet matches the arguments against every schema first, ~4 us of an 8 us call on a
    [1, K] input (Zen 5), and a decode step makes ~70 such calls."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.glm4, name).default
        setattr(self, name, op)  # found once; later reads are plain attribute reads
        return op


ops = _Ops()

__all__ = ["ACTIVATIONS", "HAVE_EXT", "activations", "argmax", "cpu_features", "cpu_summary", "cpu_vendor", "dense_isa", "dense_max_m",
           "dequant_gemm", "gemm", "gemm_chunk_rows", "gemm_kernel", "gemm_rows", "has_streaming_kernels", "int8_activations",
           "int8_gemm", "max_m",
           "native_bf16", "ops", "own_gemm", "quant_isa", "quant_mm", "set_activations"]

# flags that decide kernels, as /proc/cpuinfo spells them
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
            "avx_vnni", "avx_ne_convert", "gfni", "amx_tile", "amx_bf16", "amx_int8")

# Largest M (tokens in one call) that goes through the streaming kernel; above it the weight is widened in
# chunks into an fp32 GEMM. The streaming kernel's time grows with M (it is compute-bound from M ~ 8 on two
# cores) while the GEMM's fixed cost is widening every weight once (benchmarks/bench_kernels.py).
_DENSE_MAX_M = 16
_QUANT_MAX_M = 16


AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})  # what an AVX2-only CPU (Zen 3, Haswell..Comet Lake) has of FEATURES


@functools.cache
def cpu_features() -> frozenset[str]:
    """The FEATURES this CPU has (Linux /proc/cpuinfo; elsewhere what torch's dispatcher reports). GLM4_ISA=avx2
    narrows them to AVX2_ONLY, so that every choice made from them (kernels, bf16 compute, the GEMM library) is
    the one an AVX2-only CPU gets: with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 (read when torch
    loads) an AVX-512 machine runs glm4 as such a CPU would (docs/benchmarks.md)."""
    have = _cpu_flags()
    return have & AVX2_ONLY if os.environ.get("GLM4_ISA") == "avx2" else have


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of Linux /proc/cpuinfo ("model name", "vendor_id", "flags"...); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_flags() -> frozenset[str]:
    """The CPU's own FEATURES, GLM4_ISA or not."""
    if "flags" in _cpuinfo():
        have = set(_cpuinfo()["flags"].split())
        return frozenset(x for x in FEATURES if x in have)
    cap = torch.backends.cpu.get_cpu_capability()  # "DEFAULT" | "AVX2" | "AVX512" | ...
    return frozenset({"avx2", "fma", "f16c"} if cap in ("AVX2", "AVX512") else set()) | (
        {"avx512f", "avx512bw", "avx512vl", "avx512dq"} if cap == "AVX512" else set())


def cpu_summary() -> str:
    """One line: the CPU model and the flags that matter, e.g. 'AMD EPYC (avx2 fma f16c)'."""
    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    flags = " ".join(x for x in FEATURES if x in cpu_features()) or "no AVX2"
    return f"{model} ({flags}{'; narrowed by GLM4_ISA=avx2' if cpu_features() != _cpu_flags() else ''})"


@functools.cache
def has_streaming_kernels() -> bool:
    """True when glm4's own CPU kernels are built and this CPU can run them."""
    return HAVE_EXT and torch.ops.glm4.isa() != "none"


def dense_isa() -> str:
    """The instruction set of the streaming kernels for dense weights here: 'AVX-512', 'AVX2' or ''."""
    isa = torch.ops.glm4.isa() if HAVE_EXT else "none"
    return {"avx512_vnni": "AVX-512", "avx2": "AVX2"}.get(isa, "")


def quant_isa(bits: int, group_size: int, in_features: int | None = None, act_bits: int = 0) -> str:
    """Same for int8 / int6 / int4 weights, as ops.cpp decides for one token: the AVX-512 VNNI kernels take activation
    blocks of 64 columns or more (the largest multiple of 32 <= 256 dividing the group), 4-bit groups of 32 when
    the width is a multiple of 128 (GGUF q4_0 / q4_K), and 8-bit groups of 16 / 32 when it is a multiple of 64
    (q8_0, q6_K, q5_*: the lanes8 kernel, int16 activations only); other 8-bit groups of 16k columns run AVX-512
    FMA kernels on fp32 activations, the rest AVX2's. Unless activations() is "exact", the AVX2 4- / 6-bit kernels
    and its 8-bit ones in groups of 32k take activations at int16 precision, and the AVX-512 ones for one token
    (int8 where int8_activations says, for act_bits where given: glm4.quant.set_activation_bits)."""
    isa = dense_isa()
    if not isa:
        return ""
    block = next((b for b in range(256, 31, -32) if group_size % b == 0), 0)
    int16 = activations() != "exact"  # int8 only where int8_activations says, the other kernels int16
    if isa == "AVX-512":
        k = in_features or 0
        lanes = (bits == 4 and block == 32 and k % 128 == 0) or (
            bits == 8 and int16 and group_size in (16, 32) and k % 64 == 0)
        if lanes or (block and block % 64 == 0):
            return "AVX-512 VNNI (int16 activations at M=1)" if int16 else "AVX-512 VNNI"
        if bits == 8 and group_size % 16 == 0:
            return "AVX-512"
    if bits in (4, 6) and block and int8_activations(act_bits or bits):
        return "AVX2 (int8 activations)"
    return "AVX2 (int16 activations)" if int16 and (bits in (4, 6) or block) else "AVX2"


def activations() -> str:
    """How the integer kernels here carry activations: "exact" (two int16 terms a column, ~31 bits: fp32's result;
    GLM4_ACTIVATIONS=exact), "int16" (one 16-bit integer a column and an fp32 scale per block, each within 1 / 65278
    of its block's largest; the AVX2 4- / 6-bit kernels 1.4-1.6x faster, its 8-bit ones 2.1x (Zen 3), the AVX-512
    ones for one token 1.3x; AVX-512 with two or more tokens widens codes to fp32 against fp32 activations, exact
    either way), "int8" (GLM4_ACTIVATIONS=int8, llama.cpp's precision: one 8-bit integer a column, within 1 / 254 of
    its block's largest, for AVX2's 4- and 6-bit and K-quant kernels and AVX-512's q6_K one; every other kernel takes
    int16 then) or "auto" (the default): int8 for those kernels where the codes, or the model's coarsest codes, have
    up to 5 bits (glm4's int4, GGUF q4_0 / q4_1 / q4_K / q5_K; an int4 model's q6_K head), int16 for the others
    (int8_activations)."""
    return torch.ops.glm4.activations() if HAVE_EXT else "exact"


ACTIVATIONS = ("auto", "exact", "int16", "int8")  # the modes activations() names


Q6_K = 14  # the ggml type id of q6_K blocks (glm4.quant.kquant), whose AVX-512 kernel also takes int8 activations


def int8_activations(bits: int, ggml_type: int = 0) -> bool:
    """Whether the kernels of `bits`-bit codes (4 / 6: glm4's, 5: GGUF q5_K; 6 also q6_K) take int8 activations now:
    AVX2's, and AVX-512's q6_K one (`ggml_type` Q6_K; a compute-bound output head there: 1.23x its int16 speed from
    memory, Zen 4), every width under "int8", up to 5 bits under "auto" (4-bit codes' own error swamps the
    activations' rounding: the shipped model's int4 KL to fp32 1.7e-2 at int16 and at int8; int6 3.5e-3 -> 3.9e-3,
    so 6 bits keep int16). AVX-512's other kernels take int16 either way."""
    mode = activations()
    isa = dense_isa()
    return (isa == "AVX2" or (isa == "AVX-512" and ggml_type == Q6_K)) and (
        mode == "int8" or (mode == "auto" and bits <= 5))


def int8_gemm() -> bool:
    """Whether modules set to the int8-activation prefill GEMM (glm4.quant.set_gemm_dtype) run it now: not under
    "exact" activations, which keep every kernel at fp32's result (they take the fp32 GEMM then)."""
    return activations() != "exact"


def set_activations(mode: str) -> str:
    """The integer kernels' activations from now on, process-wide (one of ACTIVATIONS, as activations() describes
    them); returns what ran before. Without the extension there are no integer kernels: "exact" stays."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(map(repr, ACTIVATIONS))}, got {mode!r}")
    return torch.ops.glm4.set_activations(mode) if HAVE_EXT else "exact"


@functools.cache
def native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512_BF16 or AMX) and oneDNN able to use it; elsewhere torch emulates
    bf16 matmuls (0.3 GFLOPS vs 87 fp32 measured on Zen 3), so bf16 is a storage format only."""
    from .fast_linear import has_op

    return bool({"avx512_bf16", "amx_bf16"} & cpu_features()) and has_op("mkldnn_bf16")


def dense_max_m() -> int:
    return _DENSE_MAX_M if has_streaming_kernels() else 0


def max_m(module) -> int:
    """Largest M for which a QuantLinear runs the streaming kernel rather than dequantize + GEMM."""
    return _QUANT_MAX_M if has_streaming_kernels() else 0


def quant_mm(x: torch.Tensor, m) -> torch.Tensor:
    """x [..., K] fp32 -> [..., N] fp32 through the streaming kernel for a QuantLinear `m`."""
    return ops.quant_mm(x, m.qweight, m.scales, m.mins, m.bits, m.group_size, m.zero_point, True, m.activation_bits)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> int64 [R], as logits.argmax(dim=-1) (the first maximum; a NaN counts as the maximum)."""
    if (logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] and logits.device.type == "cpu"
            and has_streaming_kernels()):
        return ops.argmax(logits)
    return logits.argmax(dim=-1)


def dense_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 @ w [N, K] (fp32 / bf16 / fp16) -> [..., N] fp32, streaming w once."""
    return ops.dense_mm(x, w)


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel"), "" where there is none."""
    return _cpuinfo().get("vendor_id", "")


@functools.cache
def _onednn_gemm(dtype: torch.dtype) -> bool:
    """oneDNN's GEMM for large M on AVX-512 CPUs and on AMD ones: torch's fp32 matmul goes to MKL, which takes a
    generic AVX2 path on AMD (M = 512, K / N = 1024 / 4096, 2 threads, Zen 5: 195 vs oneDNN's 452 GFLOP/s; run as
    an AVX2-only CPU, GLM4_ISA=avx2 and ONEDNN_MAX_CPU_ISA=AVX2: 189-195 vs 229-237); oneDNN reads the plain
    weight (no packed copy). An AVX2-only Intel CPU keeps MKL, its own vendor's best there."""
    from .fast_linear import has_op

    if "avx512f" not in cpu_features() and not (dtype == torch.float32 and cpu_vendor() == "AuthenticAMD"):
        return False
    return has_op("mkldnn") if dtype == torch.float32 else dtype == torch.bfloat16 and native_bf16()


@functools.cache
def _torch_gemm_from(dtype: torch.dtype) -> int:
    """The M from which torch's GEMM (MKL) runs where _onednn_gemm takes oneDNN's for smaller M; 0: never. On an
    AVX2-only AMD CPU in fp32, 512: a real Zen 3 (2 threads, K / N of the 400M's and the MoE's linears) measured MKL
    at 175-190 GFLOP/s against oneDNN's 148-171 from M = 512 (1.03-1.21x), and slower below (0.63-0.93x at M = 24-64,
    either way around 256-384); Zen 5 run as an AVX2-only CPU had measured the opposite at M = 512 (189-195 vs
    229-237), so the rule follows the real CPU."""
    if dtype == torch.float32 and "avx512f" not in cpu_features() and cpu_vendor() == "AuthenticAMD":
        return 512
    return 0


@functools.cache
def own_gemm() -> bool:
    """glm4's fp32 GEMM (torch.ops.glm4.dense_gemm, gemm_f32_avx2.cpp) for large M on AVX2-only AMD CPUs, where
    torch's are MKL's generic AVX2 path and oneDNN's: a real Zen 3 (2 threads, the 400M's K / N, paired runs) measured
    1.00-1.19x torch's fp32 at M = 512, 1.22-1.31x at M = 128, 1.00-1.06x at M = 32; a bf16 / fp16 weight is widened
    as it is packed, which against widen + torch's GEMM made 1.04-1.25x, 1.40-1.45x and 1.46-1.58x."""
    return has_streaming_kernels() and "avx512f" not in cpu_features() and cpu_vendor() == "AuthenticAMD"


def gemm_kernel(dtype: torch.dtype) -> str:
    """Which library runs the large-M GEMM in `dtype` here, in words."""
    if dtype == torch.float32 and own_gemm():
        return "glm4 AVX2 GEMM"
    if not _onednn_gemm(dtype):
        return "torch GEMM"
    m = _torch_gemm_from(dtype)
    return f"oneDNN GEMM (torch's from M={m})" if m else "oneDNN GEMM"


def gemm_rows(m: int) -> int:
    """The row count the oneDNN GEMM runs for M rows: M up to 16, above it M rounded up to 8 sizes per doubling
    (18, 20, ..., 32, 36, 40, ..., 64, 72, ..., 512, 576, ...: at most 12.5 % padding, ~6 % on average).
    oneDNN and torch's ideep layer each keep a compiled primitive per shape (ideep's ~260 KB apiece, evicted only
    past 1024): one per row count made a server's RSS grow with every new batch size it met; this way a weight
    has 8 shapes per doubling of M (benchmarks/engine_rss.py; docs/benchmarks.md "Server soak")."""
    if m <= 16:
        return m
    step = 1 << ((m - 1).bit_length() - 4)  # the next power of two / 16
    return -(-m // step) * step


# The large-M path widens (dequantizes) a weight into fp32 / bf16 rows for a GEMM: a whole weight of up to
# _GEMM_WHOLE elements at once (one GEMM writing its own output), bigger ones _GEMM_CHUNK elements at a time (each GEMM
# then copied into its columns of the output). 400M model, 512-token prefill, Zen 3, 2 threads: with 8 MB chunks the
# int4 linears made 56 GEMMs and 85 copies against fp32's 32 GEMMs (1004 vs 874 ms).
_GEMM_WHOLE = 1 << 23  # 32 MB in fp32
_GEMM_CHUNK = 1 << 22  # 16 MB: under glibc's largest mmap threshold (32 MB), so the buffer is reused, not re-faulted


def gemm_chunk_rows(out_features: int, in_features: int) -> int:
    """Rows of an [out_features, in_features] weight widened per GEMM on the large-M path."""
    if out_features * in_features <= _GEMM_WHOLE:
        return out_features
    return min(max(16, _GEMM_CHUNK // in_features), out_features)


def dequant_gemm(x: torch.Tensor, n_out: int, fill, buf: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, n_out] for W [n_out, K] widened into `buf` (x's dtype; `gemm_chunk_rows` rows) by
    fill(row0, w), which writes W's rows row0.. into the view w: all of W at once, one GEMM whose output is the result,
    or a chunk at a time, each GEMM copied into its columns of the result."""
    rows = buf.shape[0]
    if rows >= n_out:
        fill(0, buf[:n_out])
        return gemm(x, buf[:n_out])
    y = x.new_empty(x.shape[0], n_out)
    for i in range(0, n_out, rows):
        j = min(i + rows, n_out)
        fill(i, buf[: j - i])
        y[:, i:j] = gemm(x, buf[: j - i])
    return y


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in x's dtype: the large-M path of the linears (prefill). w fp32 / bf16 / fp16: glm4's
    GEMM widens it as it packs it (fp32 x where own_gemm()), else it is cast to x's dtype first. oneDNN runs
    `gemm_rows(M)` rows (zero rows appended), so that its per-shape caches stay bounded."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and own_gemm():
        return ops.dense_gemm(x, w, None)
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    m = x.shape[0]
    if x.device.type == "cpu" and _onednn_gemm(x.dtype) and not 0 < _torch_gemm_from(x.dtype) <= m:
        rows = gemm_rows(m)
        x = x.contiguous() if rows == m else torch.constant_pad_nd(x, (0, 0, 0, rows - m))  # zero rows below
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return y if rows == m else y[:m]
    return torch.nn.functional.linear(x, w)
