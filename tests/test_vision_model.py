"""The shipped vision model (glm4/assets/vision): files, tokenizer, held-out easy-vqa pictures answered through
LLM.chat in English and Chinese, and the routing of `glm4 serve` / `glm4 chat --image` without --model.

Skips when the asset is not built yet (recipes/vision/ builds it). The pictures and questions are easy-vqa test
images (tests/fixtures/easy_vqa/README.md), never trained on.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm4.assets import DEFAULT_MODEL, VISION_MODEL

FIXTURES = Path(__file__).parent / "fixtures" / "easy_vqa"
QUESTIONS = json.loads((FIXTURES / "questions.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.skipif(not (VISION_MODEL / "model.safetensors").exists(),
                                reason=f"vision model not built yet ({VISION_MODEL})")


@pytest.fixture(scope="module")
def llm():
    from glm4 import LLM

    return LLM(str(VISION_MODEL))


def ask(llm, image: Path, question: str) -> str:
    from glm4 import SamplingParams

    r = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(image)},
                                               {"type": "text", "text": question}]}],
                 params=SamplingParams(temperature=0, max_tokens=8))
    return (r.content or "").strip()


def test_files_sizes_and_tokens():
    from glm4.config import load_config
    from glm4.tokenizer import load_tokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "preprocessor_config.json", "generation_config.json", "MODEL_CARD.md", "training_curves.png"):
        assert (VISION_MODEL / name).is_file(), name
    assets = VISION_MODEL.parent
    total = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"all shipped assets are {total / 2**20:.1f} MiB"
    cfg = load_config(VISION_MODEL)
    tok, text_tok = load_tokenizer(VISION_MODEL), load_tokenizer(DEFAULT_MODEL)
    assert cfg.model_type == "glm4v_moe" and tok.vocab_size == cfg.vocab_size == text_tok.vocab_size + 2
    assert tok.special_tokens["<|image|>"] == cfg.image_token_id
    assert tok.special_tokens["<|begin_of_image|>"] == cfg.image_start_token_id
    assert tok.encode("这个图形是什么颜色？ what color") == text_tok.encode("这个图形是什么颜色？ what color")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_answers_held_out_pictures(llm, lang):
    """Every question about 8 held-out test pictures (81 per language). The card measures 93 % / 95 % on all 9,673
    test questions per language (95 % / 99 % on these); this handful must stay >= 85 %. A broken tower, merger, processor
    or prompt drops it toward the 37 % of always answering yes, and the colour questions, which the model gets right,
    toward one in eight."""
    rows = [q for q in QUESTIONS if q["lang"] == lang]
    replies = [ask(llm, FIXTURES / q["image"], q["question"]) for q in rows]
    right = sum(y == q["answer"] for y, q in zip(replies, rows))
    assert right / len(rows) >= 0.85, [(q["question"], q["answer"], y) for y, q in zip(replies, rows) if y != q["answer"]]
    colours = [(q, y) for q, y in zip(rows, replies) if q["question"].startswith(("what color", "这个图形是什么颜色"))]
    assert colours and sum(y == q["answer"] for q, y in colours) >= len(colours) - 1  # it looks at the picture


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server():
    from test_serve_util import ServerThread

    from glm4.serve.app import build_state, create_app

    st = build_state(None, companion=VISION_MODEL)
    srv = ServerThread(create_app(st)).start()
    yield srv, st
    srv.stop()


def test_serve_without_model_routes_pictures_to_the_vision_model(server):
    import openai

    srv, _ = server
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == ["default", "vision"]
    q = next(q for q in QUESTIONS if q["lang"] == "en" and q["question"] == "what color is the shape?")
    picture = {"type": "image_url", "image_url": {"url": _data_uri(FIXTURES / q["image"])}}
    for model in ("default", "vision"):  # pictures go to the model that sees, whichever name the client uses
        r = c.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": [picture, {"type": "text", "text": q["question"]}]}])
        assert r.choices[0].message.content == q["answer"]
    replies = {m: c.chat.completions.create(model=m, temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": "你好，请介绍一下你自己。"}]).choices[0].message.content for m in ("default", "vision")}
    assert replies["default"] and replies["default"] != replies["vision"]  # text goes to the model it names
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}])


def test_route_picks_the_state():
    from types import SimpleNamespace

    from glm4.serve.serving import carries_media, route

    vision = SimpleNamespace(chat=SimpleNamespace(media=object()), companions={})
    text = SimpleNamespace(chat=SimpleNamespace(media=None), companions={"vision": vision})
    assert route(text, "default") is text and route(text, "vision") is vision and route(text, "vision:latest") is vision
    assert route(text, "default", media=True) is vision
    assert carries_media([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert carries_media([{"role": "user", "content": "hi", "images": ["aGk="]}])  # Ollama's shape
    assert carries_media([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
    assert not carries_media([{"role": "user", "content": [{"type": "text", "text": "an image_url"}]}])


def test_chat_cli_image_without_model_uses_the_vision_model():
    q = next(q for q in QUESTIONS if q["lang"] == "zh" and q["question"] == "图片里是什么形状？")
    proc = subprocess.run([sys.executable, "-m", "glm4.cli", "chat", "--image", str(FIXTURES / q["image"])],
                          input=q["question"] + "\n/exit\n", capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert q["answer"] in proc.stdout
