"""How `glm4 agent` shows a run as it happens: a rich live view on a terminal, plain lines otherwise.

    view = make_view(sys.stdout, plain=False)      # RichView on a TTY (rich installed), PlainView otherwise
    with view:
        for event in agent.stream(task):
            view.show(event)                       # plan, thought, call, observation, reflection, memory, answer, error

The rich view prints each step as a panel or line (the plan as a numbered panel, a call with its code
highlighted, an observation in a panel that turns red on an error, a reflection in yellow, the answer in
green) and keeps a spinner line at the bottom saying what the agent waits for. The plain view prints one
`[step] kind: text` line per event: what logs, pipes and `--plain` get.
"""

from __future__ import annotations

import contextlib
import json
from typing import TextIO

from .loop import AgentEvent

OBSERVATION_LINES = 30  # lines of an observation shown (the model got up to observation_chars)


class PlainView:
    def __init__(self, out: TextIO):
        self.out = out

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc) -> None:
        pass

    @contextlib.contextmanager
    def paused(self):
        """While the user is asked something (nothing to pause in plain lines)."""
        yield

    def show(self, event: AgentEvent) -> None:
        if event.kind != "reply":  # raw model replies are for saved runs and replays
            self.out.write(f"{event}\n")
            self.out.flush()


def _arguments(raw) -> dict | str:
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw
    return args if isinstance(args, dict) else raw


def _clip(text: str, lines: int = OBSERVATION_LINES) -> str:
    rows = text.splitlines()
    if len(rows) <= lines:
        return text
    return "\n".join(rows[:lines]) + f"\n... ({len(rows) - lines} more lines)"


class RichView:
    """Each event as a rich renderable, printed above a live spinner line."""

    def __init__(self, console):
        self.console = console
        self.status = None

    def __enter__(self) -> RichView:
        self.status = self.console.status("planning...", spinner="dots")
        self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)
            self.status = None

    @contextlib.contextmanager
    def paused(self):
        """Stop the spinner while the user is asked something at the terminal."""
        if self.status is None:
            yield
            return
        self.status.stop()
        try:
            yield
        finally:
            self.status.start()

    def show(self, event: AgentEvent) -> None:
        if event.kind == "reply":
            return
        self.console.print(self.render(event))
        if self.status is not None:
            waiting = {"call": f"running {event.data.get('name')}...", "answer": "done"}.get(
                event.kind, f"step {event.step}: waiting for the model...")
            self.status.update(waiting)

    def render(self, event: AgentEvent):
        from rich.markup import escape
        from rich.panel import Panel
        from rich.syntax import Syntax
        from rich.text import Text

        d, step = event.data, f"step {event.step}"
        kind = event.kind
        if kind == "plan":
            title = "revised plan" if d.get("revised") else "plan"
            return Panel(Text(d["text"]), title=title, title_align="left", border_style="cyan")
        if kind == "thought":
            return Text(d["text"], style="italic dim")
        if kind == "call":
            args = _arguments(d.get("arguments"))
            if d.get("name") == "python" and isinstance(args, dict) and isinstance(args.get("code"), str):
                return Panel(Syntax(args["code"], "python", theme="ansi_dark"), title=f"{step} → python",
                             title_align="left", border_style="blue")
            shown = json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else str(args)
            line = Text.assemble((f"{step} → ", "blue"), (str(d.get("name")), "bold blue"), f"({shown})")
            return line
        if kind == "observation":
            error = d.get("error")
            images = f"  [{d['images']} image(s)]" if d.get("images") else ""
            return Panel(Text(_clip(d.get("text") or "")), title=f"{step} ← {d.get('name')}{images}",
                         title_align="left", border_style="red" if error else "green")
        if kind == "reflection":
            body = Text.assemble(("problem: ", "bold"), d.get("problem", ""), "\n", d["text"])
            return Panel(body, title=f"{step} reflection", title_align="left", border_style="yellow")
        if kind == "memory":
            return Text.from_markup(f"[magenta]{step} memory[/]: {escape(d['text'])} "
                                    f"[dim]({d.get('observations', 0)} observations summarised)[/]")
        if kind == "answer":
            return Panel(Text(d["text"]), title="answer", title_align="left", border_style="bold green")
        if kind == "error":
            return Text.from_markup(f"[bold red]{step} error[/]: {escape(d['text'])}")
        return Text(str(event))


def make_view(out: TextIO, plain: bool = False):
    """RichView when `out` is a terminal, rich is installed and not `plain`; PlainView otherwise."""
    if plain or not getattr(out, "isatty", lambda: False)():
        return PlainView(out)
    try:
        from rich.console import Console
    except ImportError:
        return PlainView(out)
    return RichView(Console(file=out))
