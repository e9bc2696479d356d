"""The isolation layer for model-written code: a bubblewrap command line, rlimits and a seccomp filter.

    sb = BwrapSandbox(workspace, limits=Limits(memory_bytes=2 << 30))   # or launchers.open_sandbox(...)
    argv, preexec, pass_fds = sb.command([python, "-c", "..."], binds={run_dir: "/run/kernel"})
    argv = sb.spawn_argv([...])       # the same, for spawners with no preexec_fn / pass_fds (prlimit, fd 3)

`Sandbox` holds what every launcher shares (uid, limits, /etc/passwd); nsjail.py builds the same sandbox
through nsjail where bubblewrap is missing, and launchers.py picks one.

What the sandboxed process sees and may do:
- `/usr` (and the /bin, /lib, /lib64 links) read-only; the Python install and its site-packages read-only
  under /opt; an empty /etc but for passwd/group; a private /tmp (tmpfs, sized); the workspace read-write
  at /mnt/data (what GLM-4's `python` prompt promises); nothing else of the host (no /root, no project).
- New pid, net, ipc, uts (and cgroup) namespaces: no network at all (`lo` is down), no host processes.
- An unprivileged uid: started as root, bwrap sets up the mounts and `setpriv` drops to a dedicated uid
  with no capabilities and no_new_privs (RLIMIT_NPROC is ignored for uid 0, so a root sandbox could fork
  without bound); started as a user, bwrap maps the sandbox into a user namespace of that user.
- rlimits: CPU seconds, address space, processes, file size, open files (set before exec, inherited).
- seccomp (when libseccomp and `pyseccomp` are present): EPERM for IPv4/IPv6/packet sockets,
  ptrace and process_vm_*, mount/namespace calls, module loading, kexec, bpf, perf, keyrings, reboot.
"""

from __future__ import annotations

import errno
import functools
import os
import pwd
import resource
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORKSPACE_MOUNT = "/mnt/data"
PYTHON_MOUNT = "/opt/python"
SITE_MOUNT = "/opt/site-packages"
UID_RANGE = range(60000, 65000)  # dedicated sandbox uids (when started as root), skipping any in /etc/passwd


class SandboxUnavailable(RuntimeError):
    """No isolation tool works on this machine (and the caller did not opt into running unsandboxed)."""


@dataclass
class Limits:
    """Resource limits of one sandboxed process tree (each is an rlimit unless said otherwise)."""

    cpu_seconds: int = 600  # cumulative CPU time of the kernel process; over it, SIGXCPU ends the kernel
    memory_bytes: int = 4 << 30  # address space (RLIMIT_AS): a larger allocation raises MemoryError
    processes: int = 64  # tasks (processes and threads) of the sandbox uid (RLIMIT_NPROC)
    file_bytes: int = 256 << 20  # largest file the code may write (RLIMIT_FSIZE; Python sees EFBIG)
    open_files: int = 256  # RLIMIT_NOFILE
    tmp_bytes: int = 256 << 20  # size of the private /tmp (tmpfs)


# seccomp: calls that fail with EPERM inside the sandbox (defence in depth behind namespaces and the uid)
BLOCKED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_by_handle_at", "name_to_handle_at",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
)
# AF_INET, AF_INET6, AF_PACKET; AF_UNIX stays (zmq ipc), and AF_NETLINK too: libzmq aborts when getifaddrs fails
BLOCKED_SOCKET_FAMILIES = (2, 10, 17)
CLONE_NEWUSER = 0x10000000


