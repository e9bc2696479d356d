"""The training loop: loss falls on a small text, resume continues the identical curve, 2 gloo processes
(torchrun, DDP and FSDP2) match 1 process, DPO, MoE balance logging, full export loads in transformers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glm4.train import pretrain

torch.set_num_threads(1)

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "The early bird catches the worm, and the second mouse gets the cheese. "
) * 40
TINY = dict(model_type="glm4", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            eos_token_id=[0], pad_token_id=0)
SPECIAL = dict(mask=1, gmask=2, sop=3, eop=4, pad=0)  # control bytes, unused by the text


@pytest.fixture(scope="module")
def text_bin(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "text.bin"
    np.frombuffer(TEXT.encode("ascii"), dtype=np.uint8).astype(np.uint16).tofile(p)  # byte-level "tokens"
    return p


def _common(out, **kw):
    d = dict(model_config=TINY, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=2, progress=False, plot=False,
             output=str(out), special_ids=SPECIAL, seed=0)
    d.update(kw)
    return d


def _csv_losses(path: Path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_200_steps_lower_the_loss(text_bin, tmp_path):
    h = pretrain.run(data=str(text_bin), max_steps=200, eval_every=100, eval_fraction=0.1,
                     **_common(tmp_path / "o", batch_size=8, lr=1e-2, plot=True))
    first, last = h[0]["loss"], np.mean([r["loss"] for r in h[-10:]])
    assert first > 4.0  # ~ln(128) at init
    assert last < 0.5 * first and last < 2.0, (first, last)
    assert h[-1]["eval_loss"] < 2.2 and h[-1]["eval_ppl"] == pytest.approx(np.exp(h[-1]["eval_loss"]))
    out = tmp_path / "o"
    assert (out / "curves.png").stat().st_size > 1000
    assert _csv_losses(out / "logs.csv") == [r["loss"] for r in h]
    assert all(r["tokens_per_s"] > 0 for r in h)
    import importlib.util

    if importlib.util.find_spec("tensorboard"):  # optional dependency
        assert any((out / "tensorboard").iterdir())
    from glm4.weights import load_model

    model = load_model(out)  # the export loads, and remembers the text
    ids = torch.tensor([list(b"The quick brown fox jumps over the lazy")])
    with torch.no_grad():
        nxt = model(ids)[0, -1].argmax().item()
    assert nxt == ord(" ")


def test_resume_continues_the_identical_curve(text_bin, tmp_path):
    """Interrupted at step 5 (last checkpoint at 4), resumed to 8: the same losses as one run, bit for bit.
    Blank infilling + causal mix and LoRA dropout exercise the data position and the RNG state."""
    kw = dict(data=str(text_bin), max_steps=8, save_every=2, objective="causal:1,blank:1,gmask:1")
    full = pretrain.run(**_common(tmp_path / "a", **kw))

    class Stop(Exception):
        pass

    def interrupt(step, row):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        pretrain.run(on_step=interrupt, **_common(tmp_path / "b", **kw))
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]  # keep_checkpoints=2
    resumed = pretrain.run(resume="auto", **_common(tmp_path / "b", **kw))
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]
    assert _csv_losses(tmp_path / "b" / "logs.csv") == [r["loss"] for r in full]  # no duplicated rows 5


def test_resume_lora_with_dropout(hf_checkpoint, tmp_path):
    from glm4.layers.lora import LoRAConfig, apply_lora
    from glm4.train.data import TokenStreamDataset
    from glm4.train.loop import LMTask, train
    from glm4.train.objectives import SpecialIds
    from glm4.train.recipe import TrainArgs
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4")
    toks = np.random.default_rng(0).integers(5, 128, size=2000)

    def go(out, resume="", on_step=None):
        model = load_model(folder).train()
        torch.manual_seed(0)  # LoRA A init
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3, targets=["q_proj", "v_proj"]))
        a = TrainArgs(output=str(out), max_steps=6, batch_size=2, lr=1e-2, save_every=3, progress=False,
                      plot=False, resume=resume)
        ds = TokenStreamDataset(toks, 16, {"causal": 1.0}, SpecialIds(), seed=0)
        return train(model, LMTask(model, a), ds, a, on_step=on_step)

    full = go(tmp_path / "a")

    def stop(step, row):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "b", on_step=stop)
    resumed = go(tmp_path / "b", resume="auto")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]


def _torchrun(n: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "glm4.train",
           *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("par", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one(text_bin, tmp_path, par):
    """Same global batch (4): 1 process with 2 accumulation steps vs 2 processes under torchrun (gloo)."""
    cfg = tmp_path / "tiny_config.json"
    cfg.write_text(json.dumps(TINY))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_config: {cfg}\ndata: {text_bin}\nseq_len: 32\nbatch_size: 4\nmax_steps: 6\nlr: 0.003\n"
        "warmup_steps: 2\nprogress: false\nplot: false\nseed: 0\n"
        "objective: {causal: 1, blank: 1}\nspecial_ids: {mask: 1, gmask: 2, sop: 3, eop: 4, pad: 0}\n")
    one = pretrain.run(pretrain.parse_recipe(pretrain.PretrainArgs, ["--config", str(recipe), "--micro-batch-size", "2",
                                                                     "--output", str(tmp_path / "one")], "t"))
    want = [r["loss"] for r in one]
    r = _torchrun(2, ["pretrain", "--config", str(recipe), "--parallel", par, "--output", str(tmp_path / par)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _csv_losses(tmp_path / par / "logs.csv")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=0)
    from glm4.weights import load_model

    ids = torch.tensor([list(b"The early bird")])
    with torch.no_grad():  # the exported weights agree too
        torch.testing.assert_close(load_model(tmp_path / par)(ids), load_model(tmp_path / "one")(ids),
                                   rtol=1e-3, atol=1e-3)


def test_full_finetune_export_loads_in_transformers(hf_checkpoint, text_bin, tmp_path):
    transformers = pytest.importorskip("transformers")
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4")
    h = pretrain.run(model=str(folder), data=str(text_bin), max_steps=3, output=str(tmp_path / "ft"),
                     progress=False, plot=False, batch_size=2, seq_len=16, lr=1e-3)
    assert len(h) == 3
    ours = load_model(tmp_path / "ft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft").float().eval()
    ids = torch.tensor([list(b"The quick brown")])
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
        orig = load_model(folder)(ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, orig, atol=1e-4)  # the weights did train


def test_moe_balance_loss_and_expert_counts(text_bin, tmp_path):
    moe = dict(TINY, model_type="glm4_moe", moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=1, first_k_dense_replace=1, scoring_func="softmax", norm_topk_prob=True,
               routed_scaling_factor=1.0)
    h = pretrain.run(data=str(text_bin), max_steps=4, **_common(tmp_path / "m", model_config=moe))
    assert all(r["balance_loss"] >= 1.0 - 1e-6 for r in h)  # E * sum f P >= 1, 1 when uniform
    assert all(r["z_loss"] > 0 for r in h)
    counts = np.array(h[-1]["expert_counts"])  # [MoE layers, E]
    assert counts.shape == (1, 8) and counts.sum() == 4 * 32 * 2  # every token routed to top-2
    with open(tmp_path / "m" / "experts.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "layer"] + [f"e{i}" for i in range(8)] and len(rows) == 1 + 4
    # the router logits the model collects survive layer recomputation
    ck = pretrain.run(data=str(text_bin), max_steps=4, **_common(tmp_path / "c", model_config=moe,
                                                                  activation_checkpointing=True))
    np.testing.assert_allclose([r["loss"] for r in ck], [r["loss"] for r in h], rtol=1e-6)
    np.testing.assert_allclose([r["balance_loss"] for r in ck], [r["balance_loss"] for r in h], rtol=1e-6)
    # without the balance loss the router learns differently
    off = pretrain.run(data=str(text_bin), max_steps=4, **_common(tmp_path / "n", model_config=moe, moe_aux_coef=0.0,
                                                                   moe_z_coef=0.0))
    assert off[-1]["loss"] != h[-1]["loss"] and "balance_loss" not in off[-1]


def test_activation_checkpointing_and_bf16(text_bin, tmp_path):
    a = pretrain.run(data=str(text_bin), max_steps=3, **_common(tmp_path / "a"))
    b = pretrain.run(data=str(text_bin), max_steps=3, **_common(tmp_path / "b", activation_checkpointing=True))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    c = pretrain.run(data=str(text_bin), max_steps=3, **_common(tmp_path / "c", precision="bf16"))
    np.testing.assert_allclose([r["loss"] for r in c], [r["loss"] for r in a], rtol=2e-2)  # bf16 autocast on CPU
    assert [r["loss"] for r in c] != [r["loss"] for r in a]


def test_dpo_loss_falls_on_a_toy_pair(hf_checkpoint, tmp_path):
    from glm4.layers.lora import LoRAConfig, apply_lora
    from glm4.train.data import PairDataset, sft_labels, sft_sample
    from glm4.train.dpo import DPOArgs, DPOTask
    from glm4.train.loop import train
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4")
    prompt = [([5, 6], None), ([7, 8, 9], "user")]
    chosen = sft_sample(*sft_labels(prompt + [([10, 11, 12], "assistant")], end_id=13))
    rejected = sft_sample(*sft_labels(prompt + [([10, 40, 41], "assistant")], end_id=13))
    model = load_model(folder).train()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "gate_up_proj"]))
    a = DPOArgs(output=str(tmp_path), max_steps=15, batch_size=1, lr=2e-2, beta=0.5, progress=False, plot=False,
                warmup_steps=0, min_lr_ratio=1.0)
    h = train(model, DPOTask(model, a, None), PairDataset([(chosen, rejected)]), a)
    assert h[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at the start
    assert h[-1]["loss"] < 0.2, [r["loss"] for r in h]


def test_cli_recipe_flags_and_errors(text_bin, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(TINY))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_config: {cfg}\ndata: {text_bin}\nseq_len: 16\nbatch_size: 2\nmax_steps: 50\n"
                      "progress: false\nplot: false\n")
    assert pretrain.main(["--config", str(recipe), "--max-steps", "2", "--output", str(tmp_path / "o")]) == 0
    assert len(_csv_losses(tmp_path / "o" / "logs.csv")) == 2  # the flag beat the recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    assert pretrain.main(["--config", str(bad)]) == 2
    assert "unknown recipe key(s) ['max_stepz']" in capsys.readouterr().err
    assert pretrain.main(["--data", str(tmp_path / "missing.bin"), "--model-config", str(cfg)]) == 2
    assert "no such data file" in capsys.readouterr().err
    from glm4.cli import main as cli

    with pytest.raises(SystemExit) as e:  # argparse's own usage error for a bad flag value
        cli(["pretrain", "--config", str(recipe), "--lr", "abc"])
    assert e.value.code == 2


def test_lr_scale_groups_by_name_prefix():
    """lr_scale: the longest matching prefix sets a parameter's multiplier; decay only on >= 2-D weights; the
    schedule scales every group alike; a bad mapping is a RecipeError."""
    from torch import nn

    from glm4.train.loop import make_optimizer
    from glm4.train.recipe import RecipeError, TrainArgs

    m = nn.ModuleDict({"lm": nn.ModuleDict({"a": nn.Linear(4, 4), "head": nn.Linear(4, 2)}), "tower": nn.Linear(4, 4)})
    a = TrainArgs(lr=1e-3, lr_scale={"lm.": 0.1, "lm.head.": 0.5}, weight_decay=0.05, warmup_steps=0, max_steps=10)
    opt, sched = make_optimizer(m, a)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    got = {n: by_param[id(p)] for n, p in m.named_parameters()}
    assert got["tower.weight"] == (1e-3, 0.05) and got["tower.bias"] == (1e-3, 0.0)
    assert got["lm.a.weight"] == pytest.approx((1e-4, 0.05)) and got["lm.head.bias"] == pytest.approx((5e-4, 0.0))
    assert opt.param_groups[0]["lr"] == 1e-3  # the unscaled group first: logs.csv reports the recipe's lr
    sched.step()
    ratios = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
    assert ratios == pytest.approx([ratios[0]] * len(ratios)) and ratios[0] < 1
    with pytest.raises(RecipeError, match="lr_scale"):
        make_optimizer(m, TrainArgs(lr_scale={"lm.": "fast"}))
