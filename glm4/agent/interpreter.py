"""The code interpreter: a stateful Jupyter kernel in the sandbox, one cell per `run(code)`.

    from glm4.agent import CodeInterpreter
    with CodeInterpreter(workspace="work") as py:
        py.run("x = 41")
        obs = py.run("print(x + 1)")          # Observation(text='42\\n', error=None, images=[])

The kernel (ipykernel) runs inside the sandbox of glm4.agent.sandbox and talks to us over Unix sockets
(zmq ipc) in a private folder bound into the sandbox: loopback TCP could not cross the network namespace.
A cell that runs past `timeout` seconds is interrupted over the control channel (KeyboardInterrupt in the
cell, the kernel's state kept); a kernel that does not answer the interrupt, or that died (CPU limit,
kill), is restarted and the observation says the state was lost. The sandbox is bubblewrap's, else
nsjail's (glm4.agent.launchers; `launcher=` picks one); with neither the interpreter refuses to start
unless `unsafe=True`: then the kernel runs as a plain subprocess with rlimits only.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .launchers import choose_launcher, open_sandbox
from .observation import Observation, strip_ansi
from .sandbox import WORKSPACE_MOUNT, Limits, Sandbox, SandboxUnavailable, python_mounts, rlimit_setter

RUN_MOUNT = "/run/kernel"  # the connection file and the kernel's sockets, inside the sandbox
INTERRUPT_GRACE = 5.0  # seconds a kernel gets to answer an interrupt before it is restarted
KERNEL_BOOT = (  # started with -S: site.addsitedir adds exactly this environment's folders, .pth files honoured
    "import site, sys; [site.addsitedir(p) for p in sys.argv[1].split(':') if p]; del sys.argv[1]; "
    "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()"
)


def _connection(ip: str, key: str) -> dict:
    return {"transport": "ipc", "ip": ip, "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
            "hb_port": 5, "key": key, "signature_scheme": "hmac-sha256", "kernel_name": ""}


class CodeInterpreter:
    """A sandboxed, stateful Python (Jupyter kernel). `run(code)` -> Observation; `close()`; a context manager."""

    def __init__(self, workspace: str | Path, *, timeout: float = 60.0, limits: Limits | None = None,
                 unsafe: bool = False, startup_timeout: float = 60.0, sandbox_uid: int | None = None,
                 launcher: str | None = None):
        try:
            import ipykernel  # noqa: F401
            import jupyter_client  # noqa: F401
        except ImportError as e:
            raise SandboxUnavailable(f"the code interpreter needs jupyter_client and ipykernel: "
                                     f"pip install 'glm4[agent]' ({e})") from None
        self.workspace = Path(workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.timeout, self.limits, self.startup_timeout = timeout, limits or Limits(), startup_timeout
        self.sandbox: Sandbox | None = None
        name, why = choose_launcher(launcher)  # bubblewrap, then nsjail (or the one asked for)
        if name is not None:
            self.sandbox = open_sandbox(self.workspace, self.limits, sandbox_uid, name)
            self.isolation = self.sandbox.describe()
        elif unsafe:
            self.isolation = f"NONE: unsafe=True and {why}; the code runs as this user with rlimits only"
        else:
            raise SandboxUnavailable(f"refusing to run model-written code without isolation: {why}. "
                                     "Pass unsafe=True (--unsafe) to run it unsandboxed anyway.")
        self.cwd = WORKSPACE_MOUNT if self.sandbox else str(self.workspace)
        self.proc: subprocess.Popen | None = None
        self.stderr = None
        self.client = None
        self.run_dir: Path | None = None
        self.start_seconds = 0.0
        self.start()

    # ---- kernel lifecycle

    def start(self) -> None:
        from jupyter_client import BlockingKernelClient

        t0 = time.perf_counter()
        self.run_dir = Path(tempfile.mkdtemp(prefix="glm4-kernel-"))
        key = secrets.token_hex(16)
        host_conn = self.run_dir / "host.json"
        host_conn.write_text(json.dumps(_connection(str(self.run_dir / "k"), key)))
        _, python, home, sites = python_mounts()
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "USER": "sandbox", "LANG": "C.UTF-8",
               "IPYTHONDIR": "/tmp/ipython", "MPLCONFIGDIR": "/tmp/matplotlib", "JUPYTER_RUNTIME_DIR": "/tmp/jupyter",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2",
               "MKL_NUM_THREADS": "2"}  # BLAS threads count against the task limit
        if self.sandbox is not None:
            (self.run_dir / "kernel.json").write_text(json.dumps(_connection(f"{RUN_MOUNT}/k", key)))
            if home is not None:
                env["PYTHONHOME"] = home
                env["LD_LIBRARY_PATH"] = home + "/lib"  # libpython, found through a RUNPATH naming the host path
            if self.sandbox.as_root:
                os.chown(self.run_dir, self.sandbox.uid, self.sandbox.gid)
            argv = [python, "-S", "-s", "-c", KERNEL_BOOT, ":".join(sites), "-f", f"{RUN_MOUNT}/kernel.json"]
            argv, preexec, fds = self.sandbox.command(argv, binds={str(self.run_dir): RUN_MOUNT}, env=env)
        else:
            (self.run_dir / "kernel.json").write_text(host_conn.read_text())
            argv = [sys.executable, "-m", "ipykernel_launcher", "-f", str(self.run_dir / "kernel.json")]
            preexec, fds = rlimit_setter(self.limits, None), ()
            env = {**os.environ, **{k: v for k, v in env.items() if k.endswith("_NUM_THREADS")},
                   "IPYTHONDIR": str(self.run_dir / "ipython"), "MPLCONFIGDIR": str(self.run_dir / "mpl")}
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty kernel must never block on it
        self.proc = subprocess.Popen(argv, cwd=self.cwd if self.sandbox is None else None, env=None if self.sandbox
                                     else env, preexec_fn=preexec, pass_fds=fds, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True)
        client = BlockingKernelClient(connection_file=str(host_conn))
        client.load_connection_file()
        client.start_channels()
        self.client = client
        try:
            self._wait_ready(self.startup_timeout)
        except Exception:
            err = self._stderr_tail()
            self.close()
            raise SandboxUnavailable(f"the kernel did not start: {err or 'no answer'}") from None
        self.start_seconds = time.perf_counter() - t0

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the sockets exist only once the kernel bound them
            if self.proc.poll() is not None:
                raise RuntimeError("kernel exited")
            try:
                self.client.wait_for_ready(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def _stderr_tail(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        try:
            self.stderr.seek(0)
            return strip_ansi(self.stderr.read().decode(errors="replace")).strip()[-800:]
        except (OSError, ValueError, AttributeError):
            return ""

    def restart(self) -> None:
        self._stop()
        self.start()

    def _stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # bwrap --die-with-parent / nsjail's pid namespace take the sandbox's processes
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if getattr(self, "stderr", None) is not None:
            self.stderr.close()
            self.stderr = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def close(self) -> None:
        self._stop()
        if self.sandbox is not None:
            self.sandbox.close()

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- cells

    def run(self, code: str, timeout: float | None = None) -> Observation:
        """Run one cell: its stdout/stderr and results as text, the error (traceback) if any, PNG figures."""
        if self.client is None or not self.alive:
            self.restart()
            lost = "the previous kernel had died; a new one was started (state lost). "
        else:
            lost = ""
        timeout = self.timeout if timeout is None else timeout
        msg_id = self.client.execute(code, store_history=False, allow_stdin=False)
        obs = Observation()
        text: list[str] = []
        deadline = time.monotonic() + timeout
        interrupted_at = None
        while True:
            now = time.monotonic()
            if interrupted_at is None and now > deadline:
                self._interrupt()
                interrupted_at = now
            if interrupted_at is not None and now > interrupted_at + INTERRUPT_GRACE or not self.alive:
                died = not self.alive
                code_ = self.proc.returncode if died else None
                self.restart()
                obs.text = "".join(text)
                why = (f"the kernel died (exit status {code_}: a resource limit or a kill)" if died else
                       f"the cell ran past {timeout:g} s and did not stop on interrupt")
                obs.error = lost + f"{why}; the kernel was restarted and its state is lost"
                return obs
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                if "image/png" in data:
                    obs.images.append(base64.b64decode(data["image/png"]))
                elif "text/plain" in data:
                    text.append(data["text/plain"] + "\n")
            elif kind == "error":
                tb = strip_ansi("\n".join(content.get("traceback", [])))
                obs.error = tb or f"{content.get('ename')}: {content.get('evalue')}"
            elif kind == "status" and content.get("execution_state") == "idle":
                break
        obs.text = "".join(text)
        if interrupted_at is not None:
            obs.error = f"timeout: the cell ran past {timeout:g} s and was interrupted (the kernel's state is kept)"
        if lost:
            obs.error = lost + (obs.error or "")
        return obs

    def _interrupt(self) -> None:
        msg = self.client.session.msg("interrupt_request", content={})
        self.client.control_channel.send(msg)
