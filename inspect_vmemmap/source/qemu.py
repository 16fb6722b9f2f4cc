"""What a QEMU guest's monitor says about its memory, for guests whose VMCOREINFO drgn
cannot get from QEMU (no ``-device vmcoreinfo``: riscv virt refuses it, its fw_cfg being
created after the devices). One short QMP connection, made while no other client holds
the socket (QEMU serves one at a time)."""

from __future__ import annotations

import json
import re
import socket
from typing import List, Tuple

from inspect_vmemmap.errors import AnalysisError

_RAM_LINE = re.compile(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): ")


def ram_ranges(mtree: str) -> List[Tuple[int, int]]:
    """``[(start, end)]`` of the RAM regions of the system address space, from the text of
    ``info mtree -f`` (the flat view that has ``AS "memory"``)."""
    out: List[Tuple[int, int]] = []
    for view in re.split(r"^FlatView #\d+\n", mtree, flags=re.M):
        if ' AS "memory", ' not in view:
            continue
        for line in view.splitlines():
            m = _RAM_LINE.match(line)
            if m:
                out.append((int(m.group(1), 16), int(m.group(2), 16) + 1))
    return out


def guest_ram(path: str, timeout: float = 10.0) -> List[Tuple[int, int]]:
    """The guest's RAM ranges, asked of its QMP socket (``human-monitor-command info mtree -f``).

    :raises AnalysisError: when the socket does not answer as QMP.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        f = s.makefile("rwb", buffering=0)

        def reply() -> dict:
            while True:
                line = f.readline()
                if not line:
                    raise OSError("connection closed")
                msg = json.loads(line)
                if "event" not in msg:
                    return msg

        reply()  # the greeting
        for cmd in ({"execute": "qmp_capabilities"},
                    {"execute": "human-monitor-command", "arguments": {"command-line": "info mtree -f"}}):
            s.sendall(json.dumps(cmd).encode() + b"\n")
            msg = reply()
            if "error" in msg:
                raise OSError(msg["error"].get("desc", "QMP error"))
        return ram_ranges(msg.get("return", ""))
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{path}: cannot ask QEMU for the guest's memory map ({e})") from None
    finally:
        s.close()
