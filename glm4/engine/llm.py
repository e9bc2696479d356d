"""`glm4.LLM`: checkpoint folder -> model + tokenizer + engine, the offline Python API.

    llm = glm4.LLM("path/to/checkpoint")
    outs = llm.generate(["你好", [151331, 151333, 9]], glm4.SamplingParams(max_tokens=64, temperature=0))
    outs[0].text, outs[0].token_ids
    for delta in llm.stream("Hello", params): print(delta, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from glm4.engine.llm_engine import EngineArgs, LLMEngine
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.sequence import RequestOutput

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def load_tokenizer_if_present(folder: Path):
    """The folder's tokenizer (or a GGUF file's vocabulary), or None when it has none (token-id prompts only)."""
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        from glm4.tokenizer.gguf_meta import find_gguf_file, gguf_tokenizer, read_gguf_header

        gguf = find_gguf_file(folder)
        hdr = read_gguf_header(gguf) if gguf is not None else None
        return gguf_tokenizer(hdr) if hdr is not None and "tokenizer.ggml.tokens" in hdr.metadata else None
    from glm4.tokenizer import load_tokenizer

    return load_tokenizer(folder)


class LLM:
    """Model + tokenizer + engine. `engine_args` are `EngineArgs` fields (dtype, kv_cache_tokens, ...)."""

    def __init__(self, path: str | Path | None = None, tokenizer=None, **engine_args):
        args = EngineArgs.from_kwargs(**engine_args)
        if path is None:
            from glm4.assets import default_model

            path = default_model()
        from glm4.quant.load import find_gguf, load_model
        from glm4.weights import memory_returned_when_freed

        gguf = find_gguf(path)  # a .gguf file, or a folder holding only one
        folder = gguf or Path(path)
        if gguf is None and not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")

        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        load_dtype, compute = _quantized_load_dtype(folder, args)
        fallbacks: list[str] = []
        with memory_returned_when_freed():  # quantizing at load frees the float weights as it goes
            model = load_model(folder, dtype=load_dtype, device=args.device, progress=False,
                               on_layer_loaded=_layer_quantizer(args, fallbacks))
            model = optimize_model(model, args, compute=compute, fallbacks=fallbacks)
        if fallbacks:
            from glm4.quant import warn_fallbacks

            warn_fallbacks(args.quantization, fallbacks)
        self.path = folder
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_if_present(folder)
        self.engine = LLMEngine(model, self.tokenizer, args)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer=None, **engine_args) -> LLM:
        """Wrap an already built model (tests, notebooks)."""
        self = cls.__new__(cls)
        args = EngineArgs.from_kwargs(**engine_args)
        self.path, self.tokenizer = None, tokenizer
        self.engine = LLMEngine(optimize_model(model, args), tokenizer, args)
        return self

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    def describe(self) -> str:
        """The CPU, dtypes, each linear kind's kernel, and the KV cache."""
        return describe_model(self.model) + "\n" + self.engine.describe()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 multi_modal_data: dict | list[dict | None] | None = None) -> list[RequestOutput]:
        """prompts: one prompt or a list; a prompt is text or a list of token ids. Returns one output per prompt.

        Vision checkpoints: `multi_modal_data` (a dict for one prompt, else one dict or None per prompt) is either
        the model's processed inputs (pixel_values / image_grid_thw / pixel_values_videos / video_grid_thw, the
        prompt holding the expanded placeholders, as glm4.media gives them), or raw media {"image": picture or
        list, "video": frames list or glm4.media.video.Video, or a list of them} for a prompt with one `<|image|>` /
        `<|video|>` per item, expanded here."""
        plist = _as_prompt_list(prompts)
        if multi_modal_data is None:
            return self.engine.generate(plist, params or SamplingParams())
        mms = [multi_modal_data] if isinstance(multi_modal_data, dict) else list(multi_modal_data)
        pairs = [self._media_inputs(p, mm) for p, mm in zip(plist, mms)] if len(mms) == len(plist) else None
        if pairs is None:
            raise ValueError(f"{len(mms)} multi_modal_data entries for {len(plist)} prompts")
        return self.engine.generate([p for p, _ in pairs], params or SamplingParams(), [mm for _, mm in pairs])

    def _media_inputs(self, prompt, mm: dict | None):
        """(prompt, model inputs) of one prompt with raw media (see generate); processed inputs pass through."""
        from glm4.engine.multimodal import MultimodalPrompt

        if not mm or set(mm) <= MultimodalPrompt.INPUTS:
            return prompt, mm
        unknown = sorted(set(mm) - {"image", "video"})
        if unknown:
            raise ValueError(f"unknown multi_modal_data key(s) {unknown}: give image / video, or the processed "
                             f"inputs {sorted(MultimodalPrompt.INPUTS)}")
        from glm4.chat.media import RequestMedia
        from glm4.engine.chat import media_policy
        from glm4.media.image import load_image
        from glm4.media.video import Video, video_from_images

        policy = media_policy(self, self.tokenizer, self.path)
        if policy is None:
            raise ValueError(f"{self.model.config.model_type} takes no images or videos")

        def items(x):
            return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]

        videos = mm.get("video")
        videos = [videos] if isinstance(videos, Video) or (isinstance(videos, list) and videos
                                                           and not isinstance(videos[0], (list, Video))) else items(videos)
        media = RequestMedia([load_image(x) for x in items(mm.get("image"))],
                             [v if isinstance(v, Video) else video_from_images(v) for v in videos])
        ids = self.tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else list(prompt)
        return media.prompt_inputs(ids, policy, self.tokenizer.encode)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt (token-id deltas are in `stream_outputs`)."""
        for out in self.engine.stream(prompt, params or SamplingParams()):
            if out.outputs[0].delta_text:
                yield out.outputs[0].delta_text

    def stream_outputs(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        yield from self.engine.stream(prompt, params or SamplingParams())

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice="auto",
             params: SamplingParams | None = None, **kw):
        """One assistant reply (content and/or OpenAI tool_calls); tool_choice and JSON modes are enforced
        by constrained decoding. See glm4.engine.chat."""
        from glm4.engine.chat import chat

        return chat(self, messages, tools, tool_choice, params, **kw)

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, tool_choice="auto",
                    params: SamplingParams | None = None, **kw):
        """Chat events as the model writes them (content / tool_call deltas, then done)."""
        from glm4.engine.chat import chat_stream

        return chat_stream(self, messages, tools, tool_choice, params, **kw)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts


# Without glm4's CPU kernels (no compiler at install time), linear="auto" falls back to oneDNN prepacking: every
# bf16 linear, and fp32 ones only from this many weights (below it F.linear is faster at one token; docs/benchmarks.md).
PACK_MIN_PARAMS_FP32 = 4_000_000


def compute_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype for weights stored in `storage`: fp32 on CPUs that only emulate bf16 / fp16 arithmetic
    (the weights stay half precision and stream half the bytes), else the storage dtype."""
    if device.type != "cpu" or storage == torch.float32:
        return storage
    from glm4.quant import kernels

    if not kernels.has_streaming_kernels():
        return storage  # nothing to widen half-precision weights in registers: keep today's behaviour
    return storage if storage == torch.bfloat16 and kernels.native_bf16() else torch.float32


