"""The server under load and faults, on a real uvicorn (127.0.0.1) and the tiny checkpoint: big prompts never stall
the event loop, half-sent requests are timed out, malformed bodies get one answer on every route, every client
disconnect is aborted (also while the loop is stalled), counters add up, and `glm4 serve` ends cut streams
in-band on shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from test_serve_util import MAX_POS, ServerThread, free_port, make_checkpoint, wait_healthy

torch.set_num_threads(1)

MODEL = "tiny-glm4"
MSGS = [{"role": "user", "content": "Tell me a long story."}]
BIG = "word " * (2**21 // 5)  # a 2 MiB prompt
ROUTES = {  # path -> a valid body, and how its API shapes an error
    "/v1/chat/completions": ({"model": MODEL, "messages": MSGS, "max_tokens": 2}, "openai"),
    "/v1/completions": ({"model": MODEL, "prompt": "hi", "max_tokens": 2}, "openai"),
    "/v1/responses": ({"model": MODEL, "input": "hi", "max_output_tokens": 2}, "openai"),
    "/v1/messages": ({"model": MODEL, "messages": MSGS, "max_tokens": 2}, "anthropic"),
    "/api/chat": ({"model": MODEL, "messages": MSGS, "stream": False, "options": {"num_predict": 2}}, "ollama"),
    "/tokenize": ({"model": MODEL, "prompt": "hi"}, "openai"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    from glm4.serve.app import build_state, create_app
    from glm4.serve.serve_cli import header_timeout_protocol

    st = build_state(str(ckpt), model_name=MODEL, max_pending=64, kv_cache_tokens=16384, max_num_seqs=48)
    srv = ServerThread(create_app(st, max_body_bytes=8 * 2**20, body_timeout=1.0))
    srv.server.config.http = header_timeout_protocol(1.0)
    srv.start()
    srv.state = st
    yield srv
    srv.stop()


def _idle(st, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bm = st.engine.engine.block_manager
        if st.engine.num_pending == 0 and bm.num_free_blocks == bm.num_blocks and not st.engine.engine.requests:
            return True
        time.sleep(0.02)
    return False


def _message(r: httpx.Response, shape: str) -> tuple[str, str | None]:
    """(message, code) of an error body in its API's shape."""
    body = r.json()
    if shape == "ollama":
        return body["error"], None
    if shape == "anthropic":
        assert body["type"] == "error"
        return body["error"]["message"], body["error"]["type"]
    return body["error"]["message"], body["error"]["code"]


def _responses_total(st) -> float:
    return sum(v for (k, v) in _series(st, "responses_total").items())


def _series(st, name) -> dict:
    with st.metrics._lock:
        return {labels: v for labels, v in st.metrics._counters[name].items()}


# ------------------------------------------------------------------------------------------ big prompts


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_big_prompts_are_parsed_and_checked_off_the_event_loop(server, monkeypatch):
    """16 concurrent 2 MiB prompts (chat and completions): each is a 400 context_length_exceeded, /health answers
    all along, and the work a big body costs (its JSON parse, the prompt's length check) runs on worker threads,
    never on the event loop that answers /health and writes every stream."""
    import glm4.serve.chat_handler as H
    import glm4.serve.completions as C
    import glm4.serve.errors as E

    seen = []  # (which function, ran on the event loop)

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a: (seen.append((name, _on_event_loop())), real(*a))[1])

    spy(E, "check_json_body")
    spy(H, "_plan")
    spy(C, "_prompts")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            done = asyncio.Event()
            health = []

            async def poll():
                while not done.is_set():
                    health.append((await ac.get("/health")).status_code)
                    await asyncio.sleep(0.05)

            async def big(i):
                if i % 2:
                    return await ac.post("/v1/completions", json={"model": MODEL, "prompt": BIG, "max_tokens": 4})
                return await ac.post("/v1/chat/completions",
                                     json={"model": MODEL, "messages": [{"role": "user", "content": BIG}]})

            poller = asyncio.ensure_future(poll())
            answers = await asyncio.gather(*[big(i) for i in range(16)])
            done.set()
            await poller
            return answers, health

    answers, health = asyncio.run(main())
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert health and set(health) == {200}
    names = [name for name, _ in seen]
    assert names.count("check_json_body") == 16 and names.count("_plan") == 8 and names.count("_prompts") == 8
    assert not [name for name, on_loop in seen if on_loop], seen


