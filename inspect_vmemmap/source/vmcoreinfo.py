"""VMCOREINFO: the ``KEY=VALUE`` note every dump and running kernel carries
(kernel/vmcore_info.c, crash_core.c before 6.5), parsed into typed values. No drgn."""

from __future__ import annotations

from typing import Dict, Optional

from inspect_vmemmap.errors import AnalysisError


def parse_vmcoreinfo(text: str) -> Dict[str, str]:
    """``KEY=VALUE`` lines of a VMCOREINFO note.

    :return: key -> value string (``SYMBOL(x)`` and ``NUMBER(x)`` keys as written).
    """
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


class VmcoreInfo:
    """Typed access to VMCOREINFO values."""

    def __init__(self, entries: Dict[str, str]) -> None:
        self.entries = entries

    def get(self, key: str) -> Optional[str]:
        return self.entries.get(key)

    def _int(self, key: str, base: int) -> Optional[int]:
        v = self.entries.get(key)
        if not v:
            return None
        try:
            return int(v, base)
        except ValueError:
            raise AnalysisError(f"VMCOREINFO {key} has an impossible value {v[:40]!r}") from None

    def symbol(self, name: str) -> Optional[int]:
        return self._int(f"SYMBOL({name})", 16)

    def number(self, name: str) -> Optional[int]:
        return self._int(f"NUMBER({name})", 0)

    def size(self, name: str) -> Optional[int]:
        return self._int(f"SIZE({name})", 10)

    def length(self, name: str) -> Optional[int]:
        return self._int(f"LENGTH({name})", 10)

    def offset(self, name: str) -> Optional[int]:
        return self._int(f"OFFSET({name})", 10)


def find_vmcoreinfo_text(path: str) -> Optional[bytes]:
    """The kernel's VMCOREINFO text (kernel/vmcore_info.c ``vmcoreinfo_data``) found in
    a dump by its first lines, for dumps without the note.

    :return: the text, or None.
    """
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(b"OSRELEASE=")
            while at >= 0:
                end = m.find(b"\0", at, at + 65536)
                text = m[at:end if end >= 0 else at + 65536]
                if b"\nPAGESIZE=" in text and b"SYMBOL(" in text:
                    return bytes(text)
                at = m.find(b"OSRELEASE=", at + 1)
    except (OSError, ValueError):
        return None
    return None


def find_vmcoreinfo_in_ram(read, ranges, chunk: int = 1 << 20) -> Optional[bytes]:
    """The VMCOREINFO text found in guest RAM by its first lines, as
    :func:`find_vmcoreinfo_text` finds it in a dump: ``read(address, size)`` reads
    physical memory, ``ranges`` are the RAM ranges ``[(start, end)]``.

    :return: the text, or None.
    """
    for start, end in ranges:
        for a in range(start, end, chunk):
            try:
                data = read(a, min(chunk + 65536, end - a))
            except (OSError, ValueError, LookupError):
                continue
            at = data.find(b"OSRELEASE=", 0, chunk)
            while at >= 0:
                stop = data.find(b"\0", at)
                text = data[at:stop if stop >= 0 else len(data)]
                if b"\nPAGESIZE=" in text and b"SYMBOL(" in text:
                    return bytes(text)
                at = data.find(b"OSRELEASE=", at + 1, chunk)
    return None
