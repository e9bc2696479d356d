"""What keeps a long-running server's memory flat: oneDNN GEMMs run on a bounded set of row counts (its and ideep's
per-shape primitive caches stop growing), the KV cache is committed when the server starts (not page by page as
the block manager's LRU free list reaches new blocks), a JSON body is parsed once, and a chat whose last user turn
cannot fit is refused before its template is rendered and tokenized."""

from __future__ import annotations

import ctypes
import mmap

import httpx
import pytest
import torch
from test_serve_util import ServerThread, make_checkpoint

from glm4.quant import kernels

torch.set_num_threads(1)
MODEL = "tiny-glm4"
BIG = "word " * (2**21 // 5)  # 2 MiB


# ------------------------------------------------------------------------------------------ GEMM shapes


def test_gemm_rows_are_few_and_pad_little():
    assert [kernels.gemm_rows(m) for m in range(17)] == list(range(17))  # small M: as is
    for m in range(17, 5000):
        r = kernels.gemm_rows(m)
        assert m <= r <= m * 1.125, (m, r)
        assert kernels.gemm_rows(r) == r  # a bucket maps to itself
    assert len({kernels.gemm_rows(m) for m in range(17, 513)}) == 40  # 8 per doubling: 16 -> 512 is 5 doublings
    assert len({kernels.gemm_rows(m) for m in range(513, 1025)}) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 33, 100, 257])
def test_padded_gemm_equals_the_exact_one(dtype, m, monkeypatch):
    """The rows appended for the bucket never reach the caller, and the caller's rows are what an unpadded GEMM
    gives (each output row depends only on its input row)."""
    assert kernels.gemm_rows(m) > m
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 96, generator=g).to(dtype), torch.randn(72, 96, generator=g).to(dtype)
    y = kernels.gemm(x, w)
    monkeypatch.setattr(kernels, "gemm_rows", lambda rows: rows)
    exact = kernels.gemm(x, w)
    assert y.shape == (m, 72) and y.dtype == dtype
    torch.testing.assert_close(y, exact)


# ------------------------------------------------------------------------------------------ KV cache


def _resident_fraction(t: torch.Tensor) -> float:
    """Share of the pages under `t` that are in RAM (mincore)."""
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    n = (t.data_ptr() + t.numel() * t.element_size() - start + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) / n


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("memory") / "tiny")


def test_server_commits_the_kv_cache_at_start(ckpt):
    """An engine leaves its (large, mmap-backed) cache untouched until blocks are used; the server's state
    takes all of it at start, so RSS does not creep up as the LRU free list reaches new blocks."""
    from glm4.engine.llm import LLM
    from glm4.serve.app import build_state

    # 2 layers x 2^17 slots x 2 heads x 16 x 4 B: just over 32 MiB per k / v, above glibc's largest mmap threshold
    kv = dict(kv_cache_tokens=2**17, max_num_seqs=128)
    llm = LLM(str(ckpt), **kv)
    cache = llm.engine.runner.cache
    assert _resident_fraction(cache.k) < 0.5  # only the null slot's pages were written
    llm.engine.runner.commit_kv_cache()
    assert _resident_fraction(cache.k) == _resident_fraction(cache.v) == 1.0
    assert not cache.k.any() and not cache.v.any()
    st = build_state(str(ckpt), model_name=MODEL, **kv)
    cache = st.engine.engine.runner.cache
    assert _resident_fraction(cache.k) == _resident_fraction(cache.v) == 1.0


# ------------------------------------------------------------------------------------------ request bodies


@pytest.fixture(scope="module")
def server(ckpt):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(ckpt), model_name=MODEL, max_pending=16, kv_cache_tokens=4096, max_num_seqs=8)
    srv = ServerThread(create_app(st, max_body_bytes=8 * 2**20))
    srv.start()
    srv.state = st
    yield srv
    srv.stop()


