"""Copy the trained vision checkpoint into the package (bf16) and write its card.

    python recipes/vision/ship.py weights --checkpoint runs/vision/sft3     # -> glm4/assets/vision/
    python recipes/vision/ship.py card --runs runs/vision                   # -> training_curves.png

`weights`: tensors in bf16 except the MoE routers (fp32, as the model keeps them), config.json with
torch_dtype bfloat16, the tokenizer (with <|image|> / <|video|>), the GLM-4.1V chat template, the processor config
(64 x 64 pictures -> 168 x 168 -> 36 image tokens) and generation_config.json (greedy).
`card`: training_curves.png from the SFT stages' logs.csv (MODEL_CARD.md is written by hand from eval.json and
timings.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "glm4" / "assets" / "vision"
FP32 = ("mlp.gate.weight", "e_score_correction_bias")
FILES = ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json")


def ship_weights(checkpoint: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    cast = {k: (v if not v.is_floating_point() or k.endswith(FP32) else v.to(torch.bfloat16)).contiguous()
            for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(cast, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file writes 0600
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg.pop("training_args", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in FILES:
        shutil.copy(checkpoint / name, out / name)
    gen = {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["text_config"].get("pad_token_id"),
           "do_sample": False, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"tensors": len(cast), "bytes": size}


def curves(runs: Path, out_png: Path) -> None:
    """Train / valid loss of both stages on one step axis, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage, label in (("sft1", "stage 1: tower frozen (random)"), ("sft2", "stage 2: everything"),
                         ("sft3", "stage 3: everything, shapes asked")):
        if not (runs / stage / "model.safetensors").is_file():
            continue
        rows = list(csv.DictReader(open(runs / stage / "logs.csv")))
        steps = [offset + int(r["step"]) for r in rows]
        ax[0].plot(steps, [float(r["loss"]) for r in rows], lw=0.6, label=f"{label}, train")
        ev = [r for r in rows if r.get("eval_loss")]
        ax[0].plot([offset + int(r["step"]) for r in ev], [float(r["eval_loss"]) for r in ev], "o-",
                   label=f"{label}, valid")
        ax[1].plot(steps, [float(r["lr"]) for r in rows], label=label)
        offset = steps[-1]
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step (32 conversations)")
    ax[0].set_ylabel("cross-entropy per target token")
    ax[0].legend(fontsize=7)
    ax[0].set_title("vision SFT on easy-vqa (en + zh)")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("learning rate (tower / merger)")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("weights")
    w.add_argument("--checkpoint", default="runs/vision/sft3", type=Path)
    w.add_argument("--out", default=ASSET, type=Path)
    c = sub.add_parser("card")
    c.add_argument("--runs", default="runs/vision", type=Path)
    c.add_argument("--out", default=ASSET, type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "weights":
        print(json.dumps(ship_weights(a.checkpoint, a.out)))
        return 0
    curves(a.runs, a.out / "training_curves.png")
    print(f"{a.out / 'training_curves.png'} written; CPU: {cpu_name()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
