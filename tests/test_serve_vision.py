"""`glm4 serve` with a vision checkpoint, driven by the official openai client: a data: PNG in an image_url part
gets a 200 whose reply equals the engine fed the same processed inputs directly; bad pictures (not an image,
truncated, 0x0, 20000x20000, a remote URL without --allow-remote-media, a local path without
--allowed-local-media-path) and over-limit requests are 400s that say why; a text-only checkpoint answers 400
"this model does not take images"."""

from __future__ import annotations

import argparse

import openai
import pytest
from test_serve_util import ServerThread, make_checkpoint

pytest.importorskip("transformers")
from test_chat_vision import _huge_png, _truncated_png, _zero_size_png  # noqa: E402
from vision_checkpoint import data_uri, picture, write_checkpoint  # noqa: E402

QUESTION = "Describe the image briefly, please."


def _messages(url: str, n: int = 1) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(n)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from glm4.serve.app import build_state, create_app

    folder = write_checkpoint(tmp_path_factory.mktemp("sv") / "glm4v")
    st = build_state(str(folder), model_name="m", kv_cache_tokens=4096, media={"max_images": 2})
    srv = ServerThread(create_app(st)).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield folder, st, client
    srv.stop()


def test_data_png_gets_a_reply_equal_to_the_engine_on_the_same_inputs(served):
    from glm4 import LLM, SamplingParams

    folder, st, client = served
    msgs = _messages(data_uri(picture(90, 60, 7)))
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    plan = st.chat.plan(msgs)
    assert r.usage.prompt_tokens == len(plan.prompt_ids)
    llm = LLM(folder, kv_cache_tokens=4096)
    params = st.chat.sampling_params(plan, SamplingParams(max_tokens=8, temperature=0))
    (direct,) = llm.generate([plan.prompt_ids], params, [plan.multi_modal_data])
    content, _, reasoning = st.chat.parse_full(plan, direct.outputs[0].text)
    assert content and r.choices[0].message.content == content  # a random model writes text, no tags
    assert len(direct.outputs[0].token_ids) == r.usage.completion_tokens
    # streamed: the same reply
    stream = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == (content or "")


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable image"),
    (_truncated_png(), "broken image data"),
    (_zero_size_png(), "not a readable image"),
    (_huge_png(), "too large to decode"),
    ("https://example.com/cat.png", "remote media URLs are off"),
    ("/etc/hostname", "local media paths are off"),
], ids=["not-an-image", "truncated", "0x0", "20000x20000", "remote", "local"])
def test_bad_images_are_400(served, url, message):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=_messages(url), max_tokens=2)
    assert message in str(e.value)


def test_over_the_image_limit_is_400(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError, match="over the limit of 2 images per request"):
        client.chat.completions.create(model="m", messages=_messages(data_uri(picture()), n=3), max_tokens=2)


def test_video_file_without_decoder_is_400(served):
    _, _, client = served
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=msgs, max_tokens=2)


def test_text_only_checkpoint_refuses_images(tmp_path):
    from glm4.serve.app import build_state, create_app

    st = build_state(str(make_checkpoint(tmp_path / "t")), model_name="m", kv_cache_tokens=1024)
    srv = ServerThread(create_app(st)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="this model does not take images"):
            client.chat.completions.create(model="m", messages=_messages(data_uri(picture())), max_tokens=2)
    finally:
        srv.stop()


def test_media_flags(tmp_path):
    from glm4.serve.serve_cli import media_limits

    def args(**kw):
        base = dict(allowed_local_media_path=None, allow_remote_media=False, media_fetch_timeout=5.0,
                    media_max_bytes=1000, limit_mm_per_prompt=None, max_image_pixels=None, max_video_frames=None)
        return argparse.Namespace(**{**base, **kw})

    got = media_limits(args(allowed_local_media_path=str(tmp_path), allow_remote_media=True,
                            limit_mm_per_prompt="image=3,video=0", max_image_pixels=100, max_video_frames=8))
    assert got == {"allowed_local_path": str(tmp_path), "allow_remote": True, "remote_timeout": 5.0,
                   "remote_max_bytes": 1000, "max_images": 3, "max_videos": 0, "max_image_pixels": 100,
                   "max_video_frames": 8}
    with pytest.raises(ValueError, match="image=N,video=M"):
        media_limits(args(limit_mm_per_prompt="audio=1"))
    with pytest.raises(ValueError, match="not a folder"):
        media_limits(args(allowed_local_media_path=str(tmp_path / "nope")))
