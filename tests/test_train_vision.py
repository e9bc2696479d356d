"""Vision SFT (glm4 finetune on a glm4v checkpoint): GLM-4V jsonl with image paths, labels, positions, full and LoRA
training, the frozen tower, export that loads and answers through the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from glm4.train.data import DataError
from glm4.train.finetune import RecipeError, run
from glm4.train.objectives import IGNORE

pytest.importorskip("tokenizers")
from vision_checkpoint import write_tokenizer  # noqa: E402

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def tiny_glm4v(folder, seed: int = 0):
    """A random glm4v checkpoint built by glm4 itself (no transformers), with a BPE tokenizer carrying <|image|>."""
    from glm4.config import config_from_dict
    from glm4.models import build_model
    from glm4.train.loop import init_weights
    from glm4.weights import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(folder)
    text = dict(model_type="glm4v_text", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                partial_rotary_factor=0.5, mrope_section=[1, 1, 2], pad_token_id=0, attention_bias=True,
                eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  image_size=28, spatial_merge_size=2, temporal_patch_size=2)
    cfg = dict(model_type="glm4v", text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
               video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
               image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
               video_end_token_id=ids["<|end_of_video|>"])
    torch.manual_seed(seed)
    model = build_model(config_from_dict(cfg))
    init_weights(model, 0.02, seed)
    save_checkpoint(model, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 2 * 56 * 56,
                                                                          "longest_edge": 2 * 56 * 56}}))
    return folder


def shape_picture(color: str, circle: bool) -> Image.Image:
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    d = ImageDraw.Draw(img)
    (d.ellipse if circle else d.rectangle)((10, 10, 46, 46), fill=COLORS[color])
    return img


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_glm4v(tmp_path_factory.mktemp("vt") / "glm4v")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two pictures (a red square, a blue circle), GLM-4V's record shape: `image` on the first user turn."""
    d = tmp_path_factory.mktemp("vdata")
    (d / "img").mkdir()
    shape_picture("red", False).save(d / "img" / "red.png")
    shape_picture("blue", True).save(d / "img" / "blue.png")
    recs = [{"messages": [{"role": "user", "content": "What color is it?", "image": f"img/{c}.png"},
                          {"role": "assistant", "content": c}]} for c in COLORS]
    recs.append({"messages": [{"role": "user", "content": [{"type": "image", "image": str(d / "img" / "blue.png")},
                                                          {"type": "text", "text": "What color is it?"}]},
                              {"role": "assistant", "content": "blue"},
                              {"role": "user", "content": "Describe the picture briefly, please."},
                              {"role": "assistant", "content": "A blue circle."}]})
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _dataset(ckpt, data):
    from glm4.train.common import load_chat_data_tools
    from glm4.train.finetune import FinetuneArgs, vision_data

    tok, fmt = load_chat_data_tools(ckpt)
    ds, _, _ = vision_data(FinetuneArgs(model=str(ckpt), data=str(data)), tok, fmt, ckpt)
    return tok, ds


def test_encoding_labels_placeholders_and_positions(ckpt, data):
    from glm4.weights import load_model

    tok, ds = _dataset(ckpt, data)
    model = load_model(ckpt, progress=False)
    image_id = model.config.image_token_id
    s = ds.rows[0]
    ids = torch.tensor([s["input_ids"]])
    assert s["grids"] == [(1, 4, 4)]  # 56 x 56 -> a 4 x 4 patch grid -> 4 image tokens
    assert s["input_ids"].count(image_id) == 4
    targets = [t for t in s["targets"] if t != IGNORE]
    assert tok.decode(targets) == "\nred<|user|>"  # the assistant's text and the token that ends its turn
    assert all(s["targets"][i - 1] == IGNORE for i, t in enumerate(s["input_ids"]) if t == image_id)
    expected, _ = model.rope_index(ids, image_grid_thw=[(1, 4, 4)])
    assert np.array_equal(s["positions"], expected[0].numpy())
    multi = ds.rows[2]  # two assistant turns, the picture given as a content part
    assert tok.decode([t for t in multi["targets"] if t != IGNORE]) == "\nblue<|user|>\nA blue circle.<|user|>"


