"""GLM-4V-9B (`chatglm` + `vision_config`): the EVA2-CLIP tower against numbers computed by the checkpoint's own
`visual.py` (tests/fixtures/glm4v_9b, source in its README), the language half against transformers' GlmForCausalLM
with the image vectors spliced in and the remote code's position ids, and the expanded (engine) form against the
remote-code form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glm4
from glm4.config import ChatGLMVisionConfig, ConfigError, EVA2CLIPVisionConfig, config_from_dict
from glm4.layers.attention import KVCache
from glm4.media.glm4v_9b import expand_image_placeholders, preprocess_square
from glm4.media.image import CLIP_MEAN, CLIP_STD, MediaError

FIXTURE = Path(__file__).parent / "fixtures" / "glm4v_9b" / "tower_reference.safetensors"
BOI, EOI, FILLER = 120, 121, 122  # the tiny vocabulary's image markers (151339, 151340, 151329 in the checkpoint)
TOL = 1e-4


def _fixture():
    from safetensors import safe_open

    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def write_glm4v_9b(folder: Path, lm_folder: Path) -> Path:
    """A tiny GLM-4V-9B folder: a chatglm checkpoint (tests' to_chatglm) plus the fixture's tower and vision_config."""
    from conftest import to_chatglm
    from safetensors.torch import load_file, save_file

    out = to_chatglm(lm_folder, folder)
    meta, tensors = _fixture()
    sd = load_file(out / "model.safetensors")
    sd.update({k: v for k, v in tensors.items() if k.startswith("transformer.vision.")})
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == int(meta["hidden_size"]) and cfg["ffn_hidden_size"] == int(meta["ffn_hidden_size"])
    cfg.update(vision_config=json.loads(meta["vision_config"]), boi_token_id=BOI, eoi_token_id=EOI,
               _name_or_path="THUDM/glm-4v-9b")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers GlmForCausalLM reference, glm4 GLM-4V-9B model, folder)."""
    pytest.importorskip("transformers")
    from conftest import build_hf_model, save_hf

    tmp = tmp_path_factory.mktemp("glm4v_9b")
    ref = build_hf_model("glm", seed=3)
    folder = write_glm4v_9b(tmp / "glm4v_9b", save_hf(ref, tmp / "hf"))
    return ref, glm4.load_model(folder, progress=False), folder


def _prompt(before: int, after: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 110, (n,), generator=g).tolist()  # noqa: E731
    return text(before) + [BOI, FILLER, EOI] + text(after)


def _reference_logits(ref, model, ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The remote code's splice written out: the 3 placeholder embeddings -> the tower's vectors; positions up to
    boi kept, every patch at boi + 1, eoi and after kept; then GlmForCausalLM on those embeddings and positions."""
    feats = model.transformer.vision(images)  # checked against visual.py's numbers in test_tower_*
    n_patch = feats.shape[1] - 2
    embeds, positions = [], []
    for b, row in enumerate(ids.tolist()):
        s = row.index(BOI)
        e = ref.model.embed_tokens(ids[b])
        pos = torch.arange(len(row))
        embeds.append(torch.cat([e[:s], feats[b], e[s + 3:]]))
        positions.append(torch.cat([pos[:s + 1], pos[s + 1].repeat(n_patch), pos[s + 2:]]))
    with torch.no_grad():
        return ref(inputs_embeds=torch.stack(embeds), position_ids=torch.stack(positions)).logits


# ---- the tower against the original visual.py -----------------------------------------------------------------

def test_tower_matches_original_visual_py(pair):
    _, model, _ = pair
    _, t = _fixture()
    with torch.no_grad():
        got = model.transformer.vision(t["input.images"])
    want = t["output.features"]
    assert got.shape == want.shape == (2, 11, 64)  # boi + 3 x 3 merged patches + eoi, per image
    diff = (got - want).abs().max().item()
    print(f"EVA2-CLIP tower vs visual.py: max |diff| = {diff:.3g} (|out| mean {want.abs().mean():.3g})")
    assert diff < 1e-5


def test_checkpoint_names_are_the_hubs(pair):
    _, model, folder = pair
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"transformer.vision.patch_embedding.cls_embedding", "transformer.vision.boi", "transformer.vision.eoi",
            "transformer.vision.conv.weight", "transformer.vision.linear_proj.dense_4h_to_h.weight",
            "transformer.vision.transformer.layers.1.attention.query_key_value.bias",
            "transformer.vision.transformer.layers.0.post_attention_layernorm.weight"} <= names
    assert set(model.checkpoint_state_dict()) == {n for n in names if not model.skip_checkpoint_key(n)}
    assert type(model).__name__ == "ChatGLMVisionForConditionalGeneration"
    assert model.config.model_type == "chatglm" and model.num_image_tokens == 11


def test_default_vision_config_is_glm4v_9b():
    vc = EVA2CLIPVisionConfig()
    assert (vc.grid_side, vc.num_image_tokens, vc.num_positions) == (80, 1602, 6401)
    cfg = config_from_dict({"model_type": "chatglm", "hidden_size": 4096, "num_layers": 40, "num_attention_heads": 32,
                            "ffn_hidden_size": 13696, "padded_vocab_size": 151552, "kv_channels": 128,
                            "vision_config": {"image_size": 1120, "patch_size": 14, "num_positions": 6401,
                                              "hidden_size": 1792, "num_heads": 16, "scaling_factor": 8}})
    assert isinstance(cfg, ChatGLMVisionConfig) and (cfg.boi_token_id, cfg.eoi_token_id) == (151339, 151340)
    with pytest.raises(ConfigError, match="num_positions"):
        EVA2CLIPVisionConfig(image_size=56, patch_size=14, num_positions=10)


# ---- the language half: GlmForCausalLM with the image vectors spliced in ------------------------------------------

def test_remote_form_logits_match_glm_with_spliced_images(pair):
    ref, model, _ = pair
    _, t = _fixture()
    ids = torch.tensor([_prompt(4, 9, 0), _prompt(9, 4, 1)])  # the image early in one row, late in the other
    with torch.no_grad():
        got = model(ids, images=t["input.images"])
    want = _reference_logits(ref, model, ids, t["input.images"])
    assert got.shape == want.shape == (2, ids.shape[1] + 8, 128)  # 3 placeholder tokens -> 11 vectors
    diff = (got - want).abs().max().item()
    print(f"GLM-4V-9B language half vs GlmForCausalLM (spliced): max |logits diff| = {diff:.3g}")
    assert diff < TOL
    # the position scheme matters: the same vectors at plain 0..T-1 positions give other logits
    with torch.no_grad():
        embeds, _ = model.splice_images(ids, t["input.images"])
        plain = model.transformer.output_layer(
            model.hidden_states(ids, None, None, inputs_embeds=embeds))
    assert (plain - want).abs().max().item() > 100 * TOL


def test_expanded_form_equals_remote_form(pair):
    _, model, _ = pair
    _, t = _fixture()
    row = _prompt(5, 6, 2)
    expanded = torch.tensor([expand_image_placeholders(row, BOI, EOI, FILLER, model.num_image_tokens)])
    assert expanded.shape[1] == len(row) + 8
    positions, deltas = model.rope_index(expanded)
    s = row.index(BOI)
    assert positions[0, :, 0].tolist() == list(range(s + 1)) + [s + 1] * 9 + list(range(s + 2, len(row)))
    assert torch.equal(positions[..., 0], positions[..., 1]) and deltas.tolist() == [-8]
    with torch.no_grad():
        a = model(torch.tensor([row]), images=t["input.images"][:1])
        b = model(expanded, pixel_values=t["input.images"][:1])
    assert (a - b).abs().max().item() < 1e-5


def test_greedy_decoding_with_cache_matches_reference(pair):
    ref, model, _ = pair
    _, t = _fixture()
    img = t["input.images"][1:]
    row = _prompt(6, 5, 4)
    n = 6
    # reference: GlmForCausalLM over the spliced prompt plus the tokens so far, recomputed every step
    out = list(row)
    for _ in range(n):
        nxt = int(_reference_logits(ref, model, torch.tensor([out]), img)[0, -1].argmax())
        out.append(nxt)
    # glm4: expanded prompt prefilled into a KV cache, then decoded one token at a time at index + rope delta
    expanded = torch.tensor([expand_image_placeholders(row, BOI, EOI, FILLER, model.num_image_tokens)])
    T = expanded.shape[1]
    positions, deltas = model.rope_index(expanded)
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 1, T + n, cfg.num_key_value_heads, cfg.head_dim)
    got = list(row)
    with torch.no_grad():
        logits = model(expanded, pixel_values=img, positions=positions, ctx=cache)[:, -1]
        cache.advance(T)
        for i in range(n):
            tok = int(logits.argmax())
            got.append(tok)
            logits = model(torch.tensor([[tok]]), positions=torch.tensor([[T + i]]) + deltas[:, None], ctx=cache)[:, -1]
            cache.advance(1)
    assert got == out


def test_placeholder_errors_are_clear(pair):
    _, model, _ = pair
    _, t = _fixture()
    with pytest.raises(ValueError, match="one image per sequence"):
        model(torch.tensor([_prompt(3, 3, 5)]), images=t["input.images"])
    with pytest.raises(ValueError, match="exactly one"):
        model(torch.tensor([[5, 6, 7, 8]]), images=t["input.images"][:1])
    with pytest.raises(ValueError, match="must be \\[n, 3, 42, 42\\]"):
        model.transformer.vision(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="expand the prompt"):
        model.token_types(torch.tensor([_prompt(2, 2, 6)]))
    with pytest.raises(MediaError, match="must be followed"):
        expand_image_placeholders([1, BOI, 2, 3, EOI], BOI, EOI, FILLER)


# ---- preprocessing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(64, 64), (300, 120), (17, 333)])
def test_preprocess_square_is_torchvision_resize_totensor_normalize(w, h):
    """The remote tokenizer's transform, step by step with PIL and torch (torchvision's CPU wheel does not load here):
    Resize((S, S), BICUBIC) on a PIL image is PIL's bicubic resize; ToTensor is uint8 -> float32 / 255;
    Normalize is (x - mean) / std in float32."""
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = preprocess_square([img], image_size=56)
    x = torch.from_numpy(np.array(img.resize((56, 56), Image.Resampling.BICUBIC))).permute(2, 0, 1).float().div(255)
    x = x.sub(torch.tensor(CLIP_MEAN)[:, None, None]).div(torch.tensor(CLIP_STD)[:, None, None])
    assert out["pixel_values"].shape == (1, 3, 56, 56) and out["pixel_values"].dtype == np.float32
    assert np.array_equal(out["pixel_values"][0], x.numpy())
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


# ---- the engine ---------------------------------------------------------------------------------------------------

def test_engine_batches_glm4v_9b_requests_like_the_model(pair):
    """Expanded prompts with their images through the paged engine (prefix caching on, a 7-token chunk budget so
    chunks end inside the image spans, 11 rows here, 1602 in the checkpoint) equal a full-recompute greedy loop."""
    from glm4.engine import LLM, SamplingParams

    _, model, _ = pair
    _, t = _fixture()
    rows = [_prompt(5, 6, 7), _prompt(2, 9, 8), _prompt(5, 6, 7)]  # the third repeats the first: cached blocks
    images = [t["input.images"][0:1], t["input.images"][1:2], t["input.images"][0:1]]
    grid = np.array([model.image_grid()])
    reqs = [(expand_image_placeholders(r, BOI, EOI, FILLER, model.num_image_tokens),
             {"pixel_values": img.numpy(), "image_grid_thw": grid}) for r, img in zip(rows, images)]
    want = []
    for ids, mm in reqs:
        seq = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(5):
                seq = torch.cat([seq, model(seq, pixel_values=torch.from_numpy(mm["pixel_values"]))[:, -1:].argmax(-1)], 1)
        want.append(seq[0, len(ids):].tolist())
    llm = LLM.from_model(model, linear="torch", block_size=4, max_num_batched_tokens=7)
    outs = llm.generate([ids for ids, _ in reqs], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                        [mm for _, mm in reqs])
    assert [o.outputs[0].token_ids for o in outs] == want


# ---- chat and the server -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny GLM-4V-9B folder with a real tokenizer (GLM-4's special tokens): boi / eoi are the tokenizer's."""
    pytest.importorskip("transformers")
    from conftest import build_hf_model, save_hf
    from vision_checkpoint import write_tokenizer

    tmp = tmp_path_factory.mktemp("glm4v_9b_chat")
    folder = tmp / "glm4v_9b"
    folder.mkdir()
    ids = write_tokenizer(folder)
    write_glm4v_9b(folder, save_hf(build_hf_model("glm", seed=3, vocab_size=512), tmp / "hf"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(boi_token_id=ids["<|begin_of_image|>"], eoi_token_id=ids["<|end_of_image|>"],
               eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder, ids


def test_chat_renders_the_remote_tokenizers_image_prefix(chat_checkpoint):
    from vision_checkpoint import picture

    from glm4.chat.planner import ChatError
    from glm4.engine import LLM, SamplingParams
    from glm4.engine.chat import chat_layer_for

    folder, ids = chat_checkpoint
    llm = LLM(folder, linear="torch", block_size=4)
    planner, tok, _ = chat_layer_for(llm)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image", "image": picture(90, 60, 1)}]}]
    plan = planner.plan(msgs)
    # the tokenizer's apply_chat_template: <|user|> "\n", then boi <|endoftext|> eoi, then the text (the image
    # goes first whatever the part order); glm4 expands the middle token to one row per tower vector
    boi, eot, eoi = ids["<|begin_of_image|>"], ids["<|endoftext|>"], ids["<|end_of_image|>"]
    want = tok.encode("[gMASK]<sop><|user|>\n", allow_special=True) + [boi] + [eot] * 9 + [eoi] + \
        tok.encode("What is it?<|assistant|>", allow_special=True)
    assert plan.prompt_ids == want
    assert plan.multi_modal_data["pixel_values"].shape == (1, 3, 42, 42)
    assert plan.multi_modal_data["image_grid_thw"].tolist() == [[1, 6, 6]]
    two = [{"role": "user", "content": [{"type": "image", "image": picture(40, 40, 2)}, {"type": "text", "text": "a"}]},
           {"role": "assistant", "content": "b"},
           {"role": "user", "content": [{"type": "image", "image": picture(40, 40, 3)}, {"type": "text", "text": "c"}]}]
    with pytest.raises(ChatError, match="over the limit of 1 images per request"):
        planner.plan(two)
    policy, planner.media = planner.media, planner.media.with_limits(max_images=2)
    try:  # a looser limit (--limit-mm-per-prompt image=2) still meets the format's rule
        with pytest.raises(ChatError, match="one image per conversation"):
            planner.plan(two)
    finally:
        planner.media = policy
    result = llm.chat(msgs, params=SamplingParams(max_tokens=4, temperature=0))
    direct = llm.generate([plan.prompt_ids], planner.sampling_params(plan, SamplingParams(max_tokens=4, temperature=0)),
                          [plan.multi_modal_data])[0]
    assert result.content == planner.parse_full(plan, direct.outputs[0].text)[0]


def test_server_answers_a_glm4v_9b_image(chat_checkpoint):
    import openai
    from test_serve_util import ServerThread
    from vision_checkpoint import data_uri, picture

    from glm4 import LLM, SamplingParams
    from glm4.serve.app import build_state, create_app

    folder, _ = chat_checkpoint
    st = build_state(str(folder), model_name="m", kv_cache_tokens=2048)
    srv = ServerThread(create_app(st)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(picture(70, 50, 4))}},
                                             {"type": "text", "text": "Describe the image briefly, please."}]}]
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0)
        plan = st.chat.plan(msgs)
        assert r.usage.prompt_tokens == len(plan.prompt_ids)
        params = st.chat.sampling_params(plan, SamplingParams(max_tokens=6, temperature=0))
        (direct,) = LLM(folder, kv_cache_tokens=2048).generate([plan.prompt_ids], params, [plan.multi_modal_data])
        assert len(direct.outputs[0].token_ids) == r.usage.completion_tokens
        with pytest.raises(openai.BadRequestError, match="over the limit of 1 images"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": msgs[0]["content"] * 2}],
                                           max_tokens=2)
    finally:
        srv.stop()