def test_prompt_that_cannot_fit_is_rejected_before_tokenizing(server, monkeypatch):
    import glm4.serve.completions as C
    from glm4.serve import serving

    st = server.state
    calls = []
    real = C.encode_prompt
    monkeypatch.setattr(C, "encode_prompt", lambda tok, text: (calls.append(len(text)), real(tok, text))[1])
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": BIG, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"] and calls == []
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi there", "max_tokens": 2})
    assert r.status_code == 200 and calls == [8]
    # exact: a text is rejected only when even its fewest possible tokens leave no room
    m, limit = serving.max_token_bytes(st), st.max_model_len
    assert m == max(len(b) for b in st.tokenizer._ranks) or m == max(len(s) for s in st.tokenizer.special_tokens)
    serving.check_text_fits(st, "a" * (m * (limit - 4)), 4, "prompt")  # limit - 4 tokens + 4 fits
    with pytest.raises(serving.APIError):
        serving.check_text_fits(st, "a" * (m * (limit - 4) + 1), 4, "prompt")
    # a real text of the longest tokens: its token count is never below the bound, so the bound never rejects it
    longest = max((b for b in st.tokenizer._ranks if _utf8(b)), key=len)
    n = len(st.tokenizer.encode(longest.decode() * 50))
    assert -(-len(longest) * 50 // m) <= n


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------------------------------ slow clients


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    sock.settimeout(timeout)
    data, t0 = b"", time.monotonic()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


def test_half_sent_body_gets_408_and_the_socket_closes(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"model": "tiny')
        data, waited = _read_all(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data and waited < 5


def test_half_sent_headers_are_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        data, waited = _read_all(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408") and waited < 5


def test_body_cap_counts_real_bytes(server):
    """A chunked body (no Content-Length) over the cap is a 413 too, and a declared one is refused unread."""
    def chunks():
        for _ in range(9):
            yield b" " * 2**20

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/messages", content=b" " * (8 * 2**20 + 1), timeout=30)
    assert r.status_code == 413 and r.json()["type"] == "error"


# ------------------------------------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize("path", list(ROUTES))
def test_malformed_bodies_answer_the_same_on_every_route(server, path):
    good, shape = ROUTES[path]
    cases = {
        b"": "request body is empty",
        b"  \n": "request body is empty",
        b'{"model": "x", ': "not valid JSON",
        b'{"model": "\xff\xfe"}': "not valid UTF-8",
        b"[" * 5000 + b"]" * 5000: "nested deeper than",
        b'{"a":' * 200 + b"1" + b"}" * 200: "nested deeper than",
    }
    for body, words in cases.items():
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, body[:20], r.text[:200])
        message, code = _message(r, shape)
        assert words in message, (path, message)
        assert code in ("invalid_json", "invalid_request_error", None)
        if shape == "openai":
            assert code == "invalid_json"
    # a UTF-8 BOM before valid JSON is accepted alike everywhere
    r = httpx.post(server.url + path, content=b"\xef\xbb\xbf" + json.dumps(good).encode(),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text[:300]


# ------------------------------------------------------------------------------------------ disconnects


def _paced(monkeypatch, st, seconds=0.01):
    step = st.engine.engine.step
    monkeypatch.setattr(st.engine.engine, "step", lambda: (time.sleep(seconds), step())[1])


STREAMS = [  # (path, body) of a long stream on each API
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 600, "ignore_eos": True,
                              "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 600, "ignore_eos": True, "stream": True}),
    ("/v1/messages", {"model": MODEL, "messages": MSGS, "max_tokens": 600, "stream": True}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 600, "stream": True}),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"num_predict": 600}}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 600, "ignore_eos": True}),
]


