"""Python functions -> tool schemas (JSON Schema, as GLM-4 templates embed them) and typed argument checking.

    def get_weather(city: Annotated[str, "the city, in English"], unit: Unit = Unit.C,
                    days: int | None = None) -> str:
        '''Current weather of a city.'''
    FunctionSchema(get_weather).parameters
    -> {"type": "object", "properties": {"city": {"type": "string", "description": "the city, in English"},
        "unit": {"enum": ["c", "f"], "type": "string", "default": "c"}, "days": {"anyOf": [...], "default": null}},
        "required": ["city"]}

Type hints go through pydantic (a dependency of the server already): str/int/float/bool, list/dict/tuple,
Literal, Enum, Optional/unions, pydantic models and dataclasses. `Annotated[T, "text"]` (GLM-4's demo
style, which may add a `required` bool) or `Annotated[T, Field(description=...)]` describe a parameter;
otherwise a Google-style `Args:` or reST `:param x:` line of the docstring does. The docstring's first
paragraph is the tool's description. `$ref`s are inlined and pydantic's titles dropped: small models read
a flat schema better.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Annotated, Any, get_args, get_origin

import pydantic

PARAM_DOC = re.compile(r"^\s*(?::param\s+)?\*{0,2}(\w+)\*{0,2}\s*(?:\([^)]*\))?\s*:\s*(.+)$")


class ToolDefinitionError(TypeError):
    """A function that cannot become a tool (e.g. *args, or a type pydantic cannot describe)."""


def split_docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a docstring: the first paragraph, and `Args:` /
    `:param x:` lines."""
    doc = inspect.getdoc(fn) or ""
    paras = doc.split("\n\n")
    head = paras[0].strip() if paras and not re.match(r"\s*(Args|Arguments|Parameters|:param)\b", paras[0]) else ""
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            in_args = True
            continue
        if in_args and re.fullmatch(r"[A-Z]\w*:", stripped):  # Returns:, Raises: ...
            in_args = False
        if in_args or stripped.startswith(":param"):
            m = PARAM_DOC.match(stripped)
            if m:
                params[m.group(1)] = m.group(2).strip()
    return " ".join(head.split()), params


def _describe(annotation: Any, doc: str | None) -> tuple[Any, bool | None]:
    """Annotated[T, "text", required] -> (Annotated[T, Field(description=text)], required or None)."""
    required = None
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        texts = [m for m in meta if isinstance(m, str)]
        flags = [m for m in meta if isinstance(m, bool)]
        kept = [m for m in meta if not isinstance(m, (str, bool))]
        required = flags[0] if flags else None
        if texts:
            kept.append(pydantic.Field(description=" ".join(texts)))
        elif doc:
            kept.append(pydantic.Field(description=doc))
        return (Annotated[(base, *kept)] if kept else base), required
    if doc:
        return Annotated[annotation, pydantic.Field(description=doc)], None
    return annotation, None


class FunctionSchema:
    """The argument model of a function: `parameters` (JSON Schema) and `validate(args) -> kwargs`."""

    def __init__(self, fn: Callable, name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        doc, param_docs = split_docstring(fn)
        self.description = description if description is not None else doc
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as e:  # noqa: BLE001 - unresolvable forward references and the like
            raise ToolDefinitionError(f"tool {self.name!r}: cannot read its type hints: {e}") from None
        fields: dict[str, Any] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ToolDefinitionError(f"tool {self.name!r}: *{p.name} cannot be described as a tool argument")
            annotation, required = _describe(hints.get(p.name, Any), param_docs.get(p.name))
            default = p.default
            if default is p.empty and required is False:
                default = None  # the demo's `required=False` without a default
            fields[p.name] = (annotation, ... if default is p.empty else default)
        try:
            self.model = pydantic.create_model(f"{self.name}_arguments", __config__=pydantic.ConfigDict(
                extra="forbid", arbitrary_types_allowed=False), **fields)
            raw = self.model.model_json_schema()
        except Exception as e:  # noqa: BLE001 - pydantic's own message says which type
            raise ToolDefinitionError(f"tool {self.name!r}: {e}") from None
        self.parameters = clean_schema(raw)

    def validate(self, args: dict) -> tuple[dict | None, str | None]:
        """(typed keyword arguments, None) or (None, a one-paragraph message naming each bad argument)."""
        try:
            m = self.model.model_validate(args)
        except pydantic.ValidationError as e:
            return None, "; ".join(f"{'.'.join(map(str, err['loc'])) or '<arguments>'}: {err['msg']}"
                                   for err in e.errors())
        return {k: getattr(m, k) for k in self.model.model_fields}, None


def clean_schema(schema: dict) -> dict:
    """Inline `#/$defs/X` references (keeping $defs only for recursive models) and drop pydantic titles."""
    defs = schema.get("$defs", {})
    recursive: set[str] = set()

    def walk(node: Any, stack: tuple[str, ...], in_properties: bool = False) -> Any:
        if isinstance(node, list):
            return [walk(x, stack) for x in node]
        if not isinstance(node, dict):
            return node
        if in_properties:  # a map of property name -> schema: names are data, not keywords
            return {k: walk(v, stack) for k, v in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            key = ref.split("/")[-1]
            if key in stack or key not in defs:
                recursive.add(key)
                return node
            merged = {**walk(defs[key], stack + (key,)), **{k: walk(v, stack) for k, v in node.items() if k != "$ref"}}
            return merged
        out = {}
        for k, v in node.items():
            if k == "$defs" or (k == "title" and isinstance(v, str)):
                continue
            out[k] = walk(v, stack, in_properties=k in ("properties", "patternProperties"))
        return out

    out = walk(schema, ())
    if recursive:
        out["$defs"] = {k: walk(defs[k], (k,)) for k in recursive}
    out.setdefault("properties", {})
    out["type"] = "object"
    return out
