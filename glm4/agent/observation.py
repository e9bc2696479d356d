"""What a tool call gives back to the agent: text, an error (or None), and images (PNG bytes)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Observation:
    text: str = ""
    error: str | None = None
    images: list[bytes] = field(default_factory=list)  # PNG files (matplotlib figures)

    @property
    def ok(self) -> bool:
        return self.error is None

    def render(self, limit: int | None = None) -> str:
        """The observation as the model reads it: text, then the error; images as a count. Cut to `limit`
        characters (head and tail kept, the cut said), so one huge output cannot fill the context."""
        parts = [self.text] if self.text else []
        if self.error:
            parts.append(f"Error: {self.error}")
        if self.images:
            parts.append(f"[{len(self.images)} image(s) attached]")
        out = "\n".join(parts) if parts else "(no output)"
        return truncate(out, limit) if limit else out

    def data_urls(self) -> list[str]:
        return ["data:image/png;base64," + base64.b64encode(png).decode() for png in self.images]

    def to_dict(self) -> dict:
        return {"text": self.text, "error": self.error, "images": len(self.images)}


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)
