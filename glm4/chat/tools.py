"""Declared tools: names, argument schemas, the one JSON-schema checker, and typing of XML argument values."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

# glm-4-9b-chat's built-in tools and the key their raw body goes under
BUILTIN_TOOLS = {"python": "code", "cogview": "prompt", "simple_browser": "query"}
# glm_server.py always accepts these two built-ins even when not declared
ALWAYS_ALLOWED_BUILTINS = ("cogview", "simple_browser")


class SchemaError(ValueError):
    """A JSON schema that is not valid (tool parameters, response_format)."""


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str):
    """A compiled jsonschema validator (cached: check_schema is slow), or the schema's error message."""
    import jsonschema

    schema = json.loads(schema_json)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)
    except jsonschema.SchemaError as e:
        return f"invalid JSON schema: {e.message}"


def _compiled(schema: dict):
    try:
        key = json.dumps(schema, sort_keys=True, default=str)
    except ValueError:  # e.g. a circular schema
        return "tool schema is not serialisable"
    return _validator(key)


def check_schema(schema: dict | None, where: str) -> None:
    """Raise SchemaError if `schema` is not a valid JSON schema."""
    if schema is None:
        return
    v = _compiled(schema)
    if isinstance(v, str):
        raise SchemaError(f"{where}: {v}")


def schema_errors(schema: dict | None, value: Any) -> tuple[str, ...]:
    """The JSON-schema violations of `value` ("path: message"), () when valid or without a schema."""
    if not schema:
        return ()
    v = _compiled(schema)
    if isinstance(v, str):
        return (v,)
    errs = sorted(v.iter_errors(value), key=lambda e: [str(p) for p in e.path])
    return tuple(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errs)


def tool_function(tool: dict) -> dict:
    """The function object of an OpenAI tool (`{"type": "function", "function": {...}}`) or of a bare one."""
    fn = tool.get("function")
    return fn if isinstance(fn, dict) else tool


class ToolSet:
    """Declared tools: name -> JSON schema of the arguments (None for built-ins)."""

    def __init__(self, tools: Sequence[dict] | None):
        self.schemas: dict[str, dict | None] = {}
        self.builtins: set[str] = set()
        for t in tools or []:
            if not isinstance(t, dict):
                continue
            kind = t.get("type")
            if kind in BUILTIN_TOOLS and not isinstance(t.get("function"), dict):
                self.builtins.add(kind)
                self.schemas[kind] = None
                continue
            fn = tool_function(t)
            if isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                self.schemas[fn["name"]] = params if isinstance(params, dict) else None

    def __bool__(self) -> bool:
        return bool(self.schemas)

    def known(self, name: str, chatglm: bool = False) -> bool:
        return name in self.schemas or (chatglm and name in ALWAYS_ALLOWED_BUILTINS)

    def raw_body_key(self, name: str) -> str | None:
        return BUILTIN_TOOLS.get(name) if (name in self.builtins or name in ALWAYS_ALLOWED_BUILTINS) else None

    def param_types(self, name: str, key: str) -> set[str] | None:
        """The JSON types the schema allows for argument `key` of tool `name`, None when not declared."""
        schema = self.schemas.get(name) or {}
        props = schema.get("properties") if isinstance(schema, dict) else None
        spec = props.get(key) if isinstance(props, dict) else None
        t = spec.get("type") if isinstance(spec, dict) else None
        if isinstance(t, str):
            return {t}
        if isinstance(t, list):
            return {x for x in t if isinstance(x, str)}
        return None

    def is_text(self, name: str, key: str) -> bool:
        """Whether argument `key` is text: typed string by the schema, or not typed at all."""
        types = self.param_types(name, key)
        return types is None or "string" in types

    def validate(self, name: str, args: Any) -> tuple[str, ...]:
        if not isinstance(args, dict):
            return ("arguments are not a JSON object",)
        return schema_errors(self.schemas.get(name), args)

    def xml_value(self, name: str, key: str, raw: str) -> tuple[Any, str | None]:
        """An XML `<arg_value>` typed by the schema: (value, notice or None).

        A parameter the schema types as a string (or that it does not type) stays the verbatim text, even
        when it looks like JSON; any other is decoded as JSON, keeping the raw string (with a notice) when
        it is not JSON."""
        if self.is_text(name, key):
            return raw, None
        try:
            return json.loads(raw.strip()), None
        except ValueError:
            types = "/".join(sorted(self.param_types(name, key) or ()))
            return raw, f"tool {name!r}: argument {key!r} is not JSON for type {types}: kept as text"
