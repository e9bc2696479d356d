"""GLM blank infilling (inputs, 2-D positions, attention mask) on hand-worked examples; span sampling; collate."""

from __future__ import annotations

import random

import pytest
import torch

from glm4.train.objectives import (
    IGNORE,
    SpecialIds,
    blank_infilling_sample,
    blank_mask,
    blank_sample,
    causal_sample,
    collate,
    gmask_sample,
    make_sample,
    parse_objective,
    place_spans,
    sample_span_lengths,
)

IDS = SpecialIds(mask=90, gmask=91, sop=92, eop=93, pad=0)
M, G, S, E, X = 90, 91, 92, 93, IGNORE


def test_blank_infilling_hand_worked_in_order():
    toks = [10, 11, 12, 13, 14, 15, 16, 17]
    s = blank_sample(toks, [(1, 3), (5, 6)], IDS, rng=None)
    # Part A: spans 11 12 and 15 replaced by one [MASK] each; Part B: <sop>+span -> span+<eop>
    assert s["input_ids"] == [10, M, 13, 14, M, 16, 17, S, 11, 12, S, 15]
    assert s["targets"] == [X] * 7 + [11, 12, E, 15, E]
    assert s["positions"] == [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0],
                              [1, 1], [1, 2], [1, 3], [4, 1], [4, 2]]
    assert s["n_a"] == 7
    m = blank_mask(7, 12)
    want = torch.zeros(12, 12, dtype=torch.bool)
    want[:, :7] = True  # everyone sees all of Part A (Part A bidirectionally)
    for i in range(7, 12):
        want[i, 7:i + 1] = True  # Part B causal within B
    assert torch.equal(m, want)


def test_blank_infilling_shuffled_part_b():
    toks = [10, 11, 12, 13, 14, 15, 16, 17]
    rng = random.Random(0)
    order = [0, 1]
    random.Random(0).shuffle(order)
    s = blank_sample(toks, [(1, 3), (5, 6)], IDS, rng=rng)
    parts = {0: ([S, 11, 12], [11, 12, E], [[1, 1], [1, 2], [1, 3]]), 1: ([S, 15], [15, E], [[4, 1], [4, 2]])}
    want_in, want_t, want_p = [], [], []
    for j in order:
        want_in += parts[j][0]
        want_t += parts[j][1]
        want_p += parts[j][2]
    assert s["input_ids"][7:] == want_in and s["targets"][7:] == want_t and s["positions"][7:] == want_p


def test_gmask_document_level():
    toks = list(range(20, 30))
    s = gmask_sample(toks, IDS, random.Random(3))
    n_a = s["n_a"]
    ln = len(toks) - (n_a - 1)  # Part A = kept prefix + [gMASK]
    assert 5 <= ln <= 10  # 50-100 % of the document
    assert s["input_ids"][:n_a] == toks[:len(toks) - ln] + [G]
    assert s["input_ids"][n_a:] == [S] + toks[len(toks) - ln:]
    assert s["targets"][n_a:] == toks[len(toks) - ln:] + [E]
    assert [p[0] for p in s["positions"][n_a:]] == [n_a - 1] * (ln + 1)
    assert [p[1] for p in s["positions"][n_a:]] == list(range(1, ln + 2))


def test_span_sampling_covers_15_percent_and_never_overlaps():
    rng = random.Random(0)
    lens = []
    for _ in range(300):
        n = rng.randint(20, 200)
        L = sample_span_lengths(n, rng)
        spans = place_spans(n, L, rng)
        assert sum(L) >= round(0.15 * n)
        assert sum(L) < 0.15 * n + max(L) + 1  # stops as soon as the budget is reached
        assert all(0 <= a < b <= n for a, b in spans)
        assert all(spans[i][1] < spans[i + 1][0] for i in range(len(spans) - 1))  # a kept token between spans
        lens += L
    mean = sum(lens) / len(lens)
    assert 2.5 < mean < 4.0  # Poisson(3), floored at 1 and truncated at the budget


