"""The GUI agent (AutoGLM's loop): screenshot -> the model -> one action on the device, until finish.

    agent = GUIAgent(OpenAIChat(base_url=...), SimulatedPhone(), confirm=ask_user, take_over=wait_for_user)
    result = agent.run("Turn Wi-Fi off")              # AgentResult(answer=finish's message, events, messages)

Each step sends one user message: the task (first step only), the current app and what the last action did,
and the screenshot as an OpenAI image_url part (a PNG data URI: any vision chat API reads it, glm4's
glm4v checkpoints included). The model answers `<think>…</think><answer>do(...)</answer>`; the action is
parsed with `ast` (actions.py), coordinates scaled from 0..1000 to the device's pixels, and run. Only the
newest `keep_images` screenshots stay in the conversation: older user turns keep their text alone.
Hooks: `confirm(message) -> bool` for a sensitive Tap (one that carries a message; declined without a
hook), `take_over(message)` when a person must act (Take_over, Interact; without a hook the run stops).
An action that does not parse or fails is said to the model in the next step; `max_errors` in a row end
the run. Events are the text agent's (glm4.agent.loop.AgentEvent): reply, thought, call, observation,
answer, error.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator

from ..loop import AgentEvent, EventRun, ModelCallFailed
from ..models import ChatModel, Reply
from .actions import Action, ActionError, parse_action, split_reply
from .device import Device, to_pixels

SYSTEM = """You operate a phone for the user. Each turn you get the task, the current app and a screenshot.
Think about the screen, then give exactly one action:
<think>what you see and what to do next</think>
<answer>one action</answer>

