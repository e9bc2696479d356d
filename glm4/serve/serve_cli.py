"""`glm4 serve`: the command line, the torch thread policy, and the signals that drain the server.

    glm4 serve --model PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--threads auto]
    glm4 serve --model BASE --lora NAME=PATH [--lora ...]   # LoRA adapters: a request's `model` picks one
    glm4 serve                                              # the shipped models: text (`default`) and vision
                                                            # (`vision`: requests with pictures, or naming it)

SIGINT and SIGTERM start a graceful shutdown: stop accepting (new requests on open connections get 503), let the
open responses finish for up to --drain-timeout seconds, then end each one still running in-band (an error event
and the end of its stream, in its API's shape), stop the engine, and exit 0 — or 3 if any response was cut. The
handlers are installed whatever the process inherited, so a server started in the background with SIGINT ignored
(`nohup glm4 serve &`) still drains on `kill -INT`.

Slow clients cannot hold sockets: a connection must send its request line and headers within --header-timeout
seconds (else it is closed), and a request body must arrive whole within --body-timeout seconds (else 408).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path

from glm4.engine.lora import model_and_adapters
from glm4.serve import DTYPE_HELP, LORA_HELP, serving
from glm4.serve.app import build_state, create_app
from glm4.serve.errors import BODY_TIMEOUT_S, MAX_BODY_BYTES
from glm4.weights import CheckpointError

SMALL_MODEL_BYTES = 256 * 2**20
HEADER_TIMEOUT_S = 10.0  # --header-timeout
CUT_GRACE_S = 5.0  # seconds after the drain timeout for the cut streams to write their ending
EXIT_CUT = 3  # exit status when shutdown cut responses short


def serve_threads(model: str | None, threads: str | int | None, cpus: int | None = None) -> int | None:
    """torch threads for `glm4 serve`: an explicit count, or "auto" — on a machine of <= 4 cores a small model
    (decode costs ~ms, so HTTP and streaming per token weigh as much) leaves one core to the event loop; a big
    model keeps torch's default (its matmuls need every core). None = torch's default."""
    if threads is None or threads == "auto":
        cpus = cpus or os.cpu_count() or 1
        if cpus > 4 or cpus < 2:
            return None
        if model is None:
            from glm4.assets import default_model

            model = default_model()
        weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) if Path(model).is_dir() else 0
        return cpus - 1 if 0 < weights < SMALL_MODEL_BYTES else None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"--threads must be a positive integer or 'auto', got {threads!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="glm4 serve", description="OpenAI-compatible server for a GLM-4 checkpoint")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--served-model-name", default=None, help="model id clients use (default: folder name)")
    ap.add_argument("--lora", action="append", metavar="NAME=PATH", help=LORA_HELP)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("GLM4_API_KEY"), help="require 'Authorization: Bearer KEY'")
    ap.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help=DTYPE_HELP)
    ap.add_argument("--quantization", default=None, choices=["int8", "int6", "int4"], help="weight-only quantization at load")
    ap.add_argument("--quant-gemm", default="auto", choices=["auto", "float32", "bfloat16", "int8"],
                    help="prefill GEMM of quantized weights: auto = bf16 for int4 / int6 on CPUs with native bf16 "
                         "(~1.5x), else int8 (int8 activations, llama.cpp's precision: ~2x); float32 = exact to the "
                         "stored weights")
    ap.add_argument("--activations", default=None, choices=["auto", "exact", "int16", "int8"],
                    help="activations of the integer CPU kernels: auto (the default: int8 for AVX2's kernels of up to "
                         "5-bit codes and AVX-512's q6_K one in such models, int16 for the others), int8 = llama.cpp's "
                         "precision for AVX2's 4- / 6-bit and K-quant kernels and AVX-512's q6_K (faster decode), "
                         "int16, exact = fp32's result")
    ap.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8", "bfloat16", "float16", "float32"],
                    help="KV cache storage: auto = the model's dtype; int8 = per-token-per-head int8 + fp32 scales "
                         "(about half the bytes of bf16, a quarter of fp32)")
    ap.add_argument("--verbose", action="store_true", help="print the CPU, dtypes and each linear kind's kernel")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads; auto: on <= 4 cores a small model (< 256 MB of weights) leaves one core "
                         "to the HTTP side (1.7x requests/s at one client for the default model on 2 cores)")
    ap.add_argument("--responses-store-size", type=int, default=1024,
                    help="responses kept in memory for previous_response_id and GET /v1/responses/{id} (LRU; 0: none)")
    ap.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                    help="vision models: image_url / video_url parts may name local files under DIR (default: none)")
    ap.add_argument("--allow-remote-media", action="store_true",
                    help="vision models: fetch http(s) image / video URLs (within --media-fetch-timeout and "
                         "--media-max-bytes); off by default: send data: URIs")
    ap.add_argument("--media-fetch-timeout", type=float, default=10.0, help="seconds per remote media URL")
    ap.add_argument("--media-max-bytes", type=int, default=20 * 2**20, help="bytes per remote media URL")
    ap.add_argument("--limit-mm-per-prompt", default=None, metavar="image=N,video=M",
                    help="vision models: images and videos per request (default image=16,video=2)")
    ap.add_argument("--max-image-pixels", type=int, default=None, help="pixels of a decoded picture (default 40M)")
    ap.add_argument("--max-video-frames", type=int, default=None, help="sampled frames per video (default 256)")
    ap.add_argument("--max-encoder-mb", type=float, default=None,
                    help="MiB of vision-encoder activations per tower call; a larger image or video gets a 400 "
                         "(default: a quarter of the memory free after the KV cache)")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds to finish in-flight requests on exit; what is left then is ended with an error "
                         "event and the exit status is 3")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (else 413)")
    ap.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                    help="seconds to receive a whole request body (else 408 and the connection is closed)")
    ap.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                    help="seconds for a new connection to send its request headers (else it is closed)")
    ap.add_argument("--onednn-cache", type=int, default=None,
                    help="compiled GEMMs kept by oneDNN and by torch's ideep layer (one per weight and row count; "
                         "default 1024 each; ~0.5 MB per shape for the two). Row counts are rounded up to 8 sizes "
                         "per doubling, so the shipped model needs ~200 (~100 MB, built in the first minute of "
                         "load); a smaller cache rebuilds GEMMs at a speed cost")
    ap.add_argument("--cpu-workers", type=int, default=serving.CPU_WORKERS,
                    help="threads that tokenize / render templates / compile grammars at once, off the event loop")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.model, lora = model_and_adapters(args.model, args.lora)
        threads = serve_threads(args.model, args.threads)
    except ValueError as e:
        print(f"glm4 serve: {e}")
        return 2
    if args.onednn_cache is not None:  # read by oneDNN / ideep when they build their first primitive
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(max(0, args.onednn_cache))
        os.environ["LRU_CACHE_CAPACITY"] = str(max(1, args.onednn_cache))  # ideep's; 0 crashes torch 2.13
    engine_args = {k: v for k, v in (("max_model_len", args.max_model_len), ("device", args.device),
                                     ("dtype", args.dtype), ("num_threads", threads),
                                     ("kv_cache_dtype", args.kv_cache_dtype), ("quantization", args.quantization),
                                     ("quant_gemm", args.quant_gemm), ("activations", args.activations),
                                     ("lora", lora or None),
                                     ("max_encoder_mb", args.max_encoder_mb))
                   if v is not None}
    companion = None
    if args.model is None and not lora:  # the shipped text model, with the shipped vision model for pictures
        from glm4.assets import VISION_MODEL

        companion = VISION_MODEL if (VISION_MODEL / "config.json").is_file() else None
    try:
        media = media_limits(args)
        st = build_state(args.model, api_key=args.api_key, model_name=args.served_model_name,
                         max_pending=args.max_queue, verbose=args.verbose, media=media, companion=companion,
                         **engine_args)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"glm4 serve: {e}")
        return 2
    import uvicorn

    serving.set_cpu_workers(args.cpu_workers)
    app = create_app(st, drain_timeout=args.drain_timeout, responses_store_size=args.responses_store_size,
                     max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=header_timeout_protocol(args.header_timeout),
                            timeout_graceful_shutdown=args.drain_timeout + CUT_GRACE_S)
    server = uvicorn.Server(config)
    server.capture_signals = lambda: _drain_on_signals(server, st.engine, args.drain_timeout)
    server.run()
    if st.engine.num_cut:
        logging.getLogger("glm4.serve").warning("shutdown cut %d unfinished request(s)", st.engine.num_cut)
        return EXIT_CUT
    return 0


def media_limits(args) -> dict:
    """The media flags as glm4.chat.media.MediaPolicy fields (ValueError for a malformed --limit-mm-per-prompt)."""
    out = {"allowed_local_path": args.allowed_local_media_path, "allow_remote": args.allow_remote_media,
           "remote_timeout": args.media_fetch_timeout, "remote_max_bytes": args.media_max_bytes}
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a folder")
    for item in filter(None, (args.limit_mm_per_prompt or "").split(",")):
        kind, _, n = item.partition("=")
        if kind.strip() not in ("image", "video") or not n.strip().isdigit():
            raise ValueError(f"--limit-mm-per-prompt: expected image=N,video=M, got {item!r}")
        out["max_images" if kind.strip() == "image" else "max_videos"] = int(n)
    if args.max_image_pixels is not None:
        out["max_image_pixels"] = args.max_image_pixels
    if args.max_video_frames is not None:
        out["max_video_frames"] = args.max_video_frames
    return out


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing (after a 408) a connection that has not sent a whole request head within
    `seconds` of opening: uvicorn itself waits for it forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self):
            if self.cycle is None and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


@contextlib.contextmanager
def _drain_on_signals(server, engine, drain_timeout: float):
    """SIGINT/SIGTERM start the graceful shutdown (new requests 503, uvicorn stops accepting), and after
    `drain_timeout` seconds cut what is still running; unlike uvicorn's own handler the signal is not re-raised
    afterwards, so a drained server exits by main's status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    timer = threading.Timer(drain_timeout, engine.cut_all)
    timer.daemon = True

    def on_signal(sig, frame):
        if not timer.is_alive() and not server.should_exit:
            engine.begin_drain()
            timer.start()
        server.handle_exit(sig, frame)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        timer.cancel()
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
