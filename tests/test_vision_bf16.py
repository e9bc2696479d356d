"""The vision models in bfloat16 (`glm4.load_model(dtype="bfloat16")`, `--dtype bfloat16`): close to fp32.

The tolerance is the reference's own bf16 error: bf16 keeps 8 significant bits, so any implementation run in bf16
moves away from its fp32 result by rounding alone, by an amount set by the shapes and weights rather than by the
code. The same weights and inputs run in bf16 through the reference (transformers' classes; for GLM-4V-9B the
original visual.py's bf16 numbers in the fixture and GlmForCausalLM) give that amount; glm4's bf16 distance from the
fp32 reference must stay within 2x of it (different but equally valid op orders and fp32 accumulations move it
somewhat; a real bug — a dropped cast, a norm or softmax computed in bf16 where the reference keeps fp32 — moves
it by much more). Distances are relative L2 over all logits."""

from __future__ import annotations

import pytest
import torch

import glm4

transformers = pytest.importorskip("transformers")
from conftest import randomize_  # noqa: E402
from test_vision import IMG, USER, hf_config, hf_logits, model_inputs, our_logits, picture  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
def test_glm4v_bf16_is_as_close_to_fp32_as_transformers_bf16(kind, tmp_path):
    cls = transformers.Glm4vMoeForConditionalGeneration if kind == "glm4v_moe" else transformers.Glm4vForConditionalGeneration
    torch.manual_seed(0)
    hf = randomize_(cls(hf_config(kind)).float().eval(), seed=1)
    hf.save_pretrained(tmp_path)
    ours = glm4.load_model(tmp_path, dtype="bfloat16", progress=False)
    assert {p.dtype for n, p in ours.named_parameters() if "e_score_correction_bias" not in n and "mlp.gate." not in n} \
        == {torch.bfloat16}
    assert ours.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    inputs = model_inputs(USER + IMG + "What is in the picture?" + IMG + "<|assistant|>\n",
                          [picture(64, 64, 1), picture(90, 40, 2)])
    ref = hf_logits(hf, inputs)
    hf16 = hf.to(torch.bfloat16)
    yardstick = _rel(hf_logits(hf16, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                      for k, v in inputs.items()}), ref)
    got = _rel(our_logits(ours, inputs), ref)
    print(f"{kind} bf16 vs fp32: glm4 {got:.4f}, transformers {yardstick:.4f} (relative L2 of the logits)")
    assert 0 < got < 2 * yardstick


def test_glm4v_9b_bf16_is_as_close_to_fp32_as_the_original_in_bf16(tmp_path):
    from conftest import build_hf_model, save_hf
    from test_glm4v_9b import _fixture, _prompt, _reference_logits, write_glm4v_9b

    ref = build_hf_model("glm", seed=3)
    folder = write_glm4v_9b(tmp_path / "glm4v_9b", save_hf(ref, tmp_path / "hf"))
    ours32 = glm4.load_model(folder, progress=False)
    ours16 = glm4.load_model(folder, dtype="bfloat16", progress=False)
    _, t = _fixture()
    images = t["input.images"]
    # the tower: the original's bf16 output (fixture) is the yardstick
    with torch.no_grad():
        tower = _rel(ours16.transformer.vision(images), t["output.features"])
    tower_yardstick = _rel(t["output.features_bf16"], t["output.features"])
    print(f"GLM-4V-9B tower bf16 vs fp32: glm4 {tower:.4f}, visual.py {tower_yardstick:.4f}")
    assert 0 < tower < 2 * tower_yardstick
    # the whole model: GlmForCausalLM in bf16 fed the original's bf16 image vectors is the yardstick
    ids = torch.tensor([_prompt(4, 9, 0), _prompt(9, 4, 1)])
    want = _reference_logits(ref, ours32, ids, images)
    with torch.no_grad():
        got = _rel(ours16(ids, images=images), want)
    ref16 = ref.to(torch.bfloat16)
    feats16 = t["output.features_bf16"]
    embeds, positions = [], []
    for b, row in enumerate(ids.tolist()):
        s = row.index(120)
        e = ref16.model.embed_tokens(ids[b])
        pos = torch.arange(len(row))
        embeds.append(torch.cat([e[:s], feats16[b], e[s + 3:]]))
        positions.append(torch.cat([pos[:s + 1], pos[s + 1].repeat(feats16.shape[1] - 2), pos[s + 2:]]))
    with torch.no_grad():
        yardstick = _rel(ref16(inputs_embeds=torch.stack(embeds), position_ids=torch.stack(positions)).logits, want)
    print(f"GLM-4V-9B bf16 vs fp32: glm4 {got:.4f}, GlmForCausalLM + visual.py in bf16 {yardstick:.4f}")
    assert 0 < got < 2 * yardstick


def test_serve_with_dtype_bfloat16_answers_an_image(tmp_path):
    import openai
    from test_serve_util import ServerThread
    from vision_checkpoint import data_uri, write_checkpoint

    from glm4.serve.app import build_state, create_app

    st = build_state(str(write_checkpoint(tmp_path / "glm4v")), model_name="m", kv_cache_tokens=2048,
                     dtype="bfloat16")
    srv = ServerThread(create_app(st)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(picture(80, 60, 3))}},
                                             {"type": "text", "text": "What is it?"}]}]
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    finally:
        srv.stop()
    eng = st.engine.engine if hasattr(st.engine, "engine") else st.engine
    assert eng.model.lm_head.weight.dtype == torch.bfloat16  # stored as asked (norms and convs widen on AVX2-only CPUs)
