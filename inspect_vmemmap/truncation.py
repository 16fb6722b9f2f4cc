"""Truncated dumps named as such (issue 15).

An ELF vmcore's program headers say how many bytes of each PT_LOAD segment the file
holds (``p_offset``, ``p_filesz``); a file shorter than that was cut (a copy that did not
finish, a full disk). drgn then fails the reads of what is missing, so the check sees
unreadable memory, not a kernel that lost it: this names the cut in ``target.dump``
(``truncated``, ``complete: false``, the file's and the expected size, the physical ranges
missing), the verdict says the check is incomplete, and with no section readable the
command refuses (exit 2).

(A kdump-compressed file's truncation is libkdumpfile's to report; only ELF is looked at.)
"""

from __future__ import annotations

import os
import struct
from typing import List, Optional, Tuple

from inspect_vmemmap.errors import AnalysisError

PT_LOAD = 1


def elf_truncation(path: str) -> Optional[dict]:
    """:return: what a truncated ELF core lacks, or None (complete, or not an ELF file).
    Reads only the ELF and program headers."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            ehdr = f.read(64)
            if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return None  # not a little-endian ELF64 file: not ours to judge
            phoff, = struct.unpack_from("<Q", ehdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
            if phentsize < 56 or phnum == 0 or phnum > 1 << 16:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return None
    missing: List[Tuple[int, int]] = []
    expected = len(table) + phoff
    lost = 0
    held = 0
    for i in range(len(table) // phentsize):
        p_type, _, off, _, pa, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type != PT_LOAD or not filesz:
            continue
        expected = max(expected, off + filesz)
        have = max(0, min(filesz, size - off))
        held += have
        if have < filesz:
            missing.append((pa + have, pa + filesz))
            lost += filesz - have
    if len(table) < phentsize * phnum:
        return {"truncated": True, "complete": False, "file_bytes": size, "expected_bytes": None,
                "missing": "program headers", "missing_bytes": None}
    if not missing:
        return None
    return {"truncated": True, "complete": False, "file_bytes": size, "expected_bytes": expected,
            "missing": [[hex(a), hex(b)] for a, b in missing], "missing_bytes": lost,
            "held_bytes": held}


def attach(target, core: Optional[str]):
    """Record on a just-opened target what its dump file lacks (before any layer reads
    it), and refuse a dump so cut that not even its headers are there.

    :return: the target.
    """
    info = elf_truncation(core) if core else None
    if info is not None and info["missing"] == "program headers":
        raise AnalysisError(f"{core}: truncated inside its ELF program headers ({info['file_bytes']} bytes)")
    target.truncation = info
    return target


def annotate(doc_target: dict, target) -> dict:
    """``target`` JSON with the truncation in ``dump`` (the dump's own fields kept)."""
    info = getattr(target, "truncation", None)
    if not info:
        return doc_target
    # a plain ELF vmcore has no "dump" part: the schema's required fields, nothing filtered
    dump = dict(doc_target.get("dump") or {"format": "elf",
                                          "dumped_pages": info["held_bytes"] // target.layout.page_size,
                                          "excluded_pages": 0, "filter": None})
    dump.update({k: v for k, v in info.items() if k != "held_bytes"})
    out = dict(doc_target)
    out["dump"] = dump
    return out


def refuse_if_nothing_readable(target, sections) -> None:
    """A truncated dump in which no section of mem_section could be read: nothing can be
    said about its vmemmap.

    :raises AnalysisError: one line.
    """
    info = getattr(target, "truncation", None)
    if info and not len(sections):
        raise AnalysisError(f"the dump is truncated ({info['file_bytes']} of {info['expected_bytes']} bytes) and "
                            f"no section of mem_section could be read from what is left")


def describe(dump: dict) -> str:
    """The truncation in words, for the verdict's dump line."""
    from inspect_vmemmap.vmemmap import size_label

    gone = dump.get("missing_bytes") or 0
    return (f"TRUNCATED: {dump['file_bytes']} of {dump['expected_bytes']} bytes; {size_label(gone)} of memory missing "
            f"({len(dump['missing'])} range(s) from {dump['missing'][0][0]}): the check is incomplete")