def test_blank_sample_targets_reconstruct_the_text():
    rng = random.Random(1)
    toks = list(range(100, 160))
    s = blank_infilling_sample(toks, IDS, rng)
    n_a = s["n_a"]
    # refill each [MASK] with its span from Part B (found by the mask position in positions[...,0])
    spans, cur = {}, None
    for _t, (p0, p1), tgt in zip(s["input_ids"][n_a:], s["positions"][n_a:], s["targets"][n_a:]):
        if p1 == 1:
            cur = spans.setdefault(p0, [])
        if tgt != E:
            cur.append(tgt)
    out = []
    for i, t in enumerate(s["input_ids"][:n_a]):
        out += spans[i] if t == M else [t]
    assert out == toks
    assert len(s["input_ids"]) == len(toks) + 2 * len(spans)  # one [MASK] and one <sop> per span


def test_collate_pads_and_masks():
    a = blank_sample([1, 2, 3, 4], [(1, 2)], IDS, None)  # len 6
    b = causal_sample([5, 6, 7, 8], two_d=True)  # len 3
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, 6) and batch["positions"].shape == (2, 6, 2)
    assert batch["targets"][1].tolist() == [6, 7, 8, X, X, X]
    m = batch["attn_mask"]
    assert m.shape == (2, 1, 6, 6)
    assert torch.equal(m[0, 0], blank_mask(4, 6))
    assert torch.equal(m[1, 0, :3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    assert m[1, 0, 3:, :].sum(-1).tolist() == [1, 1, 1]  # padded rows see only themselves (no NaN)


def test_parse_objective_and_mix():
    assert parse_objective("causal") == {"causal": 1.0}
    assert parse_objective("causal:3,gmask:1") == {"causal": 0.75, "gmask": 0.25}
    assert parse_objective({"blank": 1, "gmask": 1}) == {"blank": 0.5, "gmask": 0.5}
    for bad in ("nope", {"causal": -1}, {}):
        with pytest.raises(ValueError):
            parse_objective(bad)
    rng = random.Random(0)
    kinds = set()
    for _ in range(50):
        s = make_sample(list(range(1, 34)), parse_objective("causal:1,blank:1,gmask:1"), IDS, rng)
        assert isinstance(s["positions"][0], list)  # a mixed recipe uses 2-D positions everywhere
        kinds.add("n_a" not in s and "causal" or (G in s["input_ids"] and "gmask" or "blank"))
    assert kinds == {"causal", "blank", "gmask"}


def test_blank_mask_reaches_the_model(hf_checkpoint):
    """Through a real model: Part A is bidirectional and blind to Part B; Part B sees A and earlier B."""
    from glm4.layers.attention import Causal
    from glm4.weights import load_model

    folder, _ = hf_checkpoint("glm4")
    model = load_model(folder)
    ids = IDS.__class__(mask=120, gmask=121, sop=122, eop=123, pad=0)
    s = blank_sample([10, 11, 12, 13, 14, 15, 16, 17], [(1, 3), (5, 6)], ids, None)
    b = collate([s])

    def run(input_ids):
        with torch.no_grad():
            return model(input_ids, positions=b["positions"], ctx=Causal(mask=b["attn_mask"]))[0]

    base = run(b["input_ids"])
    changed_b = b["input_ids"].clone()
    changed_b[0, 9] = 50  # a Part-B token
    out = run(changed_b)
    assert torch.equal(out[:9], base[:9])  # Part A and earlier Part B do not see it
    assert not torch.allclose(out[9:], base[9:])
    changed_a = b["input_ids"].clone()
    changed_a[0, 6] = 50  # the last Part-A token
    out = run(changed_a)
    assert not torch.allclose(out[0], base[0])  # the first token sees later Part-A tokens


def test_example_recipes_parse():
    """Every recipes/examples/*.yaml is a valid recipe of its command."""
    from pathlib import Path

    from glm4.train.dpo import DPOArgs
    from glm4.train.finetune import FinetuneArgs
    from glm4.train.pretrain import PretrainArgs
    from glm4.train.recipe import parse_recipe

    root = Path(__file__).resolve().parents[1] / "recipes" / "examples"
    kinds = {"pretrain": PretrainArgs, "sft": FinetuneArgs, "dpo": DPOArgs}
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        args = parse_recipe(kinds[f.stem.split("_")[0]], ["--config", str(f)], "t")
        assert args.output.startswith("runs/")
        if f.stem.startswith("pretrain"):
            parse_objective(args.objective)
