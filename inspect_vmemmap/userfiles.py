"""Files the user names on the command line, read so that whatever is wrong with them is
said in one line a user understands (the CLI prints it and exits 2).

- :func:`plain_core`: a crash dump compressed with xz, gzip, bzip2 or zstd (as dumps are
  kept and shipped, and as ``fixtures/`` holds them) is decompressed into a sparse
  temporary file that drgn can open, removed when the process ends.
- :func:`read_layout`: a layout written by ``check --save-layout``.
"""

from __future__ import annotations

import atexit
import bz2
import contextlib
import dataclasses
import errno
import gzip
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import zlib
from typing import Callable, Optional, Tuple

#: leading bytes of each compressed format -> (name, the command that decompresses it)
MAGIC = (
    (b"\xfd7zXZ\x00", "xz", "xz -dk"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
    (b"\x1f\x8b", "gzip", "gzip -dk"),
    (b"BZh", "bzip2", "bzip2 -dk"),
)
_BLOCK = 1 << 16


class UserFileError(ValueError):
    """What is wrong with a file the user gave, in one line."""


def compression(path: str) -> Optional[Tuple[str, str]]:
    """:return: ``(format, command)`` if ``path`` starts like a compressed file, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # the opener says what is wrong with it
    for magic, name, command in MAGIC:
        if head.startswith(magic):
            return name, command
    return None


def _stream(path: str, name: str):
    """A readable binary stream of the decompressed data, and a function to finish it."""
    if name == "xz":
        f = lzma.open(path)
        return f, f.close
    if name == "gzip":
        f = gzip.open(path)
        return f, f.close
    if name == "bzip2":
        f = bz2.open(path)
        return f, f.close
    # zstd: not in this Python's standard library; the zstd command (scripts/setup installs it)
    zstd = shutil.which("zstd")
    if zstd is None:
        raise UserFileError(f"{path}: zstd-compressed, and the zstd command is not installed: "
                            f"decompress it with `zstd -d {path}` elsewhere, or install zstd (apt-get install zstd)")
    p = subprocess.Popen([zstd, "-dcq", "--", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish() -> None:
        p.stdout.close()
        err = p.stderr.read().decode(errors="replace").strip().splitlines()
        if p.wait() != 0:
            raise UserFileError(f"{path}: zstd could not decompress it ({err[-1] if err else f'status {p.returncode}'})")

    return p.stdout, finish


def plain_core(path: str, status: Optional[Callable[[str], contextlib.AbstractContextManager]] = None) -> str:
    """``path`` itself, or for a compressed dump a decompressed temporary copy (sparse:
    the zero pages of a dump take no disk), deleted when the process exits.

    :param status: ``status(text)`` gives a context manager that shows ``text`` while
        the work runs (a spinner on a terminal).
    :raises UserFileError: corrupt data, no space left (naming the command to run instead).
    """
    kind = compression(path)
    if kind is None:
        return path
    name, command = kind
    fd, tmp = tempfile.mkstemp(prefix="inspect-vmemmap-", suffix=".core")
    atexit.register(_remove, tmp)
    what = f"decompressing {path} ({name}) into {os.path.dirname(tmp)}"
    try:
        with (status(what) if status else contextlib.nullcontext()), os.fdopen(fd, "wb") as out:
            src, finish = _stream(path, name)
            try:
                while True:
                    block = src.read(_BLOCK)
                    if not block:
                        break
                    if block.count(0) == len(block):
                        out.seek(len(block), os.SEEK_CUR)  # a hole
                    else:
                        out.write(block)
                out.truncate()
            finally:
                finish()
    except (lzma.LZMAError, EOFError, OSError, zlib.error) as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UserFileError(f"{path}: no space left in {os.path.dirname(tmp)} to decompress it: "
                                f"run `{command} {path}` where there is room (or set TMPDIR) and give the result") from None
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
            raise UserFileError(f"{path}: {e.strerror} while decompressing it") from None
        raise UserFileError(f"{path}: {name}-compressed, but the data is damaged or cut short ({e})") from None
    return tmp


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- layouts -----------------------------------------------------------------------------------

_WHAT = "a layout is the JSON file `inspect-vmemmap check --save-layout FILE` writes"


def read_layout(path: str):
    """:return: the model's :class:`~inspect_vmemmap.model.Inputs` from ``path``.
    :raises UserFileError: on anything that is not such a file, saying what it is instead."""
    from inspect_vmemmap.layout import KernelLayout
    from inspect_vmemmap.facts import Inputs

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserFileError(f"{path}: {e.strerror}") from None
    if compression(path):
        raise UserFileError(f"{path}: a {compression(path)[0]}-compressed file, not a layout ({_WHAT})")
    if raw.startswith(b"\x7fELF") or raw[:8] in (b"KDUMP   ", b"DISKDUMP"):
        raise UserFileError(f"{path}: a crash dump, not a layout ({_WHAT}; `check --core {path}` reads dumps)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserFileError(f"{path}: not a text file, so not a layout ({_WHAT})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise UserFileError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg}); {_WHAT}") from None
    if not isinstance(doc, dict):
        raise UserFileError(f"{path}: a JSON {type(doc).__name__}, not a layout ({_WHAT})")
    if "layout" not in doc:
        if doc.get("schema") == "inspect-vmemmap/1":
            raise UserFileError(f"{path}: a `--json` report, not a layout ({_WHAT})")
        raise UserFileError(f"{path}: no \"layout\" object, so not a layout ({_WHAT})")
    lay = doc["layout"]
    if not isinstance(lay, dict):
        raise UserFileError(f"{path}: \"layout\" is a JSON {type(lay).__name__}, not an object")
    fields = {f.name: f for f in dataclasses.fields(KernelLayout)}
    unknown = sorted(set(lay) - set(fields))
    if unknown:
        raise UserFileError(f"{path}: \"layout\" has fields this version does not know: {', '.join(unknown)}")
    missing = [n for n, f in fields.items() if n not in lay and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserFileError(f"{path}: \"layout\" lacks {', '.join(missing)}")
    try:
        return Inputs.from_json(doc)
    except KeyError as e:
        raise UserFileError(f"{path}: an entry lacks its {e.args[0]!r} field") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UserFileError(f"{path}: a field has the wrong type or value ({e})") from None
