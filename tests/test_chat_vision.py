"""Chat with images: the GLM-4.1V format against its official template (glm4/chat/templates/glm4v.jinja: the
zai-org/GLM-4.1V-9B-Thinking chat_template, revision 3c1471e5), the think/answer reply parser, GLM-4.5V's box
markers, image_url / video parts through the planner (sources, limits, bad pictures -> ChatError). LLM.chat /
LLM.generate / glm4 chat with images: test_llm_vision.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from glm4.chat import ChatFormat, format_of_template
from glm4.chat.media import MediaPolicy, extract_media
from glm4.chat.planner import ChatError, ChatPlanner
from glm4.media.image import MediaError, preprocess_images
from glm4.media.prompt import expand_placeholders
from glm4.media.video import video_from_images

pytest.importorskip("transformers")
from vision_checkpoint import data_uri, picture, png_bytes, vision_llm, vision_planner  # noqa: E402, F401  (fixtures)

IMG = {"type": "image"}
VID = {"type": "video"}
CONVERSATIONS = [
    [{"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "text", "text": "Compare "}, IMG, {"type": "text", "text": " and "}, IMG]},
     {"role": "assistant", "content": "The first is red."},
     {"role": "user", "content": "And the video?"},
     {"role": "user", "content": [VID, {"type": "text", "text": "这是什么？"}]}],
    [{"role": "user", "content": "plain text"}, {"role": "assistant", "content": "ok", "metadata": "tool"},
     {"role": "user", "content": [IMG]}],
]


# ---------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_builtin_glm4v_equals_official_template(k, gen, planner):
    from glm4.chat import builtin_template_source

    official = ChatFormat("glm4v", builtin_template_source("glm4v"))
    ours = ChatFormat("glm4v")
    msgs = CONVERSATIONS[k]
    text = official.render(msgs, add_generation_prompt=gen)
    assert ours.render(msgs, add_generation_prompt=gen) == text
    assert ours.encode(planner.tok, msgs, add_generation_prompt=gen) == official.encode(
        planner.tok, msgs, add_generation_prompt=gen)
    n_img = sum(p == IMG for m in msgs if isinstance(m["content"], list) for p in m["content"])
    assert text.count("<|begin_of_image|><|image|><|end_of_image|>") == n_img


def test_format_found_for_vision_checkpoints(tmp_path):
    from glm4.chat import builtin_template_source

    assert format_of_template(builtin_template_source("glm4v")) == "glm4v"
    for model_type, name in (("glm4v", "glm4v"), ("glm4v_moe", "glm45v")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert ChatFormat.for_checkpoint(tmp_path).name == name


def test_glm45v_renders_images_in_user_turns(planner):
    fmt = ChatFormat("glm45v")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Where is the cat?"}, IMG]}]
    text = fmt.render(msgs, enable_thinking=False)
    assert text == ("[gMASK]<sop><|user|>\nWhere is the cat?<|begin_of_image|><|image|><|end_of_image|>/nothink"
                    "<|assistant|>\n<think></think>")
    ids = fmt.encode(planner.tok, msgs)
    assert ids.count(planner.tok.special_tokens["<|image|>"]) == 1


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>I see a red square.</think><answer>A square.</answer>", "I see a red square.", "A square."),
    ("\n<think>\nhmm\n</think>\n<answer>\n42\n</answer>", "hmm", "42"),
    ("No tags here.", None, "No tags here."),
    ("<think>cut off", "cut off", ""),
    ("<think>a</think>b<answer>c</answer>", "a", "bc"),
])
def test_think_answer_parsed_whole_and_streamed(text, reasoning, content):
    fmt = ChatFormat("glm4v")
    whole = fmt.parse(text)
    assert (whole.content, whole.reasoning or None) == (content, reasoning)
    p = fmt.stream_parser()
    events = [e for ch in text for e in p.feed(ch)] + p.finish()
    got_c = "".join(e.text for e in events if e.type == "content")
    got_r = "".join(e.text for e in events if e.type == "reasoning")
    assert (got_c, got_r or None) == (content, reasoning)


def test_glm45v_box_markers_stay_in_content():
    text = "<think>The cat sits left.</think>\nThe cat: <|begin_of_box|>[[12,40,300,512]]<|end_of_box|>"
    out = ChatFormat("glm45v").parse(text)
    assert out.content == "The cat: <|begin_of_box|>[[12,40,300,512]]<|end_of_box|>"
    assert out.reasoning == "The cat sits left."


# ---------------------------------------------------------------------------------------------- planner


def test_plan_carries_expanded_prompt_and_pixels(planner):
    a, b = picture(64, 48, 1), picture(30, 90, 2)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(a)}},
                                         {"type": "text", "text": "and"},
                                         {"type": "image", "image": png_bytes(b)}]}]
    plan = planner.plan(msgs)
    ref = preprocess_images([a, b], planner.media.spec)
    assert np.array_equal(plan.multi_modal_data["pixel_values"], ref["pixel_values"])
    assert np.array_equal(plan.multi_modal_data["image_grid_thw"], ref["image_grid_thw"])
    text = planner.fmt.render([{"role": "user", "content": [IMG, {"type": "text", "text": "and"}, IMG]}])
    expanded = expand_placeholders(text, ref["image_grid_thw"])  # the processor's text, tokenized whole
    assert plan.prompt_ids == planner.tok.encode(expanded, allow_special=True)
    params = planner.sampling_params(plan, __import__("glm4").SamplingParams(max_tokens=4))
    assert params.skip_special_tokens is False


def test_plan_with_video_frames(planner):
    frames = [picture(56, 56, s) for s in range(4)]
    msgs = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 1.0},
                                         {"type": "text", "text": "What happens?"}]}]
    plan = planner.plan(msgs)
    from glm4.media.video import preprocess_videos

    v = preprocess_videos([video_from_images(frames, fps=1.0)], planner.media.spec)
    assert np.array_equal(plan.multi_modal_data["pixel_values_videos"], v["pixel_values_videos"])
    text = planner.fmt.render([{"role": "user", "content": [VID, {"type": "text", "text": "What happens?"}]}])
    expanded = expand_placeholders(text, (), v["video_grid_thw"], v["video_timestamps"])
    assert "<|end_of_image|>0<|begin_of_image|>" in expanded and expanded.endswith("2<|end_of_video|>What happens?"
                                                                                    "<|assistant|>\n")
    assert plan.prompt_ids == planner.tok.encode(expanded, allow_special=True)


def _image_msg(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "?"}]}]


def _truncated_png() -> str:
    raw = png_bytes(picture(64, 64, 3))
    return data_uri(raw[: len(raw) // 2])


def _zero_size_png() -> str:
    raw = bytearray(png_bytes(picture(8, 8, 3)))
    raw[16:24] = bytes(8)  # IHDR width = height = 0
    return data_uri(bytes(raw))


def _huge_png() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 1-bit, compresses to a few kB
    return data_uri(buf.getvalue())


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable image"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png,plain", "must be base64"),
    ("https://example.com/cat.png", "remote media URLs are off"),
    ("http://127.0.0.1:9/cat.png", "--allow-remote-media"),
    ("ftp://example.com/cat.png", "unsupported media URL scheme"),
], ids=["not-an-image", "bad-base64", "not-base64", "https", "http", "ftp"])
def test_bad_image_sources_are_chat_errors(planner, url, message):
    with pytest.raises(ChatError, match=re.escape(message)) as e:
        planner.plan(_image_msg(url))
    assert "messages[0].content[0]" in str(e.value) and e.value.param == "messages.0.content"


@pytest.mark.parametrize("make, message", [(_truncated_png, "broken image data"),
                                           (_zero_size_png, "not a readable image"),
                                           (_huge_png, "too large to decode")],
                         ids=["truncated", "0x0", "20000x20000"])
def test_bad_pictures_are_chat_errors(planner, make, message):
    with pytest.raises(ChatError, match=re.escape(message)):
        planner.plan(_image_msg(make()))


def test_empty_picture_is_a_chat_error(planner):
    from PIL import Image

    with pytest.raises(ChatError, match=re.escape("image has no pixels (0x0)")):
        planner.plan([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (0, 0))}]}])


def test_limits_name_the_limit(planner):
    strict = ChatPlanner(planner.tok, planner.fmt, media=planner.media.with_limits(
        max_images=1, max_image_pixels=1000, max_video_frames=2))
    two = [{"role": "user", "content": [{"type": "image", "image": picture(8, 8, 1)},
                                        {"type": "image", "image": picture(8, 8, 2)}]}]
    with pytest.raises(ChatError, match=r"content\[1\]: over the limit of 1 images per request"):
        strict.plan(two)
    with pytest.raises(ChatError, match="64x48, over the limit of 1000 pixels"):
        strict.plan(_image_msg(data_uri(picture(64, 48))))
    frames = [{"role": "user", "content": [{"type": "video", "video": [picture(28, 28, s) for s in range(3)]}]}]
    with pytest.raises(ChatError, match="3 frames, over the limit of 2 per video"):
        strict.plan(frames)


def test_local_paths_only_under_the_allowed_folder(planner, tmp_path):
    inside = tmp_path / "ok" / "a.png"
    inside.parent.mkdir()
    picture(40, 40).save(inside)
    outside = tmp_path / "b.png"
    picture(40, 40).save(outside)
    closed = planner.media.with_limits()
    closed = MediaPolicy(**{**closed.__dict__, "allowed_local_path": None})
    with pytest.raises(MediaError, match="local media paths are off"):
        extract_media(_image_msg(str(inside)), closed)
    policy = closed.with_limits(allowed_local_path=str(inside.parent))
    msgs, media = extract_media(_image_msg("file://" + str(inside)), policy)
    assert len(media.images) == 1 and msgs[0]["content"][0] == IMG
    with pytest.raises(MediaError, match="outside the allowed media folder"):
        extract_media(_image_msg(str(inside.parent / ".." / "b.png")), policy)
    with pytest.raises(MediaError, match="not found"):
        extract_media(_image_msg(str(inside.parent / "missing.png")), policy)


def test_images_only_in_user_messages(planner):
    msgs = [{"role": "system", "content": [{"type": "image", "image": picture()}]}, {"role": "user", "content": "?"}]
    with pytest.raises(ChatError, match="only user messages may carry images"):
        planner.plan(msgs)


def test_text_only_model_refuses_images():
    from glm4.tokenizer import load_tokenizer  # noqa: F401  (the planner needs only a tokenizer-like object)

    class Tok:
        special_tokens = {"<|user|>": 1}
        vocab_size = 10

        def decode(self, ids):
            return ""

    plain = ChatPlanner.__new__(ChatPlanner)
    plain.tok, plain.fmt, plain.media, plain.constrain = Tok(), ChatFormat("glm4"), None, False
    with pytest.raises(ChatError, match="this model does not take images") as e:
        plain.plan(_image_msg(data_uri(picture())))
    assert e.value.code == "unsupported_content"


def test_remote_images_only_with_the_flag_and_within_the_byte_limit(planner):
    """A picture over http from a server on 127.0.0.1 (no outside network): refused without allow_remote, read with
    it, refused over remote_max_bytes, and an unreachable URL is a MediaError, not an exception."""
    import http.server
    import threading

    body = png_bytes(picture(40, 30, 2))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/cat.png"
    try:
        with pytest.raises(MediaError, match="remote media URLs are off"):
            extract_media(_image_msg(url), planner.media)
        _, media = extract_media(_image_msg(url), planner.media.with_limits(allow_remote=True, remote_timeout=5))
        assert media.images[0].size == (40, 30)
        with pytest.raises(MediaError, match=f"over the limit of {len(body) - 1} bytes"):
            extract_media(_image_msg(url), planner.media.with_limits(allow_remote=True, remote_max_bytes=len(body) - 1))
    finally:
        srv.shutdown()
    with pytest.raises(MediaError, match="could not fetch"):
        extract_media(_image_msg(url), planner.media.with_limits(allow_remote=True, remote_timeout=2))
