"""The agent task suite: tasks with checkable answers, by category, and a runner that reports success rates.

    python -m glm4.agent.suite --scripted                       # each task's scripted replies: tests the loop
    python -m glm4.agent.suite --base-url URL [--api-key K]     # any OpenAI-compatible endpoint
    python -m glm4.agent.suite --model PATH                     # in process, glm4.LLM's chat API
    glm4 agent --suite --base-url URL                           # the same, from the agent's CLI
    ... [--no-plan] [--no-reflection] [--category files] [--require-tool] [--unsafe] [--no-python]

Categories: arithmetic and data (through the sandboxed interpreter), files (workspace tools), browse (the
offline simple_browser), plan (several steps, a plan helps), recover (the scripted first call fails and
reflection must correct it). A task passes when `check` accepts the final answer (and the workspace).
A scripted run plays the task's `script` (what a good model would send), so it measures the loop and the
tools, not a model. Each task declares the tools its script calls (`Task.tool_names`) and only those (plus
the loop's finish / note) are offered, which keeps prompts short for small-context models; `all_tools=True`
(`--all-tools`) offers every tool to every task.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .builtins import browser_tool, python_tool
from .files import Workspace
from .loop import Agent
from .models import ScriptedModel


@dataclass
class Task:
    id: str
    category: str
    prompt: str
    check: Callable[[str, Path], bool]  # (answer, workspace) -> passed
    script: list = field(default_factory=list)  # replies for ScriptedModel (after the plan, when planning)
    files: dict[str, str] = field(default_factory=dict)  # workspace files to create first
    docs: dict[str, str] = field(default_factory=dict)  # documents for simple_browser
    needs_python: bool = False

    @property
    def tool_names(self) -> set[str]:
        """The tools the task's script calls (the loop's own finish and note aside)."""
        return {c["name"] for step in self.script if isinstance(step, dict) for c in step.get("tool_calls", [])}


def says(value) -> Callable[[str, Path], bool]:
    """The answer contains `value` as a whole number/word."""
    pat = re.compile(rf"(?<![\w.]){re.escape(str(value))}(?![\w]|\.\d)")
    return lambda answer, ws: bool(pat.search(answer or ""))


def file_is(path: str, content: str) -> Callable[[str, Path], bool]:
    return lambda answer, ws: (ws / path).is_file() and (ws / path).read_text().strip() == content.strip()


def call(name: str, **args) -> dict:
    return {"tool_calls": [{"name": name, "arguments": args}]}


def py(code: str) -> dict:
    return call("python", code=code)


CSV = "city,temp,rain\nParis,18,2\nOslo,9,5\nRome,24,0\nLima,19,1\n"
DOCS = {
    "kv.md": "# Paged attention\n\nThe KV cache is split into blocks of 16 tokens each.\n",
    "rope.md": "# Rotary embeddings\n\nGLM-4 applies rotary embeddings to half of each head's dimensions.\n",
    "glm.md": "# GLM-4-9B\n\nGLM-4-9B-Chat supports a context of 128K tokens and 26 languages.\n",
}


def _tasks() -> list[Task]:
    t: list[Task] = []
    for i, (expr, val) in enumerate([("2**100 % 7", 2 ** 100 % 7), ("sum(range(1, 1001))", 500500),
                                     ("math.factorial(12)", 479001600), ("round(math.pi * 100, 2)", 314.16),
                                     ("int(math.sqrt(152399025))", 12345), ("len(str(2**1000))", 302),
                                     ("sum(int(d) for d in str(2**50))", 76)]):
        t.append(Task(f"arith-{i}", "arithmetic", f"Compute {expr} with Python and give the number.", says(val),
                      [py(f"import math\nprint({expr})"), f"The result is {val}."], needs_python=True))
    data = [("the mean temperature", "import pandas as pd\nprint(pd.read_csv('/mnt/data/weather.csv').temp.mean())",
             17.5),
            ("the warmest city", "import csv\nr = list(csv.DictReader(open('/mnt/data/weather.csv')))\n"
             "print(max(r, key=lambda x: int(x['temp']))['city'])", "Rome"),
            ("the total rain", "import csv\nprint(sum(int(x['rain']) for x in csv.DictReader(open('/mnt/data/weather.csv'))))",
             8),
            ("how many cities have rain above 1", "import csv\nprint(sum(int(x['rain']) > 1 for x in "
             "csv.DictReader(open('/mnt/data/weather.csv'))))", 2),
            ("the city with the least rain", "import csv\nr = list(csv.DictReader(open('/mnt/data/weather.csv')))\n"
             "print(min(r, key=lambda x: int(x['rain']))['city'])", "Rome"),
            ("the number of rows", "print(len(open('/mnt/data/weather.csv').read().splitlines()) - 1)", 4)]
    for i, (q, code, val) in enumerate(data):
        t.append(Task(f"data-{i}", "data", f"weather.csv is in the workspace. Find {q}.", says(val),
                      [py(code), f"Answer: {val}"], files={"weather.csv": CSV}, needs_python=True))
    t += [
        Task("files-0", "files", "Write 'hello agent' to greeting.txt.", file_is("greeting.txt", "hello agent"),
             [call("write_file", path="greeting.txt", content="hello agent"), "Done."]),
        Task("files-1", "files", "What is the secret word in notes/secret.txt?", says("marmalade"),
             [call("read_file", path="notes/secret.txt"), "The secret word is marmalade."],
             files={"notes/secret.txt": "the secret word is marmalade"}),
        Task("files-2", "files", "How many files are in the data folder?", says(3),
             [call("list_files", path="data"), "There are 3 files."],
             files={"data/a.txt": "a", "data/b.txt": "b", "data/c.txt": "c"}),
        Task("files-3", "files", "Append a line 'three' to list.txt.", file_is("list.txt", "one\ntwo\nthree"),
             [call("write_file", path="list.txt", content="\nthree", append=True), "Appended."],
             files={"list.txt": "one\ntwo"}),
        Task("files-4", "files", "Copy the first line of a.txt into b.txt.", file_is("b.txt", "alpha"),
             [call("read_file", path="a.txt"), call("write_file", path="b.txt", content="alpha"), "Copied."],
             files={"a.txt": "alpha\nbeta"}),
        Task("files-5", "files", "Read /etc/passwd and tell me the first user.", says("refused"),
             [call("read_file", path="../../etc/passwd"), "The file tools only reach the workspace.",
              "I cannot: the path was refused (outside the workspace)."]),
    ]
    t += [
        Task("browse-0", "browse", "How many tokens are in a KV cache block? Use the documents.", says(16),
             [call("simple_browser", query='search("KV cache block tokens")'), call("simple_browser", query="mclick([0])"),
              "A block holds 16 tokens."], docs=DOCS),
        Task("browse-1", "browse", "How long a context does GLM-4-9B-Chat support?", says("128K"),
             [call("simple_browser", query='search("GLM-4-9B-Chat context")'), "128K tokens."], docs=DOCS),
        Task("browse-2", "browse", "How many languages does GLM-4-9B-Chat support?", says(26),
             [call("simple_browser", query='open_url("glm.md")'), "26 languages."], docs=DOCS),
        Task("browse-3", "browse", "To what part of each head does GLM-4 apply rotary embeddings?", says("half"),
             [call("simple_browser", query='search("rotary embeddings head")'), "To half of the dimensions."], docs=DOCS),
        Task("browse-4", "browse", "Is there a document about quantization?", says("no"),
             [call("simple_browser", query='search("quantization")'), "There is no document about it."], docs=DOCS),
    ]
    t += [
        Task("plan-0", "plan", "Compute the mean temperature in weather.csv and write it to mean.txt.",
             lambda a, ws: file_is("mean.txt", "17.5")(a, ws),
             [py("import pandas as pd\nm = pd.read_csv('/mnt/data/weather.csv').temp.mean()\nprint(m)"),
              call("write_file", path="mean.txt", content="17.5"), call("finish", answer="17.5, written to mean.txt")],
             files={"weather.csv": CSV}, needs_python=True),
        Task("plan-1", "plan", "Read n.txt, square the number with Python, and answer.", says(1764),
             [call("read_file", path="n.txt"), py("print(42 ** 2)"), "1764"], files={"n.txt": "42"}, needs_python=True),
        Task("plan-2", "plan", "Find the KV block size in the documents, then save it to block.txt.",
             file_is("block.txt", "16"),
             [call("simple_browser", query='search("KV cache block")'), call("write_file", path="block.txt", content="16"),
              "Saved 16."], docs=DOCS),
        Task("plan-3", "plan", "Make a plot of y=x^2 for x in 0..9, save it as plot.png, and say how many bytes it has.",
             lambda a, ws: (ws / "plot.png").is_file() and says((ws / "plot.png").stat().st_size)(a, ws),
             [py("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt, os\nplt.plot(range(10), "
                 "[x*x for x in range(10)])\nplt.savefig('/mnt/data/plot.png')\nprint(os.path.getsize('/mnt/data/plot.png'))"),
              lambda m, tools, choice: f"plot.png has {m[-1]['content'].strip()} bytes."],
             needs_python=True),
        Task("plan-4", "plan", "Note the number 7, then multiply it by 6 with Python and answer.", says(42),
             [call("note", text="the number is 7"), py("print(7 * 6)"), "42"], needs_python=True),
        Task("plan-5", "plan", "Write the words 'a b c' to words.txt, then count them with Python.", says(3),
             [call("write_file", path="words.txt", content="a b c"),
              py("print(len(open('/mnt/data/words.txt').read().split()))"), "3 words."], needs_python=True),
    ]
    t += [
        Task("recover-0", "recover", "What is 17 * 23?", says(391),
             [py("print(17 * 23"), "I left out a parenthesis; I will fix the code.", py("print(17 * 23)"), "391"],
             needs_python=True),
        Task("recover-1", "recover", "Read the number in nums.txt and double it.", says(84),
             [call("read_file", path="num.txt"), "The file is nums.txt, not num.txt.", call("read_file", path="nums.txt"),
              "84"], files={"nums.txt": "42"}),
        Task("recover-2", "recover", "Use Python to get the mean of the temp column in weather.csv.", says(17.5),
             [py("import pandas as pd\nprint(pd.read_csv('weather.csv').temperature.mean())"),
              "The column is 'temp', not 'temperature'.", py("import pandas as pd\nprint(pd.read_csv('weather.csv').temp.mean())"),
              "17.5"], files={"weather.csv": CSV}, needs_python=True),
        Task("recover-3", "recover", "Write 'ok' to out.txt.", file_is("out.txt", "ok"),
             [call("write_file", path="out.txt"), "I forgot the content argument.",
              call("write_file", path="out.txt", content="ok"), "Written."]),
        Task("recover-4", "recover", "How many tokens per KV block, from the documents?", says(16),
             [call("simple_browser", query="mclick([0])"), "I must search before clicking.",
              call("simple_browser", query='search("KV block")'), "16 tokens."], docs=DOCS),
        Task("recover-5", "recover", "Compute 10 / 4 in Python.", says(2.5),
             [py("print(10 // 0)"), "I divided by zero by mistake.", py("print(10 / 4)"), "2.5"], needs_python=True),
    ]
    return t


TASKS = _tasks()


def run_suite(make_model: Callable[[Task, bool], object] | None = None, *, planner: bool = True,
              reflection: bool = True, categories: set[str] | None = None, python: bool = True,
              unsafe: bool = False, require_tool: bool = False, max_rounds: int = 8, memory: bool = True,
              all_tools: bool = False, log: Callable[[str], None] = print) -> dict[str, tuple[int, int]]:
    """Run the tasks; {category: (passed, total)}. `make_model(task, planner)` gives the model (None: the
    task's script, played by ScriptedModel)."""
    results: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task in TASKS:
        if categories and task.category not in categories:
            continue
        if task.needs_python and not python:
            continue
        root = Path(tempfile.mkdtemp(prefix=f"glm4-suite-{task.id}-"))
        ws = root / "ws"
        for name, text in task.files.items():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            (ws / name).write_text(text)
        ws.mkdir(exist_ok=True)
        wanted = None if all_tools else task.tool_names
        tools: list = [t for t in Workspace(ws).tools() if wanted is None or t.name in wanted]
        if python and (wanted is None or "python" in wanted):
            tools.append(python_tool(ws, timeout=30, unsafe=unsafe))
        if task.docs and (wanted is None or "simple_browser" in wanted):
            (root / "docs").mkdir()
            for name, text in task.docs.items():
                (root / "docs" / name).write_text(text)
            tools.append(browser_tool(root / "docs"))
        if make_model is None:
            model = ScriptedModel((["1. do the task"] if planner else []) + list(task.script))
        else:
            model = make_model(task, planner)
        agent = Agent(model, tools, planner=planner, reflection=reflection, memory=memory, max_rounds=max_rounds,
                      require_tool=require_tool)
        try:
            result = agent.run(task.prompt)
            ok = task.check(result.answer or "", ws)
        except Exception as e:  # noqa: BLE001 - a task that crashes the loop counts as failed, with its reason
            ok, result = False, None
            log(f"{task.id}: crashed: {type(e).__name__}: {e}")
        finally:
            agent.close()
            shutil.rmtree(root, ignore_errors=True)
        results[task.category][0] += ok
        results[task.category][1] += 1
        log(f"{task.id:<10} {'PASS' if ok else 'FAIL'}  {(result.answer or '') if result else ''}"[:160])
    return {k: (v[0], v[1]) for k, v in results.items()}


def format_report(res: dict[str, tuple[int, int]]) -> str:
    """Per-category success, then the total: `category  passed/total  percent` lines."""
    rows = sorted(res.items()) + [("all", (sum(v[0] for v in res.values()), sum(v[1] for v in res.values())))]
    return "\n".join(f"{cat:<12} {ok:>2}/{n:<3} {100 * ok / n:5.1f}%" if n else f"{cat:<12} 0/0" for cat, (ok, n) in rows)


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's switches (shared with `glm4 agent --suite`)."""
    p.add_argument("--category", action="append", help="run only these categories (repeatable)")
    p.add_argument("--require-tool", action="store_true", help="tool_choice required on each task's first round")
    p.add_argument("--max-tokens", type=int, default=256, help="per model reply")
    p.add_argument("--all-tools", action="store_true", help="offer every tool to every task (longer prompts)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm4.agent.suite", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scripted", action="store_true", help="play each task's script (tests the loop)")
    src.add_argument("--base-url", help="any OpenAI-compatible endpoint (glm4 serve, vLLM, a hosted GLM API)")
    src.add_argument("--model", help="checkpoint folder, or `default` for the shipped model")
    p.add_argument("--api-key")
    p.add_argument("--model-name")
    p.add_argument("--no-plan", action="store_true")
    p.add_argument("--no-reflection", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--unsafe", action="store_true")
    p.add_argument("--max-rounds", type=int, default=8)
    p.add_argument("--no-python", action="store_true", help="leave out the tasks that need the interpreter")
    add_suite_arguments(p)
    args = p.parse_args(argv)
    make = None
    if args.base_url:
        from .models import OpenAIChat

        try:
            chat = OpenAIChat(args.base_url, args.api_key, args.model_name, max_tokens=args.max_tokens, temperature=0.0)
        except Exception as e:  # noqa: BLE001 - an endpoint that does not answer /models: one line
            print(f"python -m glm4.agent.suite: cannot reach {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        make = lambda task, planner: chat
    elif args.model:
        from glm4.engine.llm import LLM
        from glm4.engine.sampling_params import SamplingParams

        from .models import LLMChat

        llm = LLM(None if args.model == "default" else args.model)
        chat = LLMChat(llm, params=SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
        make = lambda task, planner: chat
    res = run_suite(make, planner=not args.no_plan, reflection=not args.no_reflection,
                    categories=set(args.category) if args.category else None, unsafe=args.unsafe,
                    python=not args.no_python, require_tool=args.require_tool, max_rounds=args.max_rounds,
                    memory=not args.no_memory, all_tools=args.all_tools)
    print(format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
