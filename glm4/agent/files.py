"""File tools confined to a workspace folder: read_file, write_file, list_files.

Paths are relative to the workspace; `/mnt/data/...` (where the interpreter sees the workspace) means the
same. Anything that resolves outside it (`../../etc/passwd`, an absolute path, a symlink leading out) is
refused with an observation, never followed. The sandboxed code can change the workspace while we look at
it (swap a folder for a symlink), so a file is opened without following a final symlink and its open
descriptor is checked to be inside the workspace before a byte is read or written (a write truncates only
after that check). New files get the workspace folder's owner (the sandbox uid, when we run as root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from .observation import Observation
from .sandbox import WORKSPACE_MOUNT
from .tools import Tool

MAX_READ_CHARS = 100_000
MAX_WRITE_BYTES = 10 << 20


class PathOutsideWorkspace(ValueError):
    pass


class Workspace:
    """A folder the agent's file tools (and the interpreter's /mnt/data) work in."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, path: str) -> Path:
        p = str(path).strip()
        if p == WORKSPACE_MOUNT or p.startswith(WORKSPACE_MOUNT + "/"):
            p = p[len(WORKSPACE_MOUNT):].lstrip("/")
        if "\x00" in p:
            raise PathOutsideWorkspace(f"{path!r}: NUL in a path")
        target = (self.root / p).resolve()
        if target != self.root and not target.is_relative_to(self.root):
            raise PathOutsideWorkspace(f"{path!r} is outside the workspace: refused")
        return target

    def _open(self, target: Path, flags: int) -> int:
        """os.open that refuses a final symlink and a descriptor that ended up outside the workspace."""
        fd = os.open(target, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        real = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") else target
        if not real.is_relative_to(self.root):
            os.close(fd)
            raise PathOutsideWorkspace(f"{target.name!r} led outside the workspace: refused")
        return fd

    def _give_to_owner(self, target: Path) -> None:
        if os.geteuid() != 0:
            return
        st = self.root.stat()
        for p in [target, *target.parents]:
            if p == self.root or not p.is_relative_to(self.root):
                break
            os.lchown(p, st.st_uid, st.st_gid)

    def read_file(self, path: Annotated[str, "file path inside the workspace"],
                  offset: Annotated[int, "first character to return"] = 0) -> Observation:
        """Read a text file from the workspace."""
        try:
            target = self.resolve(path)
            if not target.is_file():
                return Observation(error=f"{path!r}: no such file in the workspace")
            with os.fdopen(self._open(target, os.O_RDONLY), "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except (PathOutsideWorkspace, OSError) as e:
            return Observation(error=str(e))
        chunk = text[offset:offset + MAX_READ_CHARS]
        more = len(text) - offset - len(chunk)
        return Observation(chunk + (f"\n[{more} more characters: read again with offset={offset + len(chunk)}]"
                                    if more > 0 else ""))

    def write_file(self, path: Annotated[str, "file path inside the workspace"],
                   content: Annotated[str, "the text to write"],
                   append: Annotated[bool, "append instead of overwriting"] = False) -> Observation:
        """Write a text file in the workspace (folders are created)."""
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            return Observation(error=f"{len(data)} bytes is over the {MAX_WRITE_BYTES} byte limit for one write")
        try:
            target = self.resolve(path)
            if target == self.root or target.is_dir():
                return Observation(error=f"{path!r} is a folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open(target, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0))
            with os.fdopen(fd, "wb") as f:
                if not append:
                    f.truncate(0)
                f.write(data)
            self._give_to_owner(target)
        except (PathOutsideWorkspace, OSError) as e:
            return Observation(error=str(e))
        return Observation(f"wrote {len(data)} bytes to {target.relative_to(self.root)}")

    def list_files(self, path: Annotated[str, "folder inside the workspace"] = ".") -> Observation:
        """List a workspace folder: one entry per line, folders ending in /, files with their size."""
        try:
            target = self.resolve(path)
            if not target.is_dir():
                return Observation(error=f"{path!r}: no such folder in the workspace")
            lines = []
            for entry in sorted(target.iterdir()):
                lines.append(f"{entry.name}/" if entry.is_dir() else f"{entry.name}  {entry.stat().st_size} bytes")
        except (PathOutsideWorkspace, OSError) as e:
            return Observation(error=str(e))
        return Observation("\n".join(lines) if lines else "(empty)")

    def tools(self) -> list[Tool]:
        return [Tool.from_function(self.read_file), Tool.from_function(self.write_file),
                Tool.from_function(self.list_files)]
