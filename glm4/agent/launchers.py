"""Which isolation tool runs model-written code and MCP servers: bubblewrap, else nsjail, else none.

    sb = open_sandbox(workspace, limits)                 # the first launcher that works here
    sb = open_sandbox(workspace, limits, launcher="nsjail")
    launcher_status()                                    # {"bwrap": (ok, why), "nsjail": (ok, why)}

With no launcher working, open_sandbox raises SandboxUnavailable naming why each one failed; the callers
(CodeInterpreter, MCP stdio servers) then refuse unless the user asked to run unsandboxed.
"""

from __future__ import annotations

from pathlib import Path

from .nsjail import NsjailSandbox, nsjail_works
from .sandbox import BwrapSandbox, Limits, Sandbox, SandboxUnavailable, bwrap_works

LAUNCHERS = {"bwrap": (BwrapSandbox, bwrap_works), "nsjail": (NsjailSandbox, nsjail_works)}


def launcher_status() -> dict[str, tuple[bool, str]]:
    """Each launcher, in the order they are tried: (works here, its binary or why not)."""
    return {name: works() for name, (_, works) in LAUNCHERS.items()}


def choose_launcher(launcher: str | None = None) -> tuple[str | None, str]:
    """(the launcher to use, its binary) or (None, why none works). `launcher` forces one by name."""
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"unknown sandbox launcher {launcher!r}: choose from {', '.join(LAUNCHERS)}")
    names = [launcher] if launcher else list(LAUNCHERS)
    reasons = []
    for name in names:
        ok, why = LAUNCHERS[name][1]()
        if ok:
            return name, why
        reasons.append(why)
    return None, "; ".join(reasons)


def open_sandbox(workspace: str | Path, limits: Limits | None = None, uid: int | None = None,
                 launcher: str | None = None) -> Sandbox:
    name, why = choose_launcher(launcher)
    if name is None:
        raise SandboxUnavailable(why)
    return LAUNCHERS[name][0](workspace, limits, uid)
