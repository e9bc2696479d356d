"""The code interpreter's costs: kernel start time and per-cell overhead, under each launcher and unsandboxed.

    python benchmarks/bench_interpreter.py [--starts 3] [--cells 50]

Start = from CodeInterpreter() to a kernel that answers; a cell = run("pass") round trip (median, p90).
The unsandboxed kernel (unsafe=True) is the baseline that says what the sandbox itself costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time


def measure(launcher: str | None, starts: int, cells: int) -> dict:
    from glm4.agent import CodeInterpreter
    from glm4.agent import interpreter as interp_mod

    saved = interp_mod.choose_launcher
    unsafe = launcher is None
    if unsafe:  # the baseline: the same kernel, no isolation
        interp_mod.choose_launcher = lambda launcher=None: (None, "baseline without a sandbox")
    try:
        start_s, cell_s = [], []
        for _ in range(starts):
            with tempfile.TemporaryDirectory() as ws:
                t0 = time.perf_counter()
                py = CodeInterpreter(ws, unsafe=unsafe, launcher=launcher)
                start_s.append(time.perf_counter() - t0)
                try:
                    py.run("x = 0")
                    for _ in range(cells):
                        t = time.perf_counter()
                        py.run("pass")
                        cell_s.append(time.perf_counter() - t)
                finally:
                    py.close()
    finally:
        interp_mod.choose_launcher = saved
    cell_s.sort()
    return {"start_s": statistics.median(start_s), "cell_ms": 1000 * statistics.median(cell_s),
            "cell_p90_ms": 1000 * cell_s[int(0.9 * (len(cell_s) - 1))]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--cells", type=int, default=50)
    args = ap.parse_args(argv)
    from glm4.agent.launchers import launcher_status

    runs = [(name, name) for name, (ok, _) in launcher_status().items() if ok] + [("no sandbox", None)]
    for name, launcher in runs:
        r = measure(launcher, args.starts, args.cells)
        print(f"{name:<11} start {r['start_s']:.2f} s   cell median {r['cell_ms']:.1f} ms   p90 {r['cell_p90_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