def test_bad_records_are_typed_errors(ckpt, tmp_path):
    from glm4.train.common import load_chat_data_tools
    from glm4.train.vision_data import ImageCache, VisionSFTDataset

    tok, fmt = load_chat_data_tools(ckpt)
    from glm4.chat.media import MediaPolicy

    policy = MediaPolicy.for_checkpoint(ckpt, tok)
    for rec, msg in (({"messages": [{"role": "user", "content": "hi", "image": "missing.png"},
                                    {"role": "assistant", "content": "x"}]}, "image not found"),
                     ({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "x", "image": "a.png"}]}, "only user messages")):
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps(rec) + "\n")
        with pytest.raises(DataError, match=msg):
            VisionSFTDataset.from_jsonl(p, tok, fmt, policy, cache=ImageCache())


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_full_sft_learns_the_pictures_and_the_export_answers_through_the_engine(ckpt, data, tmp_path):
    from glm4 import LLM, SamplingParams
    from glm4.weights import load_model

    out = tmp_path / "full"
    hist = run(model=str(ckpt), data=str(data), output=str(out), method="full", freeze_vision=False, max_steps=60,
               batch_size=4, lr=3e-3, warmup_steps=5, progress=False, plot=False, tensorboard=False, seed=0)
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]
    assert (out / "preprocessor_config.json").is_file() and (out / "config.json").is_file()
    reloaded = load_model(out, progress=False)
    assert reloaded.config.model_type == "glm4v"
    llm = LLM(str(out), linear="torch")
    params = SamplingParams(temperature=0, max_tokens=6)
    for color, circle in (("red", False), ("blue", True)):
        path = tmp_path / f"{color}.png"
        shape_picture(color, circle).save(path)
        r = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                   {"type": "text", "text": "What color is it?"}]}], params=params)
        assert r.content == color  # the reply depends on the picture: the tower was trained


def _train_steps(ckpt, data, tmp_path, steps=3, **kw):
    """(model before, model after) parameters of a short run, and the trained model."""
    from glm4.train.common import load_base_model, load_chat_data_tools
    from glm4.train.finetune import FinetuneArgs, prepare_method, vision_data
    from glm4.train.loop import train

    a = FinetuneArgs(model=str(ckpt), data=str(data), output=str(tmp_path / "o"), max_steps=steps, batch_size=3,
                     lr=1e-2, progress=False, plot=False, tensorboard=False, **kw)
    tok, fmt = load_chat_data_tools(ckpt)
    model = load_base_model(a.model)
    ds, _, make_task = vision_data(a, tok, fmt, ckpt)
    prepare_method(model, a)
    before = _params(model)
    train(model, make_task(model, None), ds, a)
    return before, _params(model), model


@pytest.mark.parametrize("lora_on,prefixes", [("merger", ("model.visual.merger.",)),
                                               ("language_model", ("model.language_model.layers.",)),
                                               ("language_model,merger", ("model.visual.merger.",
                                                                          "model.language_model.layers."))])
def test_lora_touches_only_the_chosen_modules(ckpt, data, tmp_path, lora_on, prefixes):
    before, after, model = _train_steps(ckpt, data, tmp_path, method="lora", lora_on=lora_on, lora_dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and n.startswith(prefixes) for n in trainable)
    assert all(any(n.startswith(p) for n in trainable) for p in prefixes)  # every chosen scope got adapters
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)  # the base weights (tower, LM, merger) never move


def test_frozen_tower_gets_no_gradient(ckpt, data, tmp_path):
    before, after, model = _train_steps(ckpt, data, tmp_path, method="full", freeze_vision=True)
    tower = [n for n in before if n.startswith("model.visual.") and not n.startswith("model.visual.merger.")]
    assert tower and all(not model.get_parameter(n).requires_grad and model.get_parameter(n).grad is None
                         and torch.equal(before[n], after[n]) for n in tower)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("model.visual.merger.") for n in moved)
    assert any(n.startswith("model.language_model.") for n in moved)
    _, after2, _ = _train_steps(ckpt, data, tmp_path / "b", method="full", freeze_vision=False)
    assert any(not torch.equal(before[n], after2[n]) for n in tower)  # --no-freeze-vision trains it


def test_recipe_errors(ckpt, data, tmp_path):
    with pytest.raises(RecipeError, match="--merge"):
        run(model=str(ckpt), data=str(data), output=str(tmp_path), method="lora", freeze_vision=False, max_steps=1)
    with pytest.raises(RecipeError, match="lora_on"):
        run(model=str(ckpt), data=str(data), output=str(tmp_path), method="lora", lora_on="tower", max_steps=1)
    with pytest.raises(RecipeError, match="P-tuning"):
        run(model=str(ckpt), data=str(data), output=str(tmp_path), method="ptuning", max_steps=1)
