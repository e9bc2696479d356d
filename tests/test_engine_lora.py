"""Several LoRA adapters in one engine (glm4.engine.lora): a mixed batch of the base and 3 PEFT adapters, made with
the real `peft` package on the transformers model, runs in one forward per step and matches the reference
generator on the model with each adapter applied (glm4.load_model(base, adapter=...)); the prefix cache never
shares blocks across adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from glm4.engine import LLM, SamplingParams
from glm4.reference import generate

peft = pytest.importorskip("peft")

NEW = 6
# (name, PEFT LoraConfig keywords): a part of the fused qkv; the rest of the linears, with a per-module rank and
# alpha; everything with rsLoRA
ADAPTERS = [
    ("qv", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("kmlp", dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_up_proj", "down_proj"],
                  rank_pattern={"down_proj": 3}, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 12})),
    ("all", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
]


def write_peft_adapter(ref, folder, seed: int, **lora_kw):
    """A PEFT adapter on a copy of the transformers model, A and B random so that every update shows."""
    pm = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(lora_dropout=0.0, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in n else 1 / p.shape[1] ** 0.5))
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    from conftest import build_hf_model, save_hf

    tmp = tmp_path_factory.mktemp("lora")
    ref = build_hf_model("glm4", seed=0)
    folder = save_hf(ref, tmp / "base")
    adapters = {name: str(write_peft_adapter(ref, tmp / name, i + 1, **kw)) for i, (name, kw) in enumerate(ADAPTERS)}
    return folder, adapters


def prompts(lengths, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_run(model, prompt, new=NEW):
    """Greedy tokens of the reference generator and the log-softmax of every position of prompt + tokens."""
    toks = generate(model, torch.tensor([prompt]), max_new_tokens=new, eos_token_ids=[])[0, len(prompt):].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + toks]))[0]
    return toks, torch.log_softmax(logits.float(), -1)


@pytest.fixture(scope="module")
def references(base_and_adapters):
    from glm4.weights import load_model

    folder, adapters = base_and_adapters
    models = {None: load_model(folder)} | {name: load_model(folder, adapter=path) for name, path in adapters.items()}
    base_logits = models[None](torch.tensor([[5, 6, 7, 8]]))
    for name in adapters:  # each adapter changes the model
        assert not torch.allclose(models[name](torch.tensor([[5, 6, 7, 8]])), base_logits, atol=1e-3)
    return models


def count_forwards(llm):
    """Every forward of the engine's model embeds its tokens once: record the LoRA row groups of each."""
    seen = []  # per forward: (rows in the step, [(adapter slot, its rows)])
    lora = llm.engine.runner.lora
    llm.model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: seen.append((lora.num_rows, [(s, lora.num_rows if r is None else len(r)) for s, r in lora.groups])))
    return seen


@pytest.mark.parametrize("engine_args", [{}, {"fuse_projections": False}, {"max_num_batched_tokens": 9}],
                         ids=["fused", "unfused", "chunked"])
def test_mixed_batch_equals_each_merged_adapter(base_and_adapters, references, engine_args):
    folder, adapters = base_and_adapters
    llm = LLM(folder, linear="torch", lora=adapters, **engine_args)
    assert llm.engine.lora_names == ["qv", "kmlp", "all"]
    ps = prompts([5, 9, 3, 12, 7, 4, 10, 6])
    names = [None, "qv", "kmlp", "all"] * 2
    params = [SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3, lora=n)
              for n in names]
    steps = count_forwards(llm)
    outs = llm.generate(ps, params)
    assert len(steps) == llm.engine.stats["steps"]  # one forward per engine step
    full_mix = [g for total, g in steps if len(g) == 3 and sum(n for _, n in g) < total]  # + base rows
    assert full_mix, "no step ran the base and all 3 adapters together"
    for p, name, o in zip(ps, names, outs):
        toks, logp = reference_run(references[name], p)
        assert o.token_ids == toks, f"adapter {name}"
        for j, entry in enumerate(o.outputs[0].logprobs):
            row = logp[len(p) - 1 + j]
            assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
            want = torch.topk(row, 3)
            got = [lp for _, lp in entry["top_logprobs"]]
            torch.testing.assert_close(torch.tensor(got), want.values, rtol=0, atol=1e-4)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prompt_logprobs_on_an_adapter(base_and_adapters, references):
    folder, adapters = base_and_adapters
    llm = LLM(folder, linear="torch", lora=adapters)
    p = prompts([11], seed=4)[0]
    out = llm.generate([p, p], [SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, lora="kmlp"),
                                SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)])
    for o, name in zip(out, ["kmlp", None]):
        _, logp = reference_run(references[name], p, new=1)
        got = [e["logprob"] for e in o.prompt_logprobs[1:]]
        want = [logp[j, p[j + 1]].item() for j in range(len(p) - 1)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)


