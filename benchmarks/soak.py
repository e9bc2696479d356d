"""Soak and fault test of `glm4 serve`: N streaming clients for T minutes on loopback, then a table.

    python benchmarks/soak.py --clients 16 --minutes 1                  # starts `glm4 serve` (shipped model)
    python benchmarks/soak.py --clients 16 --minutes 1 --faults 0.1     # 10 % of requests are faults
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234   # an already running server
    python benchmarks/soak.py --in-process --minutes 2                 # + tracemalloc: what Python memory grows

Each client loops: a streamed chat completion (plain, with tools and tool_choice "required", or JSON mode with a
schema) or a streamed completion; `--cancel` of them are closed after a few chunks. With `--faults`, that share of
requests is instead one of: a half-sent body (expects 408 within the server's body timeout), an oversize body
(declared too large: 413), a 2 MiB prompt (400 context_length_exceeded), a malformed body (empty, invalid UTF-8,
broken or too deeply nested JSON: 400 invalid_json), or a stream closed right after its first chunk. Tool calls and
JSON-mode replies are checked (arguments / content parse as JSON). Bounded: loopback only, `--clients` <= 256,
`--minutes` <= 60.

Prints: requests, errors by class (expected fault answers, unexpected 4xx, 5xx, transport errors, invalid outputs),
latency and TTFT percentiles per minute of the normal requests, the server's RSS at start / after the first minute
/ peak / end (after 5 s idle), and from /metrics at the end: KV blocks in use, requests in flight, aborts and
responses by status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict

import httpx

MODEL = "default"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["answer", "n"]}
BIG = "word " * (2**21 // 5)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Stats:
    def __init__(self, t0: float):
        self.t0 = t0
        self.count = Counter()  # outcome class -> n
        self.lat = defaultdict(list)  # minute -> latencies of normal requests
        self.ttft = defaultdict(list)
        self.examples: dict[str, str] = {}

    def add(self, outcome: str, detail: str = "", latency: float | None = None, ttft: float | None = None):
        self.count[outcome] += 1
        if detail and outcome not in self.examples:
            self.examples[outcome] = detail[:200]
        minute = int((time.monotonic() - self.t0) // 60)
        if latency is not None:
            self.lat[minute].append(latency)
        if ttft is not None:
            self.ttft[minute].append(ttft)


def normal_request(rng: random.Random) -> tuple[str, dict, str]:
    """(path, body, kind) of a normal streamed request."""
    r = rng.random()
    msgs = [{"role": "user", "content": f"Tell me about the number {rng.randint(0, 999)}."}]
    if r < 0.15:
        return "/v1/chat/completions", {"model": MODEL, "messages": msgs, "tools": TOOLS, "tool_choice": "required",
                                        "max_tokens": 64, "stream": True}, "tools"
    if r < 0.3:
        return "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 64, "stream": True,
                                        "response_format": {"type": "json_schema", "json_schema": {
                                            "name": "a", "schema": SCHEMA}}}, "json"
    if r < 0.45:
        return "/v1/completions", {"model": MODEL, "prompt": msgs[0]["content"], "max_tokens": 48,
                                   "stream": True}, "completion"
    return "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 48, "stream": True}, "chat"


async def run_normal(ac: httpx.AsyncClient, st: Stats, rng: random.Random, cancel: float) -> None:
    path, body, kind = normal_request(rng)
    cut_after = rng.randint(1, 6) if rng.random() < cancel else None
    t0, ttft, chunks, text, args, reason = time.monotonic(), None, 0, "", "", None
    try:
        async with ac.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                st.add("5xx" if r.status_code >= 500 else f"unexpected_{r.status_code}", r.text)
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    st.add("error_event", line)
                    return
                for c in ev.get("choices", []):
                    reason = c.get("finish_reason") or reason
                    d = c.get("delta") or {}
                    piece = d.get("content") or c.get("text") or ""
                    for tc in d.get("tool_calls") or []:
                        args += tc["function"].get("arguments") or ""
                    if (piece or d.get("tool_calls")) and ttft is None:
                        ttft = time.monotonic() - t0
                    text += piece
                chunks += 1
                if cut_after is not None and chunks >= cut_after:
                    st.add("cancelled")
                    return
    except httpx.HTTPError as e:
        st.add("transport", repr(e))
        return
    if reason == "length":  # cut by max_tokens: a JSON reply may be unfinished
        st.add("ok_length", latency=time.monotonic() - t0, ttft=ttft)
    elif kind == "tools" and not _is_json_objects(args):
        st.add("invalid_output", f"tools: {args!r}")
    elif kind == "json" and not _is_json_objects(text):
        st.add("invalid_output", f"json: {text!r}")
    else:
        st.add("ok", latency=time.monotonic() - t0, ttft=ttft)


def _is_json_objects(s: str) -> bool:
    """One or more JSON objects back to back (parallel tool calls stream their arguments one after another)."""
    dec, i, n = json.JSONDecoder(), 0, 0
    s = s.strip()
    while i < len(s):
        try:
            obj, i = dec.raw_decode(s, i)
        except ValueError:
            return False
        n += isinstance(obj, dict)
        while i < len(s) and s[i].isspace():
            i += 1
    return n > 0


async def raw_request(port: int, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request's head and (part of) a body on a new connection; what comes back within `wait` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(65536), wait)
        except asyncio.TimeoutError:
            return b""
    finally:
        writer.close()


def _head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def run_fault(ac: httpx.AsyncClient, port: int, st: Stats, rng: random.Random, body_wait: float) -> None:
    kind = rng.choice(["half_body", "oversize", "big_prompt", "malformed", "mid_close"])
    try:
        if kind == "half_body":
            data = await raw_request(port, _head("/v1/chat/completions", 4000), b'{"model": "de', body_wait)
            ok = data.startswith(b"HTTP/1.1 408")
        elif kind == "oversize":
            data = await raw_request(port, _head("/v1/chat/completions", 2**30), b"{" * 1024, 10)
            ok = data.startswith(b"HTTP/1.1 413")
        elif kind == "big_prompt":
            r = await ac.post("/v1/completions", json={"model": MODEL, "prompt": BIG, "max_tokens": 8})
            ok, data = r.status_code == 400 and "context_length_exceeded" in r.text, r.text.encode()
        elif kind == "malformed":
            body = rng.choice([b"", b'{"model": "default", ', b'{"model": "\xff"}', b"[" * 5000 + b"]" * 5000])
            r = await ac.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            ok, data = r.status_code == 400 and "invalid_json" in r.text, r.text.encode()
        else:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 200,
                    "stream": True}
            async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_raw():
                    break
                ok, data = r.status_code == 200, b""
    except httpx.HTTPError as e:
        st.add("transport", f"{kind}: {e!r}")
        return
    st.add(f"fault_{kind}" if ok else f"fault_{kind}_unexpected", data[:200].decode("latin-1"))


async def client(i: int, url: str, port: int, st: Stats, deadline: float, args) -> None:
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=args.headers) as ac:
        while time.monotonic() < deadline:
            if rng.random() < args.faults:
                await run_fault(ac, port, st, rng, (args.body_timeout or 5) + 5)
            else:
                await run_normal(ac, st, rng, args.cancel)


def scrape(url: str, headers: dict) -> dict[str, float]:
    out = {}
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name.removeprefix("glm4_")] = float(v)
    return out


async def soak(url: str, port: int, pid: int | None, args) -> dict:
    import tracemalloc

    t0 = time.monotonic()
    st = Stats(t0)
    rss = {"start": rss_bytes(pid) if pid else 0, "peak": 0, "minute1": 0}
    snaps = []

    async def sample():
        while True:
            r = rss_bytes(pid) if pid else 0
            rss["peak"] = max(rss["peak"], r)
            if not rss["minute1"] and time.monotonic() - t0 >= min(60, args.minutes * 30):
                rss["minute1"] = r
                if tracemalloc.is_tracing():
                    snaps.append(tracemalloc.take_snapshot())
            await asyncio.sleep(1)

    sampler = asyncio.ensure_future(sample())
    deadline = t0 + args.minutes * 60
    await asyncio.gather(*[client(i, url, port, st, deadline, args) for i in range(args.clients)])
    await asyncio.sleep(5)
    rss["end"] = rss_bytes(pid) if pid else 0
    sampler.cancel()
    if tracemalloc.is_tracing() and snaps:
        grown = tracemalloc.take_snapshot().compare_to(snaps[0], "lineno")
        print("\ntracemalloc: Python allocations grown since the first sample (top 12)")
        for d in grown[:12]:
            print(f"  {d.size_diff / 2**20:+8.2f} MB  {d.count_diff:+7d} blocks  {d.traceback[0]}")
        cur, peak = tracemalloc.get_traced_memory()
        print(f"  traced now {cur / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB")
    return {"stats": st, "rss": rss, "metrics": scrape(url, args.headers), "seconds": time.monotonic() - t0}


def start_in_process(port: int, args):
    """The server in this process (a uvicorn thread), so tracemalloc sees its Python allocations."""
    import threading
    import tracemalloc

    import uvicorn

    from glm4.serve.app import build_state, create_app

    tracemalloc.start(1)
    st = build_state(args.model, model_name=MODEL)
    app = create_app(st, body_timeout=args.body_timeout or 30.0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def report(res: dict, args) -> None:
    st, rss, m = res["stats"], res["rss"], res["metrics"]
    total = sum(st.count.values())
    print(f"\n== soak: {args.clients} clients x {args.minutes:g} min, cancel {args.cancel:.0%}, faults {args.faults:.0%}"
          f" ({res['seconds']:.0f} s)")
    print(f"requests                {total}")
    for k, v in sorted(st.count.items()):
        print(f"  {k:<28}{v}")
    bad = sum(v for k, v in st.count.items() if k.startswith(("unexpected", "5xx", "transport", "invalid", "error_"))
              or k.endswith("_unexpected"))
    print(f"unexpected errors       {bad}   (5xx: {st.count['5xx']})")
    print("minute  n_ok  latency p50/p99 s   TTFT p50/p99 s")
    for minute in sorted(set(st.lat) | set(st.ttft)):
        lat, tt = st.lat[minute], [x for x in st.ttft[minute] if x is not None]
        print(f"{minute:>6}  {len(lat):>4}  {pct(lat, 50):6.2f} / {pct(lat, 99):6.2f}   {pct(tt, 50):6.2f} / "
              f"{pct(tt, 99):6.2f}")
    mb = 2**20
    print(f"RSS MB  start {rss['start'] / mb:.0f}  after 1 min {rss['minute1'] / mb:.0f}  peak {rss['peak'] / mb:.0f}"
          f"  end {rss['end'] / mb:.0f}")
    keys = ["kv_blocks_used", "requests_in_flight", "requests_aborted_total", "generation_tokens_total"]
    print("metrics  " + "  ".join(f"{k}={m.get(k, float('nan')):g}" for k in keys))
    by_status = {k.split('"')[1]: v for k, v in m.items() if k.startswith("responses_total{")}
    print("responses by status  " + "  ".join(f"{k}:{v:g}" for k, v in sorted(by_status.items())))
    for k, v in st.examples.items():
        if k.startswith(("unexpected", "5xx", "transport", "invalid", "error_")) or k.endswith("_unexpected"):
            print(f"  e.g. {k}: {v}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (loopback); default: start `glm4 serve`")
    ap.add_argument("--pid", type=int, default=None, help="the running server's pid, for RSS")
    ap.add_argument("--model", default=None, help="checkpoint for the started server (default: the shipped model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--cancel", type=float, default=0.1, help="share of normal streams closed early")
    ap.add_argument("--faults", type=float, default=0.0, help="share of requests that are faults")
    ap.add_argument("--body-timeout", type=float, default=5.0,
                    help="the started server's --body-timeout (0: not passed, for servers without it; half-sent "
                         "bodies then wait 10 s for an answer)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-process", action="store_true",
                    help="run the server in this process with tracemalloc on, and print what Python memory grew")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `glm4 serve` argument (repeatable)")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 256 and 0 < args.minutes <= 60):
        ap.error("--clients must be 1..256 and --minutes 0..60")
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = server = None
    if args.in_process:
        port = free_port()
        server = start_in_process(port, args)
        url, pid = f"http://127.0.0.1:{port}", os.getpid()
    elif args.url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "glm4.cli", "serve", "--port", str(port), "--served-model-name", MODEL,
               "--log-level", "warning", *args.server_arg]
        if args.body_timeout:
            cmd += ["--body-timeout", str(args.body_timeout)]
        if args.model:
            cmd += ["--model", args.model]
        proc = subprocess.Popen(cmd, stdout=sys.stderr)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print("the server did not start")
                return 1
            time.sleep(0.3)
    else:
        url, pid = args.url.rstrip("/"), args.pid
        if httpx.URL(url).host not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address")
        port = httpx.URL(url).port or 80
    try:
        res = asyncio.run(soak(url, port, pid, args))
    finally:
        if server is not None:
            server.should_exit = True
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
            print(f"server exit status {code}", file=sys.stderr)
    report(res, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
