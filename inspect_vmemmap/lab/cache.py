"""Cache location, progress reporting and small file helpers shared by the lab."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import LabError

Progress = Optional[Callable[[str], None]]


def cache_root() -> Path:
    """``$INSPECT_VMEMMAP_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/inspect-vmemmap``."""
    env = os.environ.get("INSPECT_VMEMMAP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "inspect-vmemmap"


def reporter(progress: Progress) -> Callable[[str], None]:
    """Turn the user's ``progress`` argument into a callable (default: one line to stderr)."""
    if progress is not None:
        return progress

    def _stderr(msg: str) -> None:
        print(f"[lab] {msg}", file=sys.stderr, flush=True)

    return _stderr


def human_size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} kB"
    return f"{n} B"


@contextlib.contextmanager
def atomic_path(final: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` (with ``mode``) if the
    block succeeds, so an interrupted write never leaves a partial ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(final: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_path(final, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(final, text.encode(), mode)


def require_tool(name: str, package: str) -> str:
    """Return the path of executable ``name`` or raise LabError naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        # sbin directories are often missing from non-root PATHs.
        for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
            cand = Path(d) / name
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
        raise LabError(f"{name} not found: apt-get install {package}")
    return path


@contextlib.contextmanager
def cache_lock(name: str = "lock") -> Iterator[None]:
    """Exclusive advisory lock on ``<cache>/.<name>`` (serialises fetches across processes)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
