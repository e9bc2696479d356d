"""The GLM-4.xV vision tower (glm4.layers.vision.VisionTower) per image size: preprocessing (glm4.media) and the
encoder forward, random weights of the real GLM-4.1V / 4.5V / 4.6V tower shape (24 blocks, width 1536, merger to
4096) or of a smaller `--depth`. CPU or CUDA, fp32 or bf16.

    python benchmarks/bench_vision.py --sizes 224x224,448x448,1000x20 --threads 2 [--depth 24] [--dtype bf16]

The tower's linears run as the engine runs them (glm4.quant's FloatLinear: oneDNN's GEMM on AVX-512 CPUs, torch's
elsewhere); `--torch-linears` keeps nn.Linear (F.linear: MKL, whose AVX2 path is all AMD CPUs get). Times are
wall-clock and CPU seconds of the calling thread (`time.thread_time`, every cycle with --threads 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from glm4.config import Glm4vVisionConfig
from glm4.layers.vision import VisionTower
from glm4.media.image import preprocess_images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="224x224,448x448,1000x20", help="WxH,... of the input images")
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch-linears", action="store_true", help="nn.Linear as built, not the engine's FloatLinear")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    tower = VisionTower(Glm4vVisionConfig(depth=a.depth)).to(a.device, dtype).eval()
    if not a.torch_linears and a.device == "cpu":
        from glm4.quant import quantize

        quantize(tower, "float")  # what glm4.engine's optimize_model does to every linear
    rows = []
    for size in a.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        t0 = time.perf_counter()
        inputs = preprocess_images([img])
        prep = time.perf_counter() - t0
        pixels = torch.from_numpy(inputs["pixel_values"]).to(a.device, dtype)
        grid = inputs["image_grid_thw"].tolist()
        times, cpu = [], []
        with torch.inference_mode():
            for _ in range(a.reps + 1):
                t0, c0 = time.perf_counter(), time.thread_time()
                out = tower(pixels, grid)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
        row = {"size": size, "grid": grid[0], "patches": pixels.shape[0], "tokens": out.shape[0],
               "preprocess_ms": round(prep * 1e3, 1), "encoder_ms": round(statistics.median(times[1:]) * 1e3, 1),
               "encoder_thread_cpu_ms": round(statistics.median(cpu[1:]) * 1e3, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"depth": a.depth, "dtype": a.dtype, "device": a.device, "threads": torch.get_num_threads(),
                   "linears": "torch" if a.torch_linears else "glm4",
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
