"""LLM.chat / LLM.generate / `glm4 chat` with images and videos on tiny random glm4v / glm4v_moe checkpoints: replies
equal the engine fed the planner's processed inputs (and a full-recompute greedy loop over the model)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
from test_chat_vision import IMG  # noqa: E402
from vision_checkpoint import data_uri, picture, vision_llm, vision_planner, write_checkpoint  # noqa: E402, F401


def test_llm_chat_with_image_equals_engine_on_processed_inputs(llm, planner):
    from glm4 import SamplingParams

    pic = picture(70, 50, 5)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(pic)}},
                                         {"type": "text", "text": "Describe the image briefly, please."}]}]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    result = llm.chat(msgs, params=params)
    plan = planner.plan(msgs)
    (direct,) = llm.generate([plan.prompt_ids], planner.sampling_params(plan, params), [plan.multi_modal_data])
    assert result.text == direct.outputs[0].text and len(direct.outputs[0].token_ids) == 6
    # raw media with one placeholder per picture, expanded by LLM.generate
    text = planner.fmt.render([{"role": "user", "content": [IMG, {"type": "text",
                                                                "text": "Describe the image briefly, please."}]}])
    (raw,) = llm.generate(text, params, {"image": pic})
    assert raw.prompt_token_ids == plan.prompt_ids
    assert raw.outputs[0].token_ids == direct.outputs[0].token_ids
    other = llm.chat([{"role": "user", "content": [{"type": "image", "image": picture(70, 50, 6)},
                                                   msgs[0]["content"][1]]}], params=params)
    assert other.usage["prompt_tokens"] == len(plan.prompt_ids)


def test_llm_generate_rejects_unknown_media_keys(llm):
    with pytest.raises(ValueError, match="unknown multi_modal_data key"):
        llm.generate("x<|begin_of_image|><|image|><|end_of_image|>", None, {"audio": b""})


# ---------------------------------------------------------------------------------------------- glm4 chat


def test_terminal_chat_image_command(llm, tmp_path):
    import io

    from glm4 import SamplingParams
    from glm4.serve.chat_cli import ChatSession, Repl

    pic = tmp_path / "cat.png"
    picture(50, 40, 9).save(pic)
    (tmp_path / "notes.txt").write_text("not a picture")
    lines = iter([f"/image {tmp_path / 'notes.txt'}", f"/image {pic}", "/image", "What is it?", "And now?", "/exit"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    session = ChatSession(llm, params=SamplingParams(max_tokens=3, temperature=0))
    assert Repl(session, read, out).run() == 0
    text = out.getvalue()
    assert "error: messages" not in text and "error: not a readable image" in text
    assert f"(image attached to your next message: {pic})" in text and f"next message: {pic})" in text
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == [[{"type": "image", "image": str(pic)}, {"type": "text", "text": "What is it?"}], "And now?"]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_terminal_chat_image_flag(llm, tmp_path, monkeypatch, capsys):
    from glm4.serve import chat_cli

    pic = tmp_path / "a.png"
    picture(40, 40).save(pic)
    seen = {}

    class FakeRepl:
        def __init__(self, session, read, out):
            seen["images"] = list(session.images)

        def run(self):
            return 0

    monkeypatch.setattr(chat_cli, "Repl", FakeRepl)
    monkeypatch.setattr("glm4.engine.llm.LLM", lambda *a, **k: llm)
    assert chat_cli.main(["--image", str(pic), "--max-tokens", "2"]) == 0
    assert seen["images"] == [str(pic.resolve())]
    assert chat_cli.main(["--image", str(tmp_path / "missing.png")]) == 2
    assert "--image: image file not found" in capsys.readouterr().err


def test_terminal_chat_refuses_images_on_a_text_model(tmp_path):
    from test_serve_util import make_checkpoint

    from glm4 import LLM
    from glm4.serve.chat_cli import ChatSession

    pic = tmp_path / "a.png"
    picture(40, 40).save(pic)
    session = ChatSession(LLM(make_checkpoint(tmp_path / "t"), kv_cache_tokens=512))
    with pytest.raises(ValueError, match="this model does not take images"):
        session.attach(str(pic))


def test_glm45v_checkpoint_chats_with_an_image(tmp_path):
    from glm4 import LLM, SamplingParams

    llm = LLM(write_checkpoint(tmp_path / "moe", kind="glm4v_moe"), linear="torch", kv_cache_tokens=1024)
    msgs = [{"role": "user", "content": [{"type": "image", "image": picture(60, 60, 4)},
                                         {"type": "text", "text": "Where is it?"}]}]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    result = llm.chat(msgs, params=params, enable_thinking=False)
    from glm4.engine.chat import chat_layer_for

    planner = chat_layer_for(llm)[0]
    assert planner.fmt.name == "glm45v"
    plan = planner.plan(msgs, enable_thinking=False)
    assert planner.tok.decode(plan.prompt_ids).endswith("/nothink<|assistant|>\n<think></think>")
    (direct,) = llm.generate([plan.prompt_ids], planner.sampling_params(plan, params), [plan.multi_modal_data])
    assert result.text == direct.outputs[0].text and result.usage["completion_tokens"] == 5


def test_llm_chat_with_video_and_images_over_turns(llm, planner):
    """Frames as a video, and pictures in two user turns: the chat reply equals the engine fed the plan's inputs,
    and the engine's output equals a full-recompute greedy loop over the model with the same inputs."""
    import torch

    from glm4 import SamplingParams

    msgs = [{"role": "user", "content": [{"type": "video", "video": [picture(56, 56, s) for s in range(4)]},
                                         {"type": "text", "text": "What happens?"}]},
            {"role": "assistant", "content": "Shapes move."},
            {"role": "user", "content": [{"type": "image", "image": picture(40, 60, 8)},
                                         {"type": "text", "text": "And here?"}]}]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    result = llm.chat(msgs, params=params)
    plan = planner.plan(msgs)
    assert set(plan.multi_modal_data) == {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    (direct,) = llm.generate([plan.prompt_ids], planner.sampling_params(plan, params), [plan.multi_modal_data])
    assert result.text == direct.outputs[0].text
    seq = torch.tensor([plan.prompt_ids])
    media = {k: torch.from_numpy(v) for k, v in plan.multi_modal_data.items()}
    with torch.no_grad():
        for _ in range(4):
            logits = llm.model(seq, **media)[0, -1].float()
            logits[planner.tok.vocab_size:] = float("-inf")  # the planner's VocabGuard: ids with no text
            seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
    assert direct.outputs[0].token_ids == seq[0, len(plan.prompt_ids):].tolist()