def _open(server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnects_during_a_stalled_loop_are_all_aborted(server, monkeypatch):
    """Streams on every API and a non-streamed request, their clients gone while the event loop is stalled (as a
    big prompt on the loop stalled it): each is aborted once the loop runs again, every KV block comes back, each
    request is counted once as 499, and the tokens they generated are counted."""
    st = server.state
    assert _idle(st)
    _paced(monkeypatch, st)
    aborted, gen = st.metrics.counter("requests_aborted_total"), st.metrics.counter("generation_tokens_total")
    n499 = st.metrics.counter("responses_total", status="499")
    socks = [_open(server, path, body) for path, body in STREAMS]
    deadline = time.monotonic() + 30
    while st.engine.num_pending < len(STREAMS) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert st.engine.num_pending == len(STREAMS)
    for s in socks[:-1]:  # each stream has started
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    loop = next(iter(st.engine._owners.values()))[0]
    stalled = threading.Event()
    loop.call_soon_threadsafe(lambda: (stalled.set(), time.sleep(1.5)))
    assert stalled.wait(5)
    for s in socks:
        s.close()
    t_closed = time.monotonic()
    assert _idle(st, timeout=10)
    assert time.monotonic() - t_closed < 5
    assert st.metrics.counter("requests_aborted_total") == aborted + len(STREAMS)
    deadline = time.monotonic() + 5  # the response ends after the abort: the count follows it
    while st.metrics.counter("responses_total", status="499") < n499 + len(STREAMS) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st.metrics.counter("responses_total", status="499") == n499 + len(STREAMS)
    assert st.metrics.counter("generation_tokens_total") > gen + len(STREAMS)  # aborted requests' tokens counted


def test_counters_add_up(server):
    """Every request is counted once, by the status it ended with; queue wait is a histogram."""
    st = server.state
    before, errors = _responses_total(st), sum(_series(st, "request_errors_total").values())
    statuses = [
        httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 2}),
        httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": MSGS}),
        httpx.post(server.url + "/v1/chat/completions", content=b""),
        httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": 5}),
        httpx.get(server.url + "/v1/nothing"),
        httpx.get(server.url + "/health"),
    ]
    codes = [r.status_code for r in statuses]
    assert codes == [200, 404, 400, 400, 404, 200]
    # a request is counted when its handler returns, just after the client has the last byte: the count follows it
    deadline = time.monotonic() + 5
    while (_responses_total(st) < before + len(codes) or sum(_series(st, "request_errors_total").values()) < errors + 4
           ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _responses_total(st) == before + len(codes)
    assert sum(_series(st, "request_errors_total").values()) == errors + 4
    text = httpx.get(server.url + "/metrics").text
    assert "glm4_queue_wait_seconds_bucket" in text and 'glm4_responses_total{status="404"}' in text


# ------------------------------------------------------------------------------------------ shutdown


def _ending(path: str, raw: str) -> str | None:
    """How a stream ended: "cut" (shutdown told in-band, in its API's way), "complete", or None (broken)."""
    if path in ("/v1/chat/completions", "/v1/completions"):
        events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
        if events[-1] != "[DONE]":
            return None
        return "cut" if '"shutdown"' in events[-2] else "complete"
    if path == "/v1/messages":
        if raw.rstrip().endswith('data: {"type":"message_stop"}'):
            return "complete"
        last = raw.strip().split("\n\n")[-1]
        return "cut" if last.startswith("event: error") and '"overloaded_error"' in last else None
    if path == "/v1/responses":
        last_two = raw.strip().split("\n\n")[-2:]
        if last_two[-1].startswith("event: response.completed"):
            return "complete"
        return "cut" if last_two[0].startswith("event: error") and "response.failed" in last_two[1] else None
    last = json.loads(raw.strip().splitlines()[-1])
    if last.get("done"):
        return "complete"
    return "cut" if "shut down" in last.get("error", "") else None


def test_shutdown_ends_cut_streams_in_band_and_exits_nonzero(ckpt):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glm4.cli", "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", MODEL, "--drain-timeout", "0.5", "--log-level", "warning"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        streams = [(p, {**b, "max_tokens": MAX_POS - 100} if "max_tokens" in b else b) for p, b in STREAMS[:5]]
        streams[3][1]["max_output_tokens"] = MAX_POS - 100
        streams[4][1]["options"] = {"num_predict": MAX_POS - 100}
        out: dict[int, str] = {}
        started = threading.Barrier(len(streams) + 1)

        def consume(i, path, body):
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                it = r.iter_text()
                first = next(it)
                started.wait()
                out[i] = first + "".join(it)

        threads = [threading.Thread(target=consume, args=(i, p, b)) for i, (p, b) in enumerate(streams)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        code = proc.wait(timeout=60)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    endings = [_ending(path, out[i]) for i, (path, _) in enumerate(streams)]
    for i, ((path, _), ending) in enumerate(zip(streams, endings)):
        assert ending is not None, (path, out[i][-400:])
    assert endings[0] == endings[1] == "cut"  # ignore_eos: these two ran past the drain timeout
    assert code == 3, log[-2000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-2000:]
    assert f"cut {endings.count('cut')} unfinished" in log, (endings, log[-1000:])
