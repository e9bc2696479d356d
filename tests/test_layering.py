"""Imports flow one way: config → layers → models → weights → quant → chat → {reference, train, engine} → serve → agent
→ cli.

chat (the chat formats and request planning) sits below train (SFT data uses its segments), reference and
engine (the Python chat API over glm4.LLM lives in glm4.engine.chat); its format modules import no torch.

Checked with `ast` over every module (function-level imports included), so a lazy import cannot hide a
backwards dependency. `glm4/tokenizer/` is a leaf that imports no torch and nothing else from glm4.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "glm4"

# rank of each top-level part; a module may import parts of lower rank, its own part, and the tokenizer leaf
RANK = {
    "config": 0,
    "layers": 1,
    "models": 2,
    "weights": 3,
    "quant": 4,
    "chat": 5,
    "reference": 6,
    "train": 6,
    "engine": 6,
    "serve": 7,
    "agent": 8,
    "cli": 9,
    "assets": 0,
    "media": 0,  # images and videos for the vision models: PIL + numpy, no torch (below)
}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _glm4_imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "glm4"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "glm4":
            if node.module == "glm4":
                out += [(node.lineno, f"glm4.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _modules():
    return [p for p in sorted(PKG.rglob("*.py")) if p.name != "__init__.py" or p.parent != PKG]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_one_way(path: Path):
    part = _part(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for lineno, mod in _glm4_imports(tree):
        parts = mod.split(".")
        if len(parts) < 2:
            raise AssertionError(f"{path.name}:{lineno} imports the whole glm4 package")
        target = parts[1]
        if part == "tokenizer":
            assert target == "tokenizer", f"tokenizer/{path.name}:{lineno} imports {mod}: the tokenizer is a leaf"
            continue
        if target in ("tokenizer", part):
            continue
        assert target in RANK, f"{path}:{lineno}: unknown part {target!r}"
        assert RANK[target] < RANK[part], f"{path.relative_to(PKG)}:{lineno} imports {mod}: {part} may not depend on {target}"


def test_agent_talks_to_models_only_through_the_chat_api():
    """glm4.agent reaches a model through `llm.chat(...)` or an OpenAI client: of glm4 it imports the chat
    package's text modules only, never the engine, models or weights (and no torch). The entry points alone
    (the CLI and the task suite's main) build a glm4.LLM for `--model PATH`."""
    for path in (PKG / "agent").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for lineno, mod in _glm4_imports(tree):
            if path.name in ("agent_cli.py", "suite.py") and mod in ("glm4.engine.llm", "glm4.engine.sampling_params"):
                continue
            target = mod.split(".")[1]
            assert target in ("agent", "chat"), f"agent/{path.name}:{lineno} imports {mod}"
            assert mod not in ("glm4.chat.planner", "glm4.chat.grammar", "glm4.chat.thinking"), (
                f"agent/{path.name}:{lineno} imports {mod} (torch)")
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f"agent/{path.name} imports torch"


TORCH_FREE = [PKG / "tokenizer", PKG / "chat" / "formats", *[PKG / "chat" / f"{m}.py" for m in (
    "events", "jsonscan", "lark", "messages", "template", "tools")]]


@pytest.mark.parametrize("root", TORCH_FREE, ids=lambda p: str(p.relative_to(PKG)))
def test_text_modules_import_no_torch(root: Path):
    for path in ([root] if root.is_file() else root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "transformers", "numpy"), f"{path.name} imports {n}"


def test_media_imports_no_torch():
    for path in (PKG / "media").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "transformers"), f"media/{path.name} imports {n}"


# `glm4 bench` runs transformers as the peer in the same run (an optional import inside a function)
PEER_BENCH = {PKG / "engine" / "bench.py"}


def test_package_never_imports_transformers():
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path in PEER_BENCH:  # only lazily, never at module level
            tree = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("transformers", "peft"), f"{path.relative_to(PKG)} imports {n}"
