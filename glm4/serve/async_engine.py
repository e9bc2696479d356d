"""The bridge between the engine thread and asyncio: `AsyncEngine` runs `LLMEngine.step()` in one thread.

The thread applies queued add/abort commands between steps and hands every RequestOutput to the asyncio
queue of the HTTP request that owns it (one event-loop wake-up per step). `AsyncEngine.submit()` returns an
`EngineRequest`: async-iterate it for that request's RequestOutputs; `close()` aborts it in the engine
(its KV blocks are freed). Admission is counted here: over `max_pending` engine requests in flight a new
request gets 429 + Retry-After; while stopping, 503.

When the engine goes idle after work, at most once every TRIM_INTERVAL_S, the thread hands the
allocator's free pages back to the OS (glibc `malloc_trim(0)`: ~20 MB of ~600 after a 64-client fault soak on the
shipped model), so an idle server's RSS is what it holds, not what a burst left free.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import queue
import threading
import time
import uuid

from glm4.serve.errors import APIError, bad_request
from glm4.serve.metrics import Metrics

log = logging.getLogger("glm4.serve")
TRIM_INTERVAL_S = 30.0  # the least time between two malloc_trim calls of the engine thread


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc); False where there is no malloc_trim."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) is not None)


class _Dropped:
    """Put on a request's queue when the engine could not take it or dropped it (error=None: aborted)."""

    def __init__(self, error: Exception | None = None):
        self.error = error