def seccomp_filter_file() -> tuple[object | None, str]:
    """A temp file holding the BPF program (for `bwrap --seccomp FD`), or None and why not."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:  # the package, or libseccomp.so.2 it loads
        return None, f"no seccomp filter (pyseccomp/libseccomp unavailable: {e})"
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        eperm = sc.ERRNO(errno.EPERM)
        for name in BLOCKED_SYSCALLS:
            try:
                f.add_rule(eperm, name)
            except (OSError, ValueError, RuntimeError):  # a call this architecture does not have
                pass
        for fam in BLOCKED_SOCKET_FAMILIES:
            f.add_rule(eperm, "socket", sc.Arg(0, sc.EQ, fam))
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        tmp = tempfile.TemporaryFile()
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp, "seccomp filter (IP sockets, ptrace, mounts/namespaces, modules, bpf, keyrings: EPERM)"
    except Exception as e:  # noqa: BLE001 - any libseccomp failure means: no filter, and say so
        return None, f"no seccomp filter ({type(e).__name__}: {e})"


@functools.lru_cache(maxsize=1)
def bwrap_works() -> tuple[bool, str]:
    """Whether bubblewrap is installed and can create the namespaces we need here (cached)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    argv = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev"]
    if os.geteuid() != 0:
        argv.append("--unshare-user")
    try:
        r = subprocess.run(argv + ["/usr/bin/true"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap does not run here: {e}"
    if r.returncode != 0:
        return False, f"bubblewrap cannot create namespaces here: {r.stderr.strip()[:300]}"
    return True, exe


def _uids_in_use() -> set[int]:
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uids.add(os.stat(entry.path).st_uid)
            except OSError:
                pass
    return uids


def free_sandbox_uid() -> int:
    """A uid no account and no running process has: RLIMIT_NPROC counts every process of a uid."""
    busy = _uids_in_use()
    for uid in UID_RANGE:
        if uid in busy:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise SandboxUnavailable(f"no free sandbox uid in {UID_RANGE.start}-{UID_RANGE.stop - 1}")


def python_mounts() -> tuple[list[tuple[str, str]], str, str | None, list[str]]:
    """Read-only binds for this Python (host path, sandbox path), the interpreter inside, its PYTHONHOME
    inside (None for a /usr Python), and the site-packages folders inside: the kernel starts with -S and adds
    them with site.addsitedir (so .pth files work and a venv's base site-packages stay out)."""
    base = Path(sys.base_prefix).resolve()
    binds: list[tuple[str, str]] = []
    home = None
    if not base.is_relative_to("/usr"):  # pyenv, conda, /opt builds: mounted under a name that says nothing
        binds.append((str(base), PYTHON_MOUNT))
        home = PYTHON_MOUNT

    def inside(path: str) -> str:
        real = Path(path).resolve()
        if home is not None and real.is_relative_to(base):
            return f"{PYTHON_MOUNT}/{real.relative_to(base)}"
        if real.is_relative_to("/usr"):
            return str(real)
        for host, mounted in binds:
            if host == str(real):
                return mounted
        binds.append((str(real), f"{SITE_MOUNT}/{len(binds)}"))
        return binds[-1][1]

    exe = Path(getattr(sys, "_base_executable", sys.executable))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = inside(str(exe.parent / ver)) if (exe.parent / ver).exists() else inside(str(exe))
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    sites = [inside(d) for d in dirs if os.path.isdir(d)]
    return binds, python, home, list(dict.fromkeys(sites))


def _count_processes(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/status") as f:
                    n += sum(int(line.split()[1]) for line in f if line.startswith("Threads:")) if os.stat(
                        entry.path).st_uid == uid else 0
            except (OSError, ValueError, IndexError):
                pass
    return n


class Sandbox:
    """What every launcher shares: the workspace, the limits, the sandbox uid, a private /etc/passwd.
    Subclasses build the command line: `command(argv, ...)` for a Popen with `preexec_fn` and `pass_fds`,
    `spawn_argv(argv, ...)` for spawners that take only an argv (the MCP client)."""

    name = "sandbox"
    probe = None  # subclasses: () -> (works, the tool's path or why not); SandboxUnavailable when it does not work

    def __init__(self, workspace: str | Path, limits: Limits | None = None, uid: int | None = None):
        if self.probe is not None:
            ok, why = self.probe()
            if not ok:
                raise SandboxUnavailable(why)
            self.exe = why  # the isolation tool's executable
        self.workspace = Path(workspace).resolve()
        self.limits = limits or Limits()
        self.as_root = os.geteuid() == 0
        self.uid = (uid if uid is not None else free_sandbox_uid()) if self.as_root else os.getuid()
        self.gid = self.uid if self.as_root else os.getgid()
        self.etc = Path(tempfile.mkdtemp(prefix="glm4-sandbox-etc-"))
        (self.etc / "passwd").write_text(f"sandbox:x:{self.uid}:{self.gid}::/tmp:/bin/sh\n")
        (self.etc / "group").write_text(f"sandbox:x:{self.gid}:\n")
        self.seccomp_note = "no seccomp filter"
        if self.as_root:
            own_tree(self.workspace, self.uid, self.gid)

    def describe(self) -> str:
        who = f"uid {self.uid} (dropped from root)" if self.as_root else f"uid {self.uid} in a user namespace"
        lim = self.limits
        return (f"{self.name}: no network, read-only system, workspace at {WORKSPACE_MOUNT}, {who}; rlimits cpu "
                f"{lim.cpu_seconds}s, memory {lim.memory_bytes >> 20} MiB, {lim.processes} tasks, files "
                f"{lim.file_bytes >> 20} MiB, {lim.open_files} fds; {self.seccomp_note}")

    def nproc(self) -> int:
        """RLIMIT_NPROC: a dedicated uid gets the limit; a user's own processes count against it too."""
        return self.limits.processes if self.as_root else _count_processes(self.uid) + self.limits.processes

    def command(self, argv: list[str], binds: dict[str, str] | None = None, env: dict[str, str] | None = None,
                ro_binds: dict[str, str] | None = None) -> tuple[list[str], Callable[[], None], tuple[int, ...]]:
        raise NotImplementedError

    def spawn_argv(self, argv: list[str], env: dict[str, str] | None = None,
                   ro_binds: dict[str, str] | None = None) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        shutil.rmtree(self.etc, ignore_errors=True)


class BwrapSandbox(Sandbox):
    """Builds the bubblewrap command for one sandboxed process tree over a workspace folder."""

    name = "bubblewrap"
    probe = staticmethod(bwrap_works)

    def __init__(self, workspace: str | Path, limits: Limits | None = None, uid: int | None = None):
        super().__init__(workspace, limits, uid)
        self.seccomp, self.seccomp_note = seccomp_filter_file()

    def command(self, argv: list[str], binds: dict[str, str] | None = None, env: dict[str, str] | None = None,
                ro_binds: dict[str, str] | None = None) -> tuple[list[str], Callable[[], None], tuple[int, ...]]:
        """(bwrap argv, preexec_fn setting the rlimits, fds to pass) to run `argv` inside the sandbox.
        `binds` / `ro_binds` are extra read-write / read-only folders {host: inside}; `env` is the whole
        environment inside."""
        py_binds = python_mounts()[0]
        a = [self.exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox",
             "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
             "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp"]
        for d in ("/etc", "/opt", "/run", "/mnt", SITE_MOUNT):
            a += ["--perms", "0755", "--dir", d]  # created 0700 by a root bwrap otherwise
        a += ["--ro-bind", str(self.etc / "passwd"), "/etc/passwd", "--ro-bind", str(self.etc / "group"), "/etc/group"]
        for host, inside in py_binds:
            a += ["--ro-bind", host, inside]
        made = {"/", "/etc", "/opt", "/run", "/mnt", "/tmp", "/usr"}
        for kind, extra in (("--bind", binds), ("--ro-bind", ro_binds)):
            for host, inside in (extra or {}).items():
                for parent in reversed(Path(inside).parents):  # each level readable by the sandbox uid
                    if str(parent) not in made and not parent.is_relative_to("/usr"):
                        a += ["--perms", "0755", "--dir", str(parent)]
                        made.add(str(parent))
                a += [kind, str(host), inside]
        a += ["--bind", str(self.workspace), WORKSPACE_MOUNT, "--chdir", WORKSPACE_MOUNT, "--clearenv"]
        for k, v in (env or {}).items():
            a += ["--setenv", k, v]
        fds: tuple[int, ...] = ()
        if self.seccomp is not None:
            fd = self.seccomp.fileno()
            os.lseek(fd, 0, os.SEEK_SET)
            a += ["--seccomp", str(fd)]
            fds = (fd,)
        if self.as_root:  # mounts as root, then the code runs as the dedicated uid without capabilities
            a += ["/usr/bin/setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                  "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        else:
            a[1:1] = ["--unshare-user", "--disable-userns", "--uid", str(self.uid), "--gid", str(self.gid)]
        return a + list(argv), rlimit_setter(self.limits, self.nproc()), fds

    def spawn_argv(self, argv: list[str], env: dict[str, str] | None = None,
                   ro_binds: dict[str, str] | None = None) -> list[str]:
        """A command needing no preexec_fn or inherited fd: prlimit sets the rlimits, a shell opens the
        seccomp program as fd 3 for bwrap."""
        bw, _, fds = self.command(argv, env=env, ro_binds=ro_binds)
        lim = self.limits
        prlimit = ["/usr/bin/prlimit", f"--cpu={lim.cpu_seconds}", f"--as={lim.memory_bytes}",
                   f"--nproc={self.nproc()}", f"--fsize={lim.file_bytes}", f"--nofile={lim.open_files}", "--"]
        if not fds:
            return [*prlimit, *bw]
        bpf = self.etc / "seccomp.bpf"
        self.seccomp.seek(0)
        bpf.write_bytes(self.seccomp.read())
        bw = [("3" if a == str(fds[0]) else a) for a in bw]
        return ["/bin/sh", "-c", 'exec "$@" 3<"$0"', str(bpf), *prlimit, *bw]

    def close(self) -> None:
        super().close()
        if self.seccomp is not None:
            self.seccomp.close()
            self.seccomp = None


def rlimit_setter(limits: Limits, nproc: int | None) -> Callable[[], None]:
    """A preexec_fn that applies the limits to the child (inherited by bwrap's sandboxed process)."""
    pairs = [(resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
             (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
             (resource.RLIMIT_CORE, 0)]
    if nproc is not None:
        pairs.append((resource.RLIMIT_NPROC, nproc))

    def apply() -> None:
        for res, value in pairs:
            resource.setrlimit(res, (value, value))
    return apply


def own_tree(path: Path, uid: int, gid: int) -> None:
    """Give a workspace to the sandbox uid (run as root): the sandboxed code may write there and nowhere else."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)
