"""Constrained decoding moved to glm4.chat (grammar: masks; formats: each format's grammar); re-exported here."""

from glm4.chat.formats.xml import minimal_json, xml_arg_plan, xml_closing_suffix  # noqa: F401
from glm4.chat.grammar import ConstraintError, GrammarCompiler, GrammarProcessor  # noqa: F401
from glm4.chat.jsonscan import json_closing_suffix  # noqa: F401
from glm4.chat.tools import check_schema  # noqa: F401
