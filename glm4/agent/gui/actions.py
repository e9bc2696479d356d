"""AutoGLM's GUI action space: `do(action="Tap", element=[x, y])` ... `finish(message="...")`, parsed with
`ast` (never eval), checked against the action's fields.

    split_reply('<think>the button is at the top</think><answer>do(action="Tap", element=[500, 80])</answer>')
        -> ("the button is at the top", 'do(action="Tap", element=[500, 80])')
    parse_action('do(action="Tap", element=[500, 80])')    # Action(name="Tap", args={"element": [500, 80]})
    parse_action('finish(message="done")')                 # Action(name="finish", args={"message": "done"})

The text must be one call of the bare name `do` or `finish` with keyword arguments only, each a literal
(`ast.literal_eval`: strings, numbers, lists); anything else — attribute or nested calls, names,
comprehensions, f-strings, `**kwargs`, several statements, a text over MAX_ACTION_CHARS — is an ActionError
and never runs. Coordinates are relative, integers 0..1000 on each axis (AutoGLM's convention); the device
scales them to its pixels.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

MAX_ACTION_CHARS = 4000  # longer is no action (and keeps the parser away from pathological input)
COORD_MAX = 1000

# action -> (required fields, optional fields); fields: element/start/end = [x, y], the rest strings or numbers
ACTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Launch": (("app",), ()),
    "Tap": (("element",), ("message",)),  # a message marks a sensitive tap: the user confirms it first
    "Type": (("text",), ()),
    "Type_Name": (("text",), ()),
    "Swipe": (("start", "end"), ()),
    "Back": ((), ()),
    "Home": ((), ()),
    "Double Tap": (("element",), ()),
    "Long Press": (("element",), ()),
    "Wait": ((), ("duration",)),
    "Take_over": ((), ("message",)),  # a person must act (log in, a captcha): the take-over hook
    "Note": ((), ("message",)),
    "Call_API": ((), ("instruction",)),
    "Interact": ((), ("message",)),
}
POINT_FIELDS = ("element", "start", "end")
TEXT_FIELDS = ("app", "text", "message", "instruction")


class ActionError(ValueError):
    """The model's action text is not a valid action (said to the model, which may try again)."""


@dataclass
class Action:
    name: str  # an ACTIONS key, or "finish"
    args: dict = field(default_factory=dict)

    def __str__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        if self.name == "finish":
            return f"finish({body})"
        return f"do(action={self.name!r}{', ' if body else ''}{body})"


_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def split_reply(text: str) -> tuple[str, str]:
    """(thinking, action text) of a reply `<think>…</think><answer>…</answer>`; without tags, the last line
    that starts with do( or finish( is the action and the rest the thinking."""
    text = text or ""
    think = "\n".join(m.strip() for m in _THINK.findall(text))
    answer = _ANSWER.search(_THINK.sub("", text))
    if answer:
        return think, answer.group(1).strip()
    rest = _THINK.sub("", text).strip()
    lines = rest.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(("do(", "finish(")):
            return (think + "\n" + "\n".join(lines[:i])).strip(), "\n".join(lines[i:]).strip()
    return (think + "\n" + rest).strip(), ""


def parse_action(text: str) -> Action:
    """The Action in `text`, or ActionError saying what is wrong. Never evaluates anything."""
    text = (text or "").strip()
    if not text:
        raise ActionError("no action: answer with do(action=...) or finish(message=...)")
    if len(text) > MAX_ACTION_CHARS:
        raise ActionError(f"the action is {len(text)} characters long (at most {MAX_ACTION_CHARS})")
    # a raw newline or tab inside a quoted Type text is the model's, not a statement break
    source = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ActionError(f"not one do(...) / finish(...) call: {type(e).__name__}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id not in ("do", "finish"):
        raise ActionError("the action must be a call of do(...) or finish(...)")
    if call.args:
        raise ActionError(f"{call.func.id}() takes keyword arguments only")
    args: dict = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ActionError(f"{call.func.id}() takes no **arguments")
        if kw.arg in args:
            raise ActionError(f"{kw.arg!r} given twice")
        try:
            args[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ActionError(f"{kw.arg}= must be a literal (a string, a number or [x, y])") from None
    if call.func.id == "finish":
        unknown = set(args) - {"message"}
        if unknown:
            raise ActionError(f"finish() takes message=..., not {', '.join(sorted(unknown))}")
        return Action("finish", {"message": _text(args, "message", "")})
    name = args.pop("action", None)
    if not isinstance(name, str) or name not in ACTIONS:
        raise ActionError(f"unknown action {name!r}: one of {', '.join(ACTIONS)}")
    required, optional = ACTIONS[name]
    missing = [f for f in required if f not in args]
    if missing:
        raise ActionError(f"{name} needs {', '.join(missing)}")
    unknown = set(args) - set(required) - set(optional)
    if unknown:
        raise ActionError(f"{name} does not take {', '.join(sorted(unknown))}")
    for f in args:
        if f in POINT_FIELDS:
            args[f] = _point(args[f], f)
        elif f in TEXT_FIELDS:
            args[f] = _text(args, f)
        elif f == "duration":
            args[f] = _seconds(args[f])
    return Action(name, args)


def _point(value, name: str) -> list[int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ActionError(f"{name} must be [x, y], two integers")
    if not all(0 <= v <= COORD_MAX for v in value):
        raise ActionError(f"{name} {list(value)} is off the screen: coordinates are relative, 0 to {COORD_MAX}")
    return [int(value[0]), int(value[1])]


def _text(args: dict, name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise ActionError(f"{name} must be a string")
    return value


def _seconds(value) -> float:
    """A Wait duration: a number or "3 seconds"; 0 to 60."""
    if isinstance(value, str):
        value = value.replace("seconds", "").replace("second", "").strip()
        try:
            value = float(value)
        except ValueError:
            raise ActionError("duration must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 60:
        raise ActionError("duration must be 0 to 60 seconds")
    return float(value)
