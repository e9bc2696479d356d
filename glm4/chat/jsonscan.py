"""The one character-level JSON scanner: follows a JSON value as it is written.

The `name\\n{json}` call parser uses it to find where a call's arguments end; the closing guard of
constrained decoding uses it to find the shortest text that completes a value cut short.
"""

from __future__ import annotations

_LITERALS = ("true", "false", "null")


class JsonScanner:
    """Incremental JSON follower: `feed(text)` consumes characters up to the end of the top-level value
    and returns how many it took; `.done` when the value is complete, `.error` when the text is not JSON
    this scanner follows (it checks structure, not number syntax or escapes beyond \\uXXXX)."""

    def __init__(self):
        self.stack: list[str] = []  # "{" / "["
        self.expect = "value"  # value | key | colon | comma | end
        self.in_str = self.esc = False
        self.uni = 0  # hex digits still due in a \\uXXXX escape
        self.str_is_key = False
        self.lit = ""  # a literal or number being written
        self.after_open = False  # just after "{" or "[": closing right away is allowed
        self.started = False
        self.error = False

    @property
    def done(self) -> bool:
        return self.expect == "end" and not self.error

    def feed(self, text: str) -> int:
        for i, ch in enumerate(text):
            if self.error or self.done:
                return i
            self._char(ch)
            if self.done:
                return i + 1
        return len(text)

    def _char(self, ch: str) -> None:
        if self.in_str:
            if self.uni:
                if ch not in "0123456789abcdefABCDEF":
                    self.error = True
                self.uni -= 1
            elif self.esc:
                self.esc = False
                if ch == "u":
                    self.uni = 4
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.str_is_key:
                    self.expect = "colon"
                else:
                    self._value_done()
            return
        if self.lit:
            if ch.isalnum() or ch in "+-.":
                self.lit += ch
                return
            self.lit = ""
            self._value_done()
            if self.done:
                self.error = not ch.isspace()  # e.g. `1}`: the value ended but the scanner was fed past it
                return
        if ch in " \t\r\n":
            return
        self.started = True
        e = self.expect
        if e in ("value", "key") and ch == '"':
            self.in_str, self.str_is_key, self.after_open = True, e == "key", False
        elif e == "value" and ch in "{[":
            self.stack.append(ch)
            self.expect, self.after_open = ("key" if ch == "{" else "value"), True
        elif e == "value" and (ch.isdigit() or ch == "-" or ch in "tfn"):
            self.lit, self.after_open = ch, False
        elif ch in "}]" and self.stack and (e == "comma" or self.after_open):
            if {"}": "{", "]": "["}[ch] != self.stack.pop():
                self.error = True
                return
            self.after_open = False
            self._value_done()
        elif e == "colon" and ch == ":":
            self.expect = "value"
        elif e == "comma" and ch == "," and self.stack:
            self.expect, self.after_open = ("key" if self.stack[-1] == "{" else "value"), False
        else:
            self.error = True

    def _value_done(self) -> None:
        self.expect = "comma" if self.stack else "end"

    def closing_suffix(self) -> str | None:
        """The shortest text that completes the value fed so far, `null` standing in for a missing value."""
        if self.error:
            return None
        out = ""
        expect, stack, after_open = self.expect, list(self.stack), self.after_open
        if self.in_str:
            out += "0" * self.uni if self.uni else ("\\" if self.esc else "")
            out += '"'
            expect = "colon" if self.str_is_key else ("comma" if stack else "end")
        elif self.lit:
            word = next((w for w in _LITERALS if w.startswith(self.lit)), None)
            if word is not None:
                out += word[len(self.lit):]
            elif self.lit[-1] in "+-.eE":
                out += "0"
            expect = "comma" if stack else "end"
        if expect == "end":
            return out
        if expect == "colon":
            out += ":null"
        elif expect == "key":
            out += "}" if after_open else '"":null}'
            stack.pop()
        elif expect == "value":
            if not stack and not self.started:
                return out + "{}"
            if after_open and stack and stack[-1] == "[":
                out += "]"
                stack.pop()
            else:
                out += "null"
        for c in reversed(stack):
            out += "}" if c == "{" else "]"
        return out


def json_closing_suffix(text: str) -> str | None:
    """The shortest text that makes `text` (a JSON prefix, leading whitespace allowed) a complete JSON
    value, closing strings, literals and containers with `null` where a value is missing; None if
    `text` is not a JSON prefix this scanner follows."""
    s = JsonScanner()
    n = s.feed(text)
    if n < len(text) and text[n:].strip():
        return None  # text continues past a complete value
    return s.closing_suffix()
