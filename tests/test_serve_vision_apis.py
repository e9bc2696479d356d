"""Images through every API of `glm4 serve` on the tiny GLM-4.1V checkpoint, each driven by its official client:
Anthropic `image` blocks (base64), Ollama `images` (on /api/chat and /api/generate) and Responses `input_image`
(a data: URL) get a 200 whose reply equals the OpenAI chat route's for the same picture and question at
temperature 0, with the same prompt token count; a text-only checkpoint answers each API's 400 "this model does not
take images"."""

from __future__ import annotations

import base64

import openai
import pytest
from test_serve_util import ServerThread, make_checkpoint

pytest.importorskip("transformers")
anthropic = pytest.importorskip("anthropic")
ollama = pytest.importorskip("ollama")
from vision_checkpoint import data_uri, picture, png_bytes, write_checkpoint  # noqa: E402

QUESTION = "Describe the image briefly, please."
MAX = 8
PNG = png_bytes(picture(90, 60, 7))
B64 = base64.b64encode(PNG).decode()


def _clients(url: str):
    return (openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60),
            anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60),
            ollama.Client(host=url, timeout=60))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from glm4.serve.app import build_state, create_app

    folder = write_checkpoint(tmp_path_factory.mktemp("sva") / "glm4v")
    st = build_state(str(folder), model_name="m", kv_cache_tokens=4096, media={"max_images": 2})
    srv = ServerThread(create_app(st)).start()
    yield _clients(srv.url)
    srv.stop()


@pytest.fixture(scope="module")
def chat_reply(served):
    """The OpenAI chat route's reply (content, reasoning, prompt tokens) to the picture and question."""
    oai = served[0]
    r = oai.chat.completions.create(model="m", max_tokens=MAX, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(PNG)}}, {"type": "text", "text": QUESTION}]}])
    m = r.choices[0].message
    assert r.usage.completion_tokens > 0 and m.content  # a random model writes text, no tags
    return m.content, getattr(m, "reasoning_content", None), r.usage.prompt_tokens


def test_anthropic_image_block(served, chat_reply):
    _, claude, _ = served
    messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
        {"type": "text", "text": QUESTION}]}]
    r = claude.messages.create(model="m", max_tokens=MAX, messages=messages,
                               extra_body={"temperature": 0.0})  # (this SDK has no temperature argument)
    text = "".join(b.text for b in r.content if b.type == "text")
    thinking = "".join(b.thinking for b in r.content if b.type == "thinking") or None
    assert (text, thinking, r.usage.input_tokens) == chat_reply
    assert claude.messages.count_tokens(model="m", messages=messages).input_tokens == chat_reply[2]
    with pytest.raises(anthropic.BadRequestError, match="base64 .media_type, data. or url"):
        claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f1"}}]}])


def test_ollama_images_on_chat_and_generate(served, chat_reply):
    _, _, olla = served
    options = {"temperature": 0, "num_predict": MAX}
    r = olla.chat(model="m", options=options, messages=[{"role": "user", "content": QUESTION, "images": [PNG]}])
    assert (r.message.content, r.message.thinking or None, r.prompt_eval_count) == chat_reply
    g = olla.generate(model="m", prompt=QUESTION, images=[PNG], options=options)
    assert (g.response, g.thinking or None, g.prompt_eval_count) == chat_reply
    with pytest.raises(ollama.ResponseError, match="not a readable image"):
        olla.chat(model="m", messages=[{"role": "user", "content": QUESTION, "images": ["bm90IGFuIGltYWdl"]}])


def test_responses_input_image(served, chat_reply):
    oai = served[0]
    r = oai.responses.create(model="m", max_output_tokens=MAX, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": data_uri(PNG)}, {"type": "input_text", "text": QUESTION}]}])
    reasoning = "".join(c.text for it in r.output if it.type == "reasoning" for c in it.content or []) or None
    assert (r.output_text, reasoning, r.usage.input_tokens) == chat_reply
    with pytest.raises(openai.BadRequestError, match="images by file_id are not supported"):
        oai.responses.create(model="m", max_output_tokens=2, input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file_1"}]}])


def test_text_only_checkpoint_refuses_images_in_every_api(tmp_path):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(make_checkpoint(tmp_path / "t")), model_name="m", kv_cache_tokens=1024)
    srv = ServerThread(create_app(st)).start()
    try:
        oai, claude, olla = _clients(srv.url)
        with pytest.raises(anthropic.BadRequestError, match="this model does not take images"):
            claude.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}}]}])
        with pytest.raises(ollama.ResponseError, match="this model does not take images"):
            olla.chat(model="m", messages=[{"role": "user", "content": QUESTION, "images": [PNG]}])
        with pytest.raises(ollama.ResponseError, match="this model does not take images"):
            olla.generate(model="m", prompt=QUESTION, images=[PNG])
        with pytest.raises(openai.BadRequestError, match="this model does not take images"):
            oai.responses.create(model="m", max_output_tokens=2, input=[{"role": "user", "content": [
                {"type": "input_image", "image_url": data_uri(PNG)}]}])
    finally:
        srv.stop()