def _quantized_load_dtype(folder: Path, args: EngineArgs) -> tuple[object, torch.dtype | None]:
    """(dtype to load in, activation dtype or None). Quantizing a bf16 / fp16 checkpoint at load with dtype float32
    asked: load the stored half-precision weights and widen only what stays unquantized, after quantizing — the
    quantizers widen each weight to fp32 themselves (same codes), and no fp32 copy of the whole model is made."""
    if not args.quantization or str(args.dtype).lower() == "auto":
        return args.dtype, None
    from glm4.quant import kernels
    from glm4.quant.load import checkpoint_dtype
    from glm4.weights import resolve_device, resolve_dtype

    stored = checkpoint_dtype(folder)
    if (resolve_dtype(args.dtype) == torch.float32 and stored in (torch.bfloat16, torch.float16)
            and resolve_device(args.device).type == "cpu" and kernels.has_streaming_kernels()):
        return stored, torch.float32
    return args.dtype, None


def _layer_quantizer(args: EngineArgs, fallbacks: list[str]):
    """The loader's `on_layer_loaded` when quantizing at load (int8 / int6 / int4 on the CPU): each layer is fused
    and quantized as soon as its weights are read, so the float weights of one layer at a time are in memory, not
    the whole model's (peak RSS ~ the quantized model + the float embedding / head); optimize_model then does the
    rest, as it would have done the whole. None otherwise."""
    from glm4.models.glm import fuse_projections
    from glm4.quant import SCHEME_BITS, quantize
    from glm4.weights import resolve_device

    if args.quantization not in SCHEME_BITS or resolve_device(args.device).type != "cpu":
        return None

    def on_layer_loaded(model: torch.nn.Module, name: str) -> None:
        if args.fuse_projections:
            fuse_projections(model.get_submodule(name))
        quantize(model, args.quantization, group_size=args.quant_group_size, within=name, fallbacks=fallbacks)

    return on_layer_loaded


