"""The agent loop: plan, call tools through native function calling, reflect on failures, remember, answer.

    agent = Agent(LLMChat(llm), tools=[get_weather, python_tool("work")])
    result = agent.run("What is 2**100 mod 7?")       # AgentResult(answer, events, messages)
    for event in agent.stream(task): print(event)     # plan / thought / call / observation / reflection / answer

Each part is on by default and switchable:
- planner: a first call (no tools) writes numbered sub-goals; they ride in the system message, and a
  reflection may revise them ("Revised plan:").
- executor: up to `max_rounds` chat calls with the tools (`tool_choice` "auto", or "required" on the first
  round with `require_tool=True`); each call runs with the registry's timeout, each observation is cut to
  `observation_chars`; `finish(answer)` or a reply without calls ends the run.
- reflection: after an error, an empty observation or a failed `check(answer)`, the model is asked (no
  tools) what went wrong and what to do instead; at most `max_reflections` times.
- memory: a `note` tool writes a scratchpad shown in the system message; when the conversation grows past
  `context_chars`, older observations are replaced by a model-written summary.
Every step is an AgentEvent; `save(path)` writes a run as jsonl, `load_events(path)` reads it back and
`ScriptedModel.from_events(events)` replays the model's side of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from .models import ChatModel, Reply
from .observation import Observation
from .tools import Tool, ToolRegistry

SYSTEM = ("You are an agent that solves the user's task step by step with the tools you are given. Call a tool "
          "when you need information or computation; when the task is done, call `finish` with the final answer "
          "(or reply with the answer and no tool call).")
PLAN_PROMPT = ("Before acting, write a short plan for this task: 2 to 5 numbered sub-goals, one line each, "
               "nothing else.\n\nTask: {task}")
REFLECT_PROMPT = ("The last step did not work: {problem}\nIn two or three sentences: what went wrong, and what will "
                  "you do differently? If the plan must change, end with 'Revised plan:' and the new numbered steps.")
SUMMARY_PROMPT = ("Summarise the following tool observations in a few lines, keeping every number, name and file "
                  "that may matter for the task:\n\n{observations}")


class ModelCallFailed(RuntimeError):
    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class AgentEvent:
    kind: str  # plan | thought | call | observation | reflection | memory | answer | error | reply
    data: dict
    step: int = 0
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "time": self.time, "data": self.data}

    def __str__(self) -> str:
        d = self.data
        body = {"call": lambda: f"{d['name']}({d['arguments']})", "observation": lambda: d["text"]}.get(
            self.kind, lambda: d.get("text", json.dumps(d, ensure_ascii=False)))()
        return f"[{self.step}] {self.kind}: {body}"


@dataclass
class AgentResult:
    answer: str | None
    events: list[AgentEvent]
    messages: list[dict]
    rounds: int = 0

    def save(self, path: str | Path) -> None:
        save_events(self.events, path)


def save_events(events: Iterable[AgentEvent], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")


def load_events(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class EventRun:
    """`run(task)` / `stream(task)` over a subclass's `_steps(task)` events and its `messages`: the shared face of
    the tool agent and the GUI agent."""

    messages: list[dict]

    def _steps(self, task: str) -> Iterator[AgentEvent]:
        raise NotImplementedError

    def run(self, task: str) -> AgentResult:
        events = list(self.stream(task))
        answer = next((e.data["text"] for e in reversed(events) if e.kind == "answer"), None)
        return AgentResult(answer, events, self.messages, sum(e.kind == "reply" for e in events))

    def stream(self, task: str) -> Iterator[AgentEvent]:
        try:
            yield from self._steps(task)
        except ModelCallFailed as e:  # a model/endpoint failure ends the run with its reason
            yield AgentEvent("error", {"text": str(e)}, e.step)


class Agent(EventRun):
    def __init__(self, model: ChatModel, tools: Iterable[Callable | Tool] | ToolRegistry = (), *,
                 planner: bool = True, reflection: bool = True, memory: bool = True, max_rounds: int = 10,
                 max_reflections: int = 2, observation_chars: int = 4000, context_chars: int = 24000,
                 tool_timeout: float = 60.0, require_tool: bool = False, system: str = SYSTEM,
                 check: Callable[[str], bool | str] | None = None):
        self.model = model
        self.registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools, timeout=tool_timeout)
        self.planner, self.reflection, self.memory = planner, reflection, memory
        self.max_rounds, self.max_reflections = max_rounds, max_reflections
        self.observation_chars, self.context_chars = observation_chars, context_chars
        self.require_tool, self.system, self.check = require_tool, system, check
        self.scratchpad: list[str] = []
        self.messages: list[dict] = []
        self._summarised: set[int] = set()  # ids of tool messages whose content the summary replaced
        self._call_names: dict[str | None, str | None] = {}  # tool_call_id -> tool name
        self._answer: str | None = None
        self._own = ToolRegistry(timeout=tool_timeout)  # finish (and note): the loop's own tools
        self._own.add(self._finish, name="finish")
        if memory:
            self._own.add(self._note, name="note")

    # ---- the loop's own tools

    def _finish(self, answer: Annotated[str, "the final answer to the task"]) -> str:
        """Finish the task with the final answer."""
        self._answer = answer
        return "finished"

    def _note(self, text: Annotated[str, "what to remember"]) -> str:
        """Write a line to your scratchpad; it stays visible for the rest of the task."""
        self.scratchpad.append(text)
        return f"noted ({len(self.scratchpad)} notes)"

    def specs(self) -> list[dict]:
        return self.registry.specs(getattr(self.model, "builtin_style", False)) + self._own.specs()

    def _call(self, call: dict) -> Observation:
        name = call.get("function", {}).get("name")
        reg = self._own if name in self._own else self.registry
        return reg.call_tool_call(call)

    # ---- running

    def _ask(self, messages: list[dict], tools: list[dict] | None, choice: Any, step: int) -> Reply:
        try:
            return self.model.complete(messages, tools, choice)
        except Exception as e:  # noqa: BLE001 - whatever the client raised, said in one line
            raise ModelCallFailed(f"the model call failed: {type(e).__name__}: {e}", step) from e

    def _steps(self, task: str) -> Iterator[AgentEvent]:
        self.scratchpad, self._answer, plan = [], None, None
        self.messages, self._summarised = [{"role": "user", "content": task}], set()
        self._call_names: dict[str | None, str | None] = {}
        step = 0
        if self.planner:
            reply = self._ask([{"role": "system", "content": self.system},
                               {"role": "user", "content": PLAN_PROMPT.format(task=task)}], None, "none", step)
            yield AgentEvent("reply", reply.to_dict(), step)
            plan = (reply.content or "").strip() or None
            if plan:
                yield AgentEvent("plan", {"text": plan}, step)
        reflections = 0
        for step in range(1, self.max_rounds + 1):
            yield from self._compress(step)
            choice = "required" if self.require_tool and step == 1 else "auto"
            reply = self._ask(self._context(plan), self.specs(), choice, step)
            yield AgentEvent("reply", reply.to_dict(), step)
            self.messages.append(reply.message())
            if not reply.tool_calls:
                answer = (reply.content or "").strip()
                problem = self._failed_check(answer)
                if problem and self.reflection and reflections < self.max_reflections:
                    reflections += 1
                    plan = yield from self._reflect(problem, plan, step)
                    continue
                yield AgentEvent("answer", {"text": answer}, step)
                return
            if reply.content and reply.content.strip():
                yield AgentEvent("thought", {"text": reply.content.strip()}, step)
            problems = []
            for call in reply.tool_calls:
                fn = call.get("function", {})
                yield AgentEvent("call", {"id": call.get("id"), "name": fn.get("name"),
                                          "arguments": fn.get("arguments")}, step)
                obs = self._call(call)
                text = obs.render(self.observation_chars)
                yield AgentEvent("observation", {"id": call.get("id"), "name": fn.get("name"), "text": text,
                                                 "error": obs.error, "images": len(obs.images)}, step)
                # OpenAI tool messages carry no name (servers refuse one); the call id links them
                self.messages.append({"role": "tool", "tool_call_id": call.get("id"), "content": text})
                self._call_names[call.get("id")] = fn.get("name")
                if obs.error:
                    problems.append(f"`{fn.get('name')}` failed: {obs.error.strip().splitlines()[-1][:300]}")
                elif not obs.text.strip() and not obs.images:
                    problems.append(f"`{fn.get('name')}` returned nothing")
            if self._answer is not None:
                problem = self._failed_check(self._answer)
                if not (problem and self.reflection and reflections < self.max_reflections):
                    yield AgentEvent("answer", {"text": self._answer}, step)
                    return
                problems.append(problem)
                self._answer = None
            if problems and self.reflection and reflections < self.max_reflections:
                reflections += 1
                plan = yield from self._reflect("; ".join(problems), plan, step)
        yield AgentEvent("error", {"text": f"no answer within {self.max_rounds} rounds"}, step)

    def _failed_check(self, answer: str) -> str | None:
        if self.check is None:
            return None
        verdict = self.check(answer)
        if verdict is True or verdict is None:
            return None
        return verdict if isinstance(verdict, str) else f"the answer {answer[:200]!r} failed the task's check"

    def _reflect(self, problem: str, plan: str | None, step: int):
        reply = self._ask(self._context(plan) + [
            {"role": "user", "content": REFLECT_PROMPT.format(problem=problem)}], None, "none", step)
        yield AgentEvent("reply", reply.to_dict(), step)
        critique = (reply.content or "").strip()
        yield AgentEvent("reflection", {"text": critique, "problem": problem}, step)
        self.messages.append({"role": "user", "content": f"Reflection on the failure ({problem}): {critique}"})
        if "Revised plan:" in critique:
            plan = critique.split("Revised plan:", 1)[1].strip() or plan
            yield AgentEvent("plan", {"text": plan, "revised": True}, step)
        return plan

    def _context(self, plan: str | None) -> list[dict]:
        system = self.system
        if plan:
            system += f"\n\nYour plan:\n{plan}"
        if self.scratchpad:
            system += "\n\nYour scratchpad:\n" + "\n".join(f"- {n}" for n in self.scratchpad)
        return [{"role": "system", "content": system}, *self.messages]

    def _compress(self, step: int):
        """When the conversation is past context_chars, summarise all but the last two observations."""
        if not self.memory or sum(len(str(m.get("content") or "")) for m in self.messages) <= self.context_chars:
            return
        old = [m for m in self.messages if m["role"] == "tool" and id(m) not in self._summarised][:-2]
        if not old:
            return
        joined = "\n\n".join(f"[{self._call_names.get(m.get('tool_call_id'))}] {m['content']}" for m in old)
        reply = self._ask([{"role": "user", "content": SUMMARY_PROMPT.format(
            observations=joined[: self.context_chars])}], None, "none", step)
        yield AgentEvent("reply", reply.to_dict(), step)
        summary = (reply.content or "").strip() or joined[: self.observation_chars]
        for m in old:
            m["content"] = "(summarised in the scratchpad)"
            self._summarised.add(id(m))
        self.scratchpad.append(f"summary of earlier observations: {summary}")
        yield AgentEvent("memory", {"text": summary, "observations": len(old)}, step)

    def close(self) -> None:
        self.registry.close()
