"""`glm4 <command> [args]`: lazily imports the command's module and calls its `main(argv)`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("glm4.reference", "generate token ids (or text) from a checkpoint with the reference generator"),
    "chat": ("glm4.serve.chat_cli", "terminal chat with streaming output and tools (--agent: the agent's tools run)"),
    "serve": ("glm4.serve.serve_cli", "OpenAI-compatible HTTP server"),
    "agent": ("glm4.agent.agent_cli", "run an agent on a task: tools, sandboxed code interpreter, planner"),
    "bench": ("glm4.engine.bench", "benchmark the engine side by side with HF transformers"),
    "pretrain": ("glm4.train.pretrain", "pretraining (causal LM, GLM blank infilling)"),
    "finetune": ("glm4.train.finetune", "SFT: full, LoRA, P-tuning v2"),
    "dpo": ("glm4.train.dpo", "direct preference optimization"),
}


def _usage() -> str:
    lines = ["usage: glm4 <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"glm4: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(COMMANDS[name][0])
    if name == "chat" and "--agent" in rest:
        # the terminal chat with the agent's tools, composed here: the one place above both serve and agent
        from glm4.agent import chat_agent

        return chat_agent.main(rest, chat=mod) or 0
    return mod.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
