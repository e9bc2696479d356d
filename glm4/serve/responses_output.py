"""A reply's events (glm4.chat.events) -> Responses API output items, both as the stream events OpenAI sends and as
the finished response object. A non-streamed response is built by the same builder from the same per-step events,
so the two agree by construction.

    b = ResponseBuilder(base, in_reasoning=plan.in_reasoning, logprobs=False)
    b.start()                                   # response.created, response.in_progress
    b.feed(events, n_new_tokens, step_logprobs) # output_item.added / content_part.added / *.delta / *.done ...
    b.finish("stop", usage)                     # closes the open item; response.completed (or .incomplete)
    b.response                                  # the response object

Items, in the order the model produced them: thinking -> a `reasoning` item (its text as `reasoning_text`
content; the summary stays empty: nothing here summarizes), text -> a `message` item with one `output_text` part,
each tool call -> a `function_call` item (call_id from the parser, arguments streamed as they come). A call
withdrawn by the parser (cut off by max_output_tokens) keeps its item, marked `incomplete`.
"""

from __future__ import annotations

import copy
import time
import uuid

from glm4.chat.events import (
    ContentDelta,
    Event,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallInvalid,
    ToolCallStart,
)


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Reply events -> output items and the Responses stream events (dicts with `type` and `sequence_number`)."""

    def __init__(self, base: dict, in_reasoning: bool = False, logprobs: bool = False):
        self.response = {**base, "status": "in_progress", "output": []}
        self.output: list[dict] = self.response["output"]
        self.logprobs = logprobs
        self.seq = 0
        self.open: dict | None = None  # the item being streamed
        self.calls: dict[int, dict] = {}  # the parser's call index -> its function_call item
        self.pending_space = ""  # whitespace between items, kept until text follows
        self.pending_logprobs: list[dict] = []  # logprobs of steps whose text the parser has not placed yet
        self.thinking = in_reasoning  # the last thing the model produced was thinking
        self.reasoning_tokens = 0

    # -- events

    def _event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **copy.deepcopy(fields)}
        self.seq += 1
        return ev

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]

    def feed(self, events: list[Event], n_tokens: int = 0, step_logprobs: list[dict] | None = None) -> list[dict]:
        """The stream events of one engine step: the parser's events for its text, its token count (thinking
        tokens are counted for usage) and its logprobs (attached to the text they produced)."""
        out: list[dict] = []
        kinds = {type(ev) for ev in events if not isinstance(ev, ContentDelta) or ev.text.strip()}
        if kinds & {ReasoningDelta} and not kinds - {ReasoningDelta}:
            self.thinking = True
        elif kinds & {ContentDelta, ToolCallStart, ToolCallDelta}:
            self.thinking = False
        if self.thinking:
            self.reasoning_tokens += n_tokens
        if self.logprobs:
            self.pending_logprobs += step_logprobs or []
            if kinds and ContentDelta not in kinds:
                self.pending_logprobs = []  # these tokens were thinking or a call, not output_text
        for ev in events:
            if isinstance(ev, ContentDelta):
                out += self._text(ev.text)
            elif isinstance(ev, ReasoningDelta) and ev.text:
                out += self._reasoning(ev.text)
            elif isinstance(ev, ToolCallStart):
                out += self._close("completed")
                item = {"id": item_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                        "call_id": ev.id, "name": ev.name}
                self.calls[ev.index] = item
                out += self._add(item)
            elif isinstance(ev, ToolCallDelta) and ev.index in self.calls:
                item = self.calls[ev.index]
                item["arguments"] += ev.arguments
                out.append(self._event("response.function_call_arguments.delta", delta=ev.arguments,
                                       **self._where(item)))
            elif isinstance(ev, (ToolCallEnd, ToolCallInvalid)) and self.open is self.calls.get(ev.index):
                out += self._close("completed" if isinstance(ev, ToolCallEnd) else "incomplete")
        return out

    def _add(self, item: dict) -> list[dict]:
        self.output.append(item)
        self.open = item
        out = [self._event("response.output_item.added", item=item, output_index=len(self.output) - 1)]
        if item["type"] != "function_call":
            out.append(self._event("response.content_part.added", content_index=0, part=item["content"][0],
                                   **self._where(item)))
        return out

    def _text(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "message":
            if not text.strip():
                self.pending_space += text
                return out
            out += self._close("completed")
            out += self._add({"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                              "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
            text, self.pending_space = self.pending_space + text, ""
        part = self.open["content"][0]
        part["text"] += text
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        part["logprobs"] += logprobs
        out.append(self._event("response.output_text.delta", content_index=0, delta=text, logprobs=logprobs,
                               **self._where(self.open)))
        return out

    def _reasoning(self, text: str) -> list[dict]:
        out = []
        if self.open is None or self.open["type"] != "reasoning":
            out += self._close("completed")
            out += self._add({"id": item_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                              "content": [{"type": "reasoning_text", "text": ""}]})
        self.open["content"][0]["text"] += text
        out.append(self._event("response.reasoning_text.delta", content_index=0, delta=text,
                               **self._where(self.open)))
        return out

    def _close(self, status: str) -> list[dict]:
        """Close the open item: its *.done events, then response.output_item.done."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        where = self._where(item)
        if item["type"] == "function_call":
            out = [self._event("response.function_call_arguments.done", arguments=item["arguments"], **where)]
        else:
            part = item["content"][0]
            if item["type"] == "message":
                out = [self._event("response.output_text.done", content_index=0, text=part["text"],
                                   logprobs=part["logprobs"], **where)]
            else:
                out = [self._event("response.reasoning_text.done", content_index=0, text=part["text"], **where)]
            out.append(self._event("response.content_part.done", content_index=0, part=part, **where))
        out.append(self._event("response.output_item.done", item=item, output_index=where["output_index"]))
        return out

    # -- the end

    def finish(self, finish_reason: str | None, input_tokens: int, output_tokens: int,
               cached_tokens: int = 0) -> list[dict]:
        """Close what is open; status `incomplete` (reason max_output_tokens) when the budget ran out."""
        cut = finish_reason == "length"
        out = self._close("incomplete" if cut else "completed")
        r = self.response
        r["status"] = "incomplete" if cut else "completed"
        r["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
        r["completed_at"] = None if cut else int(time.time())
        r["usage"] = {"input_tokens": input_tokens,
                      "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens, output_tokens)},
                      "total_tokens": input_tokens + output_tokens}
        out.append(self._event("response.incomplete" if cut else "response.completed", response=r))
        return out

    def fail(self, code: str, message: str, param: str | None = None) -> list[dict]:
        """An error after the stream started: the `error` event, then response.failed."""
        r = self.response
        r["status"], r["error"] = "failed", {"code": "server_error", "message": message}
        return [self._event("error", code=code, message=message, param=param),
                self._event("response.failed", response=r)]
