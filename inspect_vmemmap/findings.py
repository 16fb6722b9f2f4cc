"""The one finding vocabulary (docs/CONTRACT.md, "Finding kinds")."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

#: kind -> default severity, as the contract fixes them
KINDS: Dict[str, str] = {
    "memmap-unmapped": "error",
    "mem-map-mismatch": "error",
    "section-flags": "error",
    "bad-entry": "error",
    "backing-outside-ram": "error",
    "backing-free": "error",
    "alias": "error",
    "hvo-inconsistent": "error",
    "stray-mapping": "warning",
    "offnode-memmap": "warning",
    "unreadable": "warning",
    # additions to CONTRACT.md
    "page-node-zone": "error",
    # vmemmap not backed by the memory the kernel's rules place it on: a memmap_on_memory
    # block's own first pages, a device's altmap, a ZONE_DEVICE compound page's shared tail page
    "backing-misplaced": "error",
    # a running kernel changed what a finding was about while it was read (commands.confirmed_check)
    "race": "warning",
    # vmemmap whose permissions, every page-table level applied, are not the kernel's:
    # user-accessible, executable, or read-only through a table entry (HVO makes PTEs
    # read-only, never a table entry)
    "permissions": "error",
    # a section flag the kernel cannot have set there: SECTION_TAINT_ZONE_DEVICE on a
    # section that is RAM throughout, where no device memory can ever have been
    "impossible-flag": "error",
    # struct pages that begin a vmemmap page and are copies of a head page outside an
    # optimized folio: a HugeTLB vmemmap restore that left the copied head (check.heads)
    "fake-head": "error",
}

class Finding:
    """One thing that is wrong or notable: what (``kind``), where, and why (``message``).
    ``severity`` None: the kind's own (:data:`KINDS`); give one only where it differs."""

    __slots__ = ("kind", "severity", "message", "section", "pfn_start", "pfn_end", "vaddr", "vaddr_end", "phys", "extra")

    def __init__(self, kind: str, severity: Optional[str], message: str, *, section: Optional[int] = None,
                 pfn_start: Optional[int] = None, pfn_end: Optional[int] = None, vaddr: Optional[int] = None,
                 vaddr_end: Optional[int] = None, phys: Optional[int] = None, **extra) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown finding kind {kind!r}")
        self.kind = kind
        self.severity = severity or KINDS[kind]
        self.message = message
        self.section = section
        self.pfn_start = pfn_start
        self.pfn_end = pfn_end
        self.vaddr = vaddr
        self.vaddr_end = vaddr_end
        self.phys = phys
        self.extra = extra

    def to_json(self) -> dict:
        d: dict = {"kind": self.kind, "severity": self.severity}
        if self.section is not None:
            d["section"] = self.section
        if self.pfn_start is not None:
            d["pfn_start"] = self.pfn_start
        if self.pfn_end is not None:
            d["pfn_end"] = self.pfn_end
        if self.vaddr is not None:
            d["vaddr"] = hex(self.vaddr)
        if self.vaddr_end is not None:
            d["vaddr_end"] = hex(self.vaddr_end)
        if self.phys is not None:
            d["phys"] = hex(self.phys)
        for k, v in self.extra.items():
            d[k] = hex(v) if isinstance(v, int) and k in ("entry", "table_phys") else v
        d["message"] = self.message
        return d

    def __repr__(self) -> str:
        return f"Finding({self.kind}, {self.severity}, {self.message!r})"


def summarize(findings: Iterable[Finding]) -> Dict[str, int]:
    c = {"errors": 0, "warnings": 0, "infos": 0}
    for f in findings:
        c[f.severity + "s"] += 1
    return c


def exit_status(findings: List[Finding]) -> int:
    """CONTRACT.md: 1 if any finding has severity error, else 0."""
    return 1 if any(f.severity == "error" for f in findings) else 0