class AsyncEngine:
    """Runs `engine.step()` in one thread; `submit()` starts an engine request and returns its `EngineRequest`."""

    def __init__(self, engine, max_pending: int = 256, metrics: Metrics | None = None):
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # request id -> its loop, queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False  # the thread ends once idle
        self._draining = False  # new requests are refused
        self._thread: threading.Thread | None = None
        self.num_pending = 0  # engine requests admitted and not finished (guarded by _lock)
        self.num_cut = 0  # requests ended by shutdown before they finished
        self._submitted: dict[str, float] = {}  # request id -> submit time, until its first output (queue wait)
        self._worked = False  # steps ran since the last malloc_trim
        self._last_trim = 0.0
        self.num_trims = 0
        self.error: BaseException | None = None

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glm4-engine", daemon=True)
            self._thread.start()

    def begin_drain(self) -> None:
        """Shutdown has begun: new requests get 503; those in flight run on."""
        self._draining = True

    def cut_all(self) -> int:
        """End every request still in flight with a 503 `shutdown` error (each API tells it in-band: an error event,
        then its end of stream); returns how many were cut."""
        with self._lock:
            left = list(self._owners)
        for rid in left:
            self._cmds.put(("cut", rid))
        self._wake.set()
        return len(left)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish what is in flight (up to drain_timeout seconds), cut what is left, then stop the thread."""
        deadline = time.monotonic() + drain_timeout
        while self.num_pending and time.monotonic() < deadline:
            time.sleep(0.02)
        self.cut_all()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- request side (asyncio thread)
    def reserve(self, k: int) -> None:
        """Admit k engine requests or raise a 429 APIError."""
        with self._lock:
            if self._stopping or self._draining or self.error is not None:
                raise APIError(503, "the server is shutting down" if self.error is None else
                                 f"the engine stopped: {self.error}", "server_error", None, "unavailable")
            if self.num_pending + k > self.max_pending:
                raise APIError(429, f"the server is at capacity ({self.max_pending} requests in flight); "
                                 "retry shortly", "rate_limit_error", None, "rate_limit_exceeded",
                                 headers={"Retry-After": "1"})
            self.num_pending += k

    def unreserve(self, k: int) -> None:
        with self._lock:
            self.num_pending = max(0, self.num_pending - k)

    def submit(self, prompt_ids: list[int], params, reserved: bool = False,
               multi_modal_data: dict | None = None) -> EngineRequest:
        """Start one engine request now (`reserved`: admitted by `reserve()` already); iterate the result for its
        RequestOutputs. `multi_modal_data`: a vision request's image / video inputs (LLMEngine.add_request)."""
        if not reserved:
            self.reserve(1)
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._owners[rid] = (asyncio.get_running_loop(), q)
            self._submitted[rid] = time.monotonic()
        self._cmds.put(("add", rid, prompt_ids, params, multi_modal_data))
        self._wake.set()
        return EngineRequest(self, rid, q)

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))
        self._wake.set()

    # -- engine thread
    def _deliver(self, rid: str, item, last: bool) -> None:
        self._deliver_many([(rid, item, last)])

    def _deliver_many(self, items: list[tuple[str, object, bool]]) -> None:
        """Hand outputs to their requests' queues: one wake-up of each event loop per engine step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        self._observe(items)
        with self._lock:
            for rid, item, last in items:
                sink = self._owners.pop(rid, None) if last else self._owners.get(rid)
                if sink is None:
                    continue
                if last:
                    self.num_pending = max(0, self.num_pending - 1)
                by_loop.setdefault(sink[0], []).append((sink[1], item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the requests' event loop is gone
                pass

    def _observe(self, items: list[tuple[str, object, bool]]) -> None:
        """Tokens generated (every request's, aborted ones too) and each request's wait for its first output."""
        if self.metrics is None:
            return
        now, n_new = time.monotonic(), 0
        for rid, item, last in items:
            outs = getattr(item, "outputs", None)
            if outs:
                n_new += len(getattr(outs[0], "delta_token_ids", None) or ())
            t = self._submitted.pop(rid, None) if (outs or last) else None
            if t is not None and outs:
                self.metrics.observe("queue_wait_seconds", now - t)
        if n_new:
            self.metrics.inc("generation_tokens_total", n_new)

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, mm = cmd
            with self._lock:
                if rid not in self._owners:  # aborted before it reached the engine
                    return
            try:
                if mm:
                    self.engine.add_request(rid, prompt_ids, params, multi_modal_data=mm)
                else:
                    self.engine.add_request(rid, prompt_ids, params)
            except Exception as e:  # bad params that slipped past validation: an error for that request only
                self._count("engine_rejections_total")
                self._deliver(rid, _Dropped(bad_request(f"request rejected by the engine: {e}")), last=True)
        else:
            kind, rid = cmd
            with self._lock:
                owned = rid in self._owners
            if owned:
                try:
                    self.engine.abort(rid)
                except Exception:  # already finished inside the engine
                    log.debug("abort of %s failed", rid, exc_info=True)
                self._count("requests_aborted_total" if kind == "abort" else "requests_cut_total")
                self.num_cut += kind == "cut"
                self._deliver(rid, _Dropped(None if kind == "abort" else shutting_down()), last=True)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name)

    def _run(self) -> None:
        try:
            while True:
                while True:
                    try:
                        self._apply(self._cmds.get_nowait())
                    except queue.Empty:
                        break
                with self._lock:
                    busy = bool(self._owners)
                if not busy:
                    if self._stopping:
                        return
                    if self._worked and time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:
                        self._worked, self._last_trim = False, time.monotonic()
                        self.num_trims += release_free_memory()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._worked = True
                try:
                    outs = self.engine.step()
                except Exception as e:  # a failed step: fail what was in flight, keep serving
                    log.exception("engine step failed")
                    self._count("engine_step_failures_total")
                    self._fail_all(e)
                    continue
                self._deliver_many([(out.request_id, out, out.finished) for out in outs])
                if not outs:
                    time.sleep(0.001)
        except BaseException as e:  # the loop itself died: fail every open request, /health turns 503
            log.exception("engine loop crashed")
            self.error = e
            self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        with self._lock:
            rids = list(self._owners)
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:
                log.debug("abort of %s failed", rid, exc_info=True)
            self._deliver(rid, _Dropped(APIError(500, f"engine failure: {e}", "server_error")), last=True)


def shutting_down() -> APIError:
    return APIError(503, "the server shut down before this request finished", "server_error", None, "shutdown")


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class EngineRequest:
    """One engine request in flight: an async iterator of its RequestOutputs. `close()` (also on cancellation)
    aborts the request, which frees its KV blocks; it is synchronous so it works inside a cancelled task too."""

    def __init__(self, engine: AsyncEngine, rid: str, q: asyncio.Queue):
        self.engine, self.rid, self.q = engine, rid, q
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.q.get()
        except BaseException:  # cancelled: the client went away
            self.close()
            raise
        if isinstance(item, _Dropped):
            self.done = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if item.finished:
            self.done = True
        return item

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)




def abort_unfinished(requests: list[EngineRequest]) -> None:
    """Abort (free the KV blocks of) every request not finished yet; finished ones are left alone."""
    for r in requests:
        r.close()