def test_prefix_cache_never_shares_blocks_across_adapters(base_and_adapters, references):
    folder, adapters = base_and_adapters
    llm = LLM(folder, linear="torch", lora=adapters, block_size=4)
    p = prompts([30], seed=7)[0]
    greedy = dict(max_tokens=NEW, temperature=0, ignore_eos=True)
    first = llm.generate([p], SamplingParams(lora="qv", **greedy))[0]
    assert first.num_cached_tokens == 0
    for name in ["kmlp", None, "all"]:  # same tokens, other adapter: nothing cached
        o = llm.generate([p], SamplingParams(lora=name, **greedy))[0]
        assert o.num_cached_tokens == 0, name
        assert o.token_ids == reference_run(references[name], p)[0]
    again = llm.generate([p], SamplingParams(lora="qv", **greedy))[0]  # same adapter: the prefix is reused
    assert again.num_cached_tokens == 28 and again.token_ids == first.token_ids
    # and the cached blocks of two adapters are distinct blocks
    seqs = {}
    for name in ("qv", "kmlp"):
        rid = llm.engine.add_request(None, p, SamplingParams(lora=name, max_tokens=1))
        seqs[name] = llm.engine.requests[rid][0]
    llm.engine.step()
    assert not set(seqs["qv"].block_table) & set(seqs["kmlp"].block_table)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_unknown_and_bad_adapters(base_and_adapters, tmp_path):
    from glm4.layers.lora import AdapterError

    folder, adapters = base_and_adapters
    llm = LLM(folder, linear="torch", lora={"qv": adapters["qv"]})
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; loaded: qv"):
        llm.engine.add_request(None, [1, 2, 3], SamplingParams(lora="nope"))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(AdapterError, match="already loaded"):
        llm.engine.add_lora("qv", adapters["qv"])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        llm.engine.add_lora("empty", tmp_path)
    # an adapter for a model of another width: a one-line error naming the tensor, nothing half-installed
    from conftest import build_hf_model

    other = build_hf_model("glm4", seed=1, hidden_size=32, head_dim=8)
    write_peft_adapter(other, tmp_path / "other", 9, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    with pytest.raises(AdapterError, match="another model"):
        llm.engine.add_lora("other", tmp_path / "other")
    assert llm.engine.lora_names == ["qv"]
    with pytest.raises(ValueError, match="lora must"):
        SamplingParams(lora="")


def test_moe_dense_mlp_fused_gate_up(tmp_path):
    """Glm4Moe's dense MLP and shared experts hold gate_proj / up_proj (one gate_up_proj in the engine): an
    adapter on them, stacked into the fused linear, matches the model with the adapter applied. (Written with
    glm4's trainer tools: PEFT 0.21 turns gate_proj / up_proj targets on this transformers class into
    `target_parameters` on the routed experts, which the engine refuses by name.)"""
    from conftest import build_hf_model, save_hf

    from glm4.layers.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
    from glm4.weights import load_model

    folder = save_hf(build_hf_model("glm4_moe", seed=0), tmp_path / "base")
    trained = load_model(folder)
    apply_lora(trained, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["gate_proj", "up_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(trained).values():
            m.lora_B.weight.copy_(0.3 * torch.randn(m.lora_B.weight.shape, generator=g))
    adapter = save_adapter(trained, tmp_path / "gu")
    llm = LLM(folder, linear="torch", lora={"gu": str(adapter)})
    fused = [n for n, m in llm.model.named_modules() if type(m).__name__ == "MultiLoRALinear"]
    assert any(n.endswith("0.mlp.gate_up_proj") for n in fused) and any("shared_experts.gate_up_proj" in n for n in fused)
    ps = prompts([6, 11], seed=9)
    names = ("gu", "gu", None, None)
    outs = llm.generate(ps * 2, [SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, lora=n) for n in names])
    models = {"gu": load_model(folder, adapter=adapter), None: load_model(folder)}
    for p, o, name in zip(ps * 2, outs, names):
        toks, logp = reference_run(models[name], p)
        assert o.token_ids == toks, name
    assert outs[0].token_ids != outs[2].token_ids or outs[1].token_ids != outs[3].token_ids


def test_peft_expert_parameters_are_refused(tmp_path):
    from conftest import build_hf_model, save_hf

    from glm4.layers.lora import AdapterError

    ref = build_hf_model("glm4_moe", seed=0)
    folder = save_hf(ref, tmp_path / "base")
    adapter = write_peft_adapter(ref, tmp_path / "experts", 5, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "v_proj"])
    with pytest.raises(AdapterError, match="target_parameters"):
        LLM(folder, linear="torch", lora={"experts": str(adapter)})
