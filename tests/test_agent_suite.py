"""The task suite against an OpenAI-compatible endpoint: a real `glm4 serve` of the shipped model started on
127.0.0.1, driven by `python -m glm4.agent.suite --base-url` and `glm4 agent --suite --base-url` as
subprocesses (the toy model's score is what it is; the test holds the plumbing and the report), plus the
scripted suite with the planner and reflection switched on and off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_serve_util import free_port, wait_healthy

from glm4.agent.suite import TASKS, format_report, run_suite

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "glm4" / "assets" / "default"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
REPORT = re.compile(r"^(\w+)\s+(\d+)/(\d+)\s+([\d.]+)%$")


def report(stdout: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in stdout.splitlines():
        m = REPORT.match(line.strip())
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return rows


def test_the_report_format():
    text = format_report({"files": (5, 6), "browse": (0, 5)})
    assert text.splitlines() == ["browse        0/5     0.0%", "files         5/6    83.3%", "all           5/11   45.5%"]
    assert report(text) == {"browse": (0, 5), "files": (5, 6), "all": (5, 11)}


def test_planner_and_reflection_on_and_off_with_the_scripted_model():
    """The scripted replies are fixed, so this measures the loop: with the planner off the same tasks pass;
    with reflection off the scripted critiques are taken as answers and the recovery tasks fail."""
    logs = []
    both = run_suite(python=False, log=logs.append)
    no_plan = run_suite(python=False, planner=False, log=logs.append)
    no_reflection = run_suite(python=False, reflection=False, log=logs.append)
    assert all(ok == n for ok, n in both.values()), logs
    assert no_plan == both
    assert no_reflection["recover"][0] == 0 and no_reflection["files"] == (5, 6)
    assert {k: v for k, v in no_reflection.items() if k not in ("recover", "files")} == \
        {k: v for k, v in both.items() if k not in ("recover", "files")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not (ASSET / "model.safetensors").exists():
        pytest.skip(f"the shipped model is not built ({ASSET})")
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "glm4.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=120)
    except AssertionError:
        log.seek(0)
        pytest.fail(f"glm4 serve did not start: {log.read()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def chat_requests(url: str) -> int:
    m = re.search(r'glm4_requests_total\{endpoint="chat"\} (\d+)', httpx.get(url + "/metrics").text)
    return int(m.group(1)) if m else 0


def run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


def test_suite_against_glm4_serve(served, tmp_path):
    before = chat_requests(served)
    r = run(["glm4.agent.suite", "--base-url", served + "/v1", "--category", "files", "--category", "browse",
             "--max-rounds", "2", "--max-tokens", "48", "--require-tool"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = report(r.stdout)
    n = {c: sum(t.category == c for t in TASKS) for c in ("files", "browse")}
    assert {k: v[1] for k, v in rows.items()} == {"files": n["files"], "browse": n["browse"], "all": sum(n.values())}
    assert rows["all"][0] == rows["files"][0] + rows["browse"][0]
    assert "crashed" not in r.stdout
    # every task reached the server: a plan call and at least one forced tool call each
    assert chat_requests(served) - before >= 2 * sum(n.values())


def test_glm4_agent_suite_against_glm4_serve(served, tmp_path):
    r = run(["glm4.cli", "agent", "--suite", "--base-url", served + "/v1", "--category", "files", "--no-plan",
             "--max-rounds", "1", "--max-tokens", "32"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = report(r.stdout)
    assert rows["files"][1] == sum(t.category == "files" for t in TASKS) and rows["all"] == rows["files"]


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = run(["glm4.agent.suite", "--base-url", url, "--category", "files"], tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"python -m glm4.agent.suite: cannot reach {url}")
    assert "Traceback" not in r.stderr