def optimize_model(model: torch.nn.Module, args: EngineArgs, compute: torch.dtype | None = None,
                   fallbacks: list[str] | None = None) -> torch.nn.Module:
    """Inference-time module swaps, in place: q/k/v and gate/up fused into one linear each; then the CPU linears
    (glm4.quant): weight-only int8/int4 when asked, else ("auto") glm4's streaming kernels over the weights as
    stored (FloatLinear), or prepacked oneDNN linears ("packed"; "auto" without glm4's kernels); finally the rest
    of the model cast to the activation dtype (`model.compute_dtype`, read by the engine; `compute` overrides the
    choice, see _quantized_load_dtype). `fallbacks`: see glm4.quant.quantize. Returns the model."""
    model.eval()
    if args.fuse_projections:
        from glm4.models.glm import fuse_projections

        fuse_projections(model)
    p = next(model.parameters())
    on_cpu = p.device.type == "cpu"
    compute = compute or compute_dtype(p.dtype, p.device)
    scheme, min_params = args.quantization, 0
    if scheme is None and on_cpu and args.linear in ("auto", "packed"):
        from glm4.quant import kernels

        scheme = "float" if args.linear == "auto" and kernels.has_streaming_kernels() else "packed"
        if scheme == "packed" and args.linear == "auto" and p.dtype == torch.float32:
            min_params = PACK_MIN_PARAMS_FP32
    if compute != p.dtype and scheme not in ("float", "int8", "int6", "int4"):
        compute = p.dtype  # F.linear / oneDNN need weights in the activation dtype
    if scheme is not None:
        from glm4.quant import quantize

        quantize(model, scheme, group_size=args.quant_group_size, min_params=min_params, fallbacks=fallbacks)
    if on_cpu:
        from glm4.quant import set_activation_bits

        _set_quant_gemm(model, args.quant_gemm)
        set_activation_bits(model)  # "auto" activations: a 4-bit model's 6-bit head rounds them as its body does
        if args.activations is not None:
            from glm4.quant import kernels

            kernels.set_activations(args.activations)
    if compute != p.dtype:
        from glm4.quant import cast_for_compute

        cast_for_compute(model, compute)
    model.compute_dtype = compute
    if args.fused_ops and on_cpu:
        from glm4.quant.fused import use_fused_ops

        use_fused_ops(model)  # norms, RoPE, and model.decode_attention_kernel for the runner
        if not args.compile:
            from glm4.quant.decode_stack import use_decode_stack

            use_decode_stack(model)  # decode steps through all layers by one call (model.decode_layers_kernel)
    if args.compile:
        compile_model(model)
    return model


def _set_quant_gemm(model: torch.nn.Module, choice: str) -> None:
    """EngineArgs.quant_gemm -> glm4.quant.set_gemm_dtype: "auto" takes bf16 for 4-, 5- and 6-bit weights (5: GGUF
    q5_K) where the CPU computes in bf16 (their own error swamps bf16's rounding: int6 KL to fp32 3.5e-3 -> 3.6e-3 on
    the shipped model, prefill ~1.5x; 8-bit weights stay exact, see set_gemm_dtype), elsewhere glm4's int8-activation
    GEMM for 4- and 6-bit codes of its own layout (llama.cpp's precision for its quantized prefill, ~2x the fp32 GEMM
    on a Zen 3; docs/benchmarks.md gives the quality)."""
    from glm4.quant import kernels, set_gemm_dtype

    set_gemm_dtype(model, torch.float32)
    if choice == "bfloat16":
        set_gemm_dtype(model, torch.bfloat16)
    elif choice == "int8" or (choice == "auto" and not kernels.native_bf16()):
        set_gemm_dtype(model, torch.int8, bits=(4, 6))
    elif choice == "auto":
        set_gemm_dtype(model, torch.bfloat16, bits=(4, 5, 6))


def describe_model(model: torch.nn.Module) -> str:
    """What runs where: the CPU, the storage / activation dtypes, and the kernel of each kind of linear."""
    from glm4.quant import describe_linears, kernels

    p = next(model.parameters())
    lines = [f"device {p.device}" + (f": {kernels.cpu_summary()}" if p.device.type == "cpu" else ""),
             f"activations {str(getattr(model, 'compute_dtype', p.dtype)).removeprefix('torch.')}"]
    lines += [f"  {kind:<14} x{n:<4} {desc}" for kind, n, desc in describe_linears(model)]
    from glm4.quant.fused import describe_fused

    fused = describe_fused(model)
    if fused:
        lines.append(f"fused ops: {fused}")
    return "\n".join(lines)


# the dense MLPs: attention (paged, Python bookkeeping) and MoE routing (data-dependent shapes) stay eager.
# Measured on CPU (docs/benchmarks.md): MLPs compiled with linear="torch" decode 13 % slower than eager, compiled
# RMSNorms or whole decoder layers slower still (per-call guards, recompiles), and oneDNN-packed weights cannot be
# traced (the wrapper falls back). Hence off by default.
_COMPILABLE = ("GlmMLP", "Glm4MoeMLP", "ChatGLMMLP")


class _CompiledOrEager(torch.nn.Module):
    """`torch.compile(module)` that falls back to the eager module, for good, if compiling or running it fails."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.eager = module
        self.compiled = torch.compile(module, dynamic=True)
        self.failed: str | None = None

    def forward(self, *args):
        if self.failed is None:
            try:
                return self.compiled(*args)
            except Exception as e:  # inductor missing a compiler, an unsupported op...: run eager from now on
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                import warnings

                warnings.warn(f"torch.compile failed, running {type(self.eager).__name__} eagerly: {self.failed}",
                              stacklevel=2)
        return self.eager(*args)


def compile_model(model: torch.nn.Module) -> int:
    """Wrap every dense MLP in `_CompiledOrEager` (in place); returns how many were wrapped."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in _COMPILABLE:
                setattr(parent, name, _CompiledOrEager(child))
                n += 1
    return n
