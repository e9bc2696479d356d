"""Training logs: logs.csv (and experts.csv for MoE routers), TensorBoard when it is installed, the curves PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from glm4.train.recipe import TrainArgs

CSV_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "eval_loss", "eval_ppl",
              "balance_loss", "z_loss"]


class Logger:
    def __init__(self, output: Path, a: TrainArgs, enabled: bool):
        self.enabled, self.output = enabled, output
        self.tb = None
        if enabled and a.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def start(self, history: list[dict]) -> None:
        """(Re)write the CSVs with the rows so far (a resume drops rows past its checkpoint)."""
        if not self.enabled:
            return
        with open(self.output / "logs.csv", "w", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writeheader()
        (self.output / "experts.csv").unlink(missing_ok=True)
        for row in history:
            self.append(row)

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.output / "logs.csv", "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(row)
        if "expert_counts" in row:
            path = self.output / "experts.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "layer"] + [f"e{i}" for i in range(len(row["expert_counts"][0]))])
                for li, counts in enumerate(row["expert_counts"]):
                    w.writerow([row["step"], li] + list(counts))

    def scalars(self, row: dict) -> None:
        if self.tb is None:
            return
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl", "balance_loss", "z_loss"):
            if row.get(k) is not None:
                self.tb.add_scalar(k, row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: list[dict], path: Path) -> None:
    """PNG of train/eval loss and learning rate (and expert load when MoE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = [r for r in history if "expert_counts" in r]
    fig, axes = plt.subplots(1, 3 if experts else 2, figsize=(15 if experts else 10, 4))
    steps = [r["step"] for r in history]
    axes[0].plot(steps, [r["loss"] for r in history], label="train")
    ev = [r for r in history if r.get("eval_loss") is not None]
    if ev:
        axes[0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in history])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    if experts:
        c = np.array([np.sum(r["expert_counts"], axis=0) for r in experts], dtype=float)
        c /= c.sum(1, keepdims=True)
        for e in range(c.shape[1]):
            axes[2].plot([r["step"] for r in experts], c[:, e])
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("share of routed tokens per expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