Actions (coordinates are relative: x and y from 0 to 1000, [0,0] top left, [1000,1000] bottom right):
do(action="Launch", app="Settings")              open an app by name
do(action="Tap", element=[x,y])                  tap; add message="why" when the tap pays, sends or deletes
do(action="Type", text="hello")                  replace the text of the focused field
do(action="Swipe", start=[x1,y1], end=[x2,y2])   swipe (start low, end high to scroll down)
do(action="Long Press", element=[x,y])
do(action="Double Tap", element=[x,y])
do(action="Back")    do(action="Home")    do(action="Wait", duration="2 seconds")
do(action="Take_over", message="why")            a person must act (sign in, captcha)
do(action="Note", message="text")                remember something from the screen
finish(message="the result")                     the task is done (or cannot be done: say why)"""


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class GUIAgent(EventRun):
    def __init__(self, model: ChatModel, device: Device, *, confirm: Callable[[str], bool] | None = None,
                 take_over: Callable[[str], None] | None = None, max_steps: int = 30, keep_images: int = 1,
                 max_errors: int = 3, system: str = SYSTEM):
        self.model, self.device = model, device
        self.confirm, self.take_over = confirm, take_over
        self.max_steps, self.keep_images, self.max_errors, self.system = max_steps, max(1, keep_images), max_errors, system
        self.messages: list[dict] = []
        self.notes: list[str] = []

    def _ask(self, step: int) -> Reply:
        try:
            return self.model.complete([{"role": "system", "content": self.system}, *self.messages], None, "none")
        except Exception as e:  # noqa: BLE001 - the client's failure, in one line
            raise ModelCallFailed(f"the model call failed: {type(e).__name__}: {e}", step) from e

    def _steps(self, task: str) -> Iterator[AgentEvent]:
        self.messages, self.notes = [], []
        feedback, errors = "", 0
        for step in range(1, self.max_steps + 1):
            self._drop_old_images()
            info = json.dumps({"current_app": self.device.current_app()}, ensure_ascii=False)
            text = (f"{task}\n\n" if step == 1 else "") + f"** Screen Info **\n{info}" + (
                f"\n\n{feedback}" if feedback else "")
            self.messages.append({"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": png_data_url(self.device.screenshot())}}]})
            reply = self._ask(step)
            yield AgentEvent("reply", reply.to_dict(), step)
            think, action_text = split_reply(reply.content or "")
            self.messages.append({"role": "assistant", "content": f"<think>{think}</think><answer>{action_text}</answer>"})
            if think:
                yield AgentEvent("thought", {"text": think}, step)
            try:
                action = parse_action(action_text)
            except ActionError as e:
                errors += 1
                feedback = f"Your last answer was not a valid action ({e}). Answer with one do(...) or finish(...)."
                yield AgentEvent("observation", {"name": "parse", "text": feedback, "error": str(e), "images": 0}, step)
                if errors >= self.max_errors:
                    yield AgentEvent("error", {"text": f"{errors} invalid or failed actions in a row: {e}"}, step)
                    return
                continue
            yield AgentEvent("call", {"name": action.name, "arguments": json.dumps(action.args, ensure_ascii=False)},
                             step)
            if action.name == "finish":
                yield AgentEvent("answer", {"text": action.args["message"]}, step)
                return
            result, error, stop = self._execute(action)
            yield AgentEvent("observation", {"name": action.name, "text": result, "error": error, "images": 0}, step)
            if stop:
                yield AgentEvent("error", {"text": result}, step)
                return
            errors = errors + 1 if error else 0
            if errors >= self.max_errors:
                yield AgentEvent("error", {"text": f"{errors} invalid or failed actions in a row: {error}"}, step)
                return
            feedback = f"Last action: {action} -> {result}"
        yield AgentEvent("error", {"text": f"the task was not finished within {self.max_steps} steps"}, self.max_steps)

    def _drop_old_images(self) -> None:
        """Keep the screenshots of the newest keep_images - 1 user turns (the new one makes keep_images)."""
        users = [m for m in self.messages if m["role"] == "user" and isinstance(m["content"], list)]
        for m in users[: max(0, len(users) - (self.keep_images - 1))]:
            m["content"] = "\n".join(p["text"] for p in m["content"] if p.get("type") == "text")

    def _execute(self, action: Action) -> tuple[str, str | None, bool]:
        """(what happened, the error or None, whether the run must stop)."""
        d, a, size = self.device, action.args, self.device.size
        name = action.name
        if name == "Tap" and "message" in a:
            if self.confirm is None or not self.confirm(a["message"]):
                return f"the user declined the sensitive action: {a['message']}", "declined", True
        if name in ("Tap", "Double Tap", "Long Press"):
            x, y = to_pixels(a["element"], size)
            {"Tap": d.tap, "Double Tap": d.double_tap, "Long Press": d.long_press}[name](x, y)
            return f"{name.lower()} at {x},{y} px", None, False
        if name == "Swipe":
            (x1, y1), (x2, y2) = to_pixels(a["start"], size), to_pixels(a["end"], size)
            d.swipe(x1, y1, x2, y2)
            return f"swiped {x1},{y1} -> {x2},{y2} px", None, False
        if name in ("Type", "Type_Name"):
            d.type_text(a["text"])
            return f"typed {a['text']!r}", None, False
        if name == "Launch":
            if d.launch(a["app"]):
                return f"launched {a['app']}", None, False
            return f"no app named {a['app']!r}", f"no app named {a['app']!r}", False
        if name in ("Back", "Home"):
            (d.back if name == "Back" else d.home)()
            return f"pressed {name}", None, False
        if name == "Wait":
            d.wait(a.get("duration", 1.0))
            return f"waited {a.get('duration', 1.0):g} s", None, False
        if name in ("Take_over", "Interact"):
            why = a.get("message", "a person must act on the phone")
            if self.take_over is None:
                return f"a person must take over ({why}) and no one can", "no take-over hook", True
            self.take_over(why)
            return f"a person took over ({why}) and handed back", None, False
        if name == "Note":
            self.notes.append(a.get("message", ""))
            return f"noted ({len(self.notes)} notes)", None, False
        return f"{name} is not available here", f"{name} is not available", False  # Call_API