def test_json_body_is_parsed_once(server, monkeypatch):
    """The gate parses each POST body; FastAPI's own parse (starlette's Request.json) is never reached."""
    import starlette.requests

    class NoParse:
        @staticmethod
        def loads(*a, **k):
            raise AssertionError("the body was parsed a second time")

    monkeypatch.setattr(starlette.requests, "json", NoParse)
    for path, body in [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2}),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                       ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "stream": False, "options": {"num_predict": 2}}),
                       ("/tokenize", {"model": MODEL, "prompt": "hi"})]:
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200, (path, r.text[:300])
    r = httpx.post(server.url + "/v1/completions", content=b"\xef\xbb\xbf" + httpx.Request(
        "POST", "/", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).read(), timeout=60,
        headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]  # a BOM is still dropped
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": 3}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # validation still runs on the object


CHAT_ROUTES = {  # path -> (body with the 2 MiB user turn, error code of its API's shape)
    "/v1/chat/completions": lambda c: {"model": MODEL, "messages": [{"role": "user", "content": c}]},
    "/v1/responses": lambda c: {"model": MODEL, "input": c},
    "/v1/messages": lambda c: {"model": MODEL, "messages": [{"role": "user", "content": c}], "max_tokens": 4},
    "/api/chat": lambda c: {"model": MODEL, "messages": [{"role": "user", "content": c}], "stream": False},
    "/api/generate": lambda c: {"model": MODEL, "prompt": c, "stream": False},
}


def _error_text(r: httpx.Response) -> str:
    body = r.json()
    return body["error"] if isinstance(body["error"], str) else body["error"]["message"]


@pytest.mark.parametrize("path", list(CHAT_ROUTES))
def test_chat_that_cannot_fit_is_refused_before_rendering(server, path, monkeypatch):
    st = server.state
    rendered = []
    real = st.chat.fmt.encode
    monkeypatch.setattr(st.chat.fmt, "encode", lambda *a, **k: (rendered.append(1), real(*a, **k))[1])
    r = httpx.post(server.url + path, json=CHAT_ROUTES[path](BIG), timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert "maximum context length" in _error_text(r) and "at least" in _error_text(r)
    assert rendered == []
    if path == "/v1/chat/completions":
        assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "messages"
    if path == "/v1/responses":
        assert r.json()["error"]["param"] == "input"


def test_only_the_last_user_turn_is_bounded(server, monkeypatch):
    """A long earlier turn may render shorter than its bytes (a format drops past reasoning, text before
    `</think>`): it goes to the template, and the rendered prompt's real length decides."""
    st = server.state
    rendered = []
    real = st.chat.fmt.encode
    monkeypatch.setattr(st.chat.fmt, "encode", lambda *a, **k: (rendered.append(1), real(*a, **k))[1])
    past = "x" * 20000 + "</think>short answer"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": past},
        {"role": "user", "content": "and?"}]}, timeout=60)
    assert rendered == [1] and r.status_code == 200, r.text[:300]  # the tiny model's format drops it
    rendered.clear()  # the last turn's text before its `</think>` is not counted either
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": BIG + "</think>hi"}]}, timeout=60)
    assert rendered == [1]


# ------------------------------------------------------------------------------------------ idle trim


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE / 2**20


def test_release_free_memory_gives_free_pages_back():
    from glm4.serve.async_engine import release_free_memory

    blocks = [bytes(1000 + i % 7) for i in range(60000)]  # ~60 MB of malloc'd blocks
    pin = bytes(1000)  # allocated after them: the freed ones below are not the heap's top, free() keeps them
    del blocks[:58000]
    before = _rss_mb()
    assert release_free_memory()
    assert before - _rss_mb() > 30, (before, _rss_mb())
    del pin, blocks


def test_engine_thread_trims_when_it_goes_idle(server, monkeypatch):
    import time

    from glm4.serve import async_engine

    eng = server.state.engine
    calls = []
    monkeypatch.setattr(async_engine, "release_free_memory", lambda: calls.append(time.monotonic()) or True)
    monkeypatch.setattr(async_engine, "TRIM_INTERVAL_S", 0.0)
    time.sleep(0.3)  # a trim still owed for the tests before (throttled then) happens now
    calls.clear()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 1  # once after the work, not on every idle tick
    time.sleep(0.3)
    assert len(calls) == 1
    monkeypatch.setattr(async_engine, "TRIM_INTERVAL_S", 3600.0)  # throttled: no second trim within the interval
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    time.sleep(0.3)
    assert len(calls) == 1 and eng.num_trims >= 1
