"""Helpers for writing llguidance lark grammars over GLM text (torch-free; compiled in glm4.chat.grammar)."""

from __future__ import annotations

import json

# JSON compiled without free whitespace: compact output, and far fewer ways for a weak model to wander
JSON_OPTS = {"whitespace_flexible": False, "lenient": True}
ANY_OBJECT = {"type": "object"}
NL = '"\\n"'


def lark_str(s: str) -> str:
    # a lark string literal (JSON escaping is a subset lark accepts)
    return json.dumps(s, ensure_ascii=False)


# the separators of json.dumps / jinja's tojson: how the templates write a JSON value into the prompt
TOJSON_OPTS = {**JSON_OPTS, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict | None, opts: dict | None = None) -> str:
    s = dict(schema) if schema else dict(ANY_OBJECT)
    s["x-guidance"] = {**(opts or JSON_OPTS), **(s.get("x-guidance") or {})}
    return "%json " + json.dumps(s, ensure_ascii=False)


def tag(special: set[str], s: str) -> str:
    # a marker the tokenizer has as a special token is matched as that token, otherwise as text
    return s if s in special else lark_str(s)


def json_grammar(schema: dict | None = None, prefix: str = "\n") -> str:
    """A reply that is one JSON value (any object for json_object), after `prefix`."""
    head = f"{lark_str(prefix)} " if prefix else ""
    return f"start: {head}value\nvalue: {json_rule(schema)}"
