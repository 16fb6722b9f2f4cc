"""A minimal QMP client (one connection per command) and an ELF note check for dumps."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

from .errors import LabError


def qmp_command(
    sock_path: Path | str, command: str, arguments: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> Any:
    """Connect to a QMP unix socket, negotiate capabilities, run ``command``, disconnect.

    Returns the command's ``return`` value; raises LabError on QMP errors. Events are skipped.
    A QEMU QMP socket serves one client at a time: if another client (e.g. drgn) holds it, the
    greeting never arrives and this times out with a message saying so.
    """
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    f = None
    try:
        s.settimeout(min(timeout, 10.0))
        try:
            s.connect(str(sock_path))
        except OSError as e:
            raise LabError(f"cannot connect to QMP socket {sock_path}: {e}") from None
        f = s.makefile("rwb", buffering=0)

        def read() -> dict:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                s.settimeout(remaining)
                line = f.readline()
                if not line:
                    raise LabError(f"QMP connection closed during {command}")
                msg = json.loads(line)
                if "event" not in msg:
                    return msg

        def send(obj: dict) -> None:
            s.sendall(json.dumps(obj).encode() + b"\n")

        try:
            greeting = read()
        except socket.timeout:
            raise LabError(
                f"no QMP greeting on {sock_path} (is another client connected to it?)"
            ) from None
        if "QMP" not in greeting:
            raise LabError(f"unexpected QMP greeting: {greeting}")
        try:
            send({"execute": "qmp_capabilities"})
            reply = read()
            if "error" in reply:
                raise LabError(f"QMP qmp_capabilities failed: {reply['error']}")
            msg: dict[str, Any] = {"execute": command, "id": 1}
            if arguments:
                msg["arguments"] = arguments
            send(msg)
            reply = read()
        except socket.timeout:
            raise LabError(f"QMP {command} timed out after {timeout:.0f}s") from None
        if "error" in reply:
            err = reply["error"]
            raise LabError(f"QMP {command} failed: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")
    finally:
        # The file object keeps the descriptor open after s.close() (and a traceback keeps
        # the file object alive): QEMU would see this client connected and greet no other.
        if f is not None:
            f.close()
        s.close()


def elf_notes(path: Path | str) -> list[tuple[str, int, bytes]]:
    """(name, type, desc) of the PT_NOTE segments of an ELF core file."""
    notes = []
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF":
            raise LabError(f"{path} is not an ELF file")
        end = "<" if ident[5] == 1 else ">"
        is64 = ident[4] == 2
        if is64:
            phoff, = struct.unpack_from(end + "Q", ident, 0x20)
            shoff, = struct.unpack_from(end + "Q", ident, 0x28)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x36)
            phdr = end + "IIQQQQQQ"
        else:
            phoff, = struct.unpack_from(end + "I", ident, 0x1C)
            shoff, = struct.unpack_from(end + "I", ident, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 0x2A)
            phdr = end + "IIIIIIII"
        if phnum == 0xFFFF:  # PN_XNUM: real count in section header 0's sh_info
            f.seek(shoff + (44 if is64 else 28))
            phnum, = struct.unpack(end + "I", f.read(4))
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            fields = struct.unpack(phdr, f.read(struct.calcsize(phdr)))
            if fields[0] != 4:  # PT_NOTE
                continue
            if is64:
                offset, filesz = fields[2], fields[5]
            else:
                offset, filesz = fields[1], fields[4]
            f.seek(offset)
            data = f.read(filesz)
            pos = 0
            while pos + 12 <= len(data):
                namesz, descsz, ntype = struct.unpack_from(end + "III", data, pos)
                pos += 12
                name = data[pos : pos + namesz].rstrip(b"\0").decode(errors="replace")
                pos += (namesz + 3) & ~3
                desc = data[pos : pos + descsz]
                pos += (descsz + 3) & ~3
                notes.append((name, ntype, desc))
    return notes


def dump_vmcoreinfo(path: Path | str) -> str | None:
    """The VMCOREINFO note text of an ELF dump, or None."""
    for name, _, desc in elf_notes(path):
        if name == "VMCOREINFO":
            return desc.rstrip(b"\0").decode(errors="replace")
    return None
