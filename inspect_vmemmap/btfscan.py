"""The kernel's BTF found without kallsyms (issue 15).

drgn finds ``__start_BTF`` through its kallsyms loader, which needs VMCOREINFO's
``SYMBOL(kallsyms_*)`` lines (v6.0+, kernel/vmcore_info.c) and a VMCOREINFO it can decode
strictly (one non-ASCII byte, or an OSRELEASE that names another kernel, and it gives
up). The BTF is in the kernel image all the same: include/asm-generic/vmlinux.lds.h puts
the ``.BTF`` output section (``__start_BTF`` .. ``__stop_BTF``) in the read-only data of
the image, after ``_stext``. This scans the image from ``SYMBOL(_stext)`` (which
VMCOREINFO has on every kernel the tool reads) for a BTF header (include/uapi/linux/btf.h
struct btf_header: magic 0xeB9F, version 1, hdr_len 24) and keeps the first candidate that
parses as a whole as BTF with the types the tool needs.
"""

from __future__ import annotations

import struct
from typing import Optional

from inspect_vmemmap.memory import FaultError

#: the header the kernel's BTF starts with: magic 0xeB9F (little-endian), version 1,
#: flags 0, hdr_len 24
_HEADER = struct.pack("<HBBI", 0xEB9F, 1, 0, 24)
#: how far past _stext the image is scanned (Debian kernels' images are under 64 MiB)
SCAN_BYTES = 256 << 20
CHUNK = 2 << 20


def find_btf(memory, stext: Optional[int], page_size: int = 4096, limit: int = SCAN_BYTES):
    """:return: a :class:`inspect_vmemmap.btf.Btf` found in the image after ``stext``,
    or None. Reads at most ``limit`` bytes; unreadable pages are skipped."""
    from inspect_vmemmap.btf import Btf, BtfError

    if not stext:
        return None
    start = stext & ~(page_size - 1)
    end = start + limit
    tail = b""
    at = start
    while at < end:
        try:
            chunk = memory.read(at, CHUNK)
            pages = [(at, chunk)]
        except (FaultError, ValueError, OverflowError):
            pages = []
            for p in range(at, at + CHUNK, page_size):
                try:
                    pages.append((p, memory.read(p, page_size)))
                except (FaultError, ValueError, OverflowError):
                    continue
        for base, data in pages:
            buf = tail + data
            off0 = base - len(tail)
            i = buf.find(_HEADER)
            while i >= 0:
                btf = _try(memory, off0 + i, Btf, BtfError)
                if btf is not None:
                    return btf
                i = buf.find(_HEADER, i + 1)
            tail = data[-(len(_HEADER) - 1):]
        at += CHUNK
    return None


def _try(memory, addr: int, Btf, BtfError):
    try:
        head = memory.read(addr, 24)
        _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack("<HBBIIIII", head)
        size = hdr_len + max(type_off + type_len, str_off + str_len)
        if not 24 < size < 1 << 28:
            return None
        btf = Btf.parse(memory.read(addr, size))
        # the kernel's own BTF, not a module's or a stray header: it has struct page
        btf.sizeof("struct page")
        return btf
    except (FaultError, BtfError, LookupError, ValueError, OverflowError, struct.error):
        return None
