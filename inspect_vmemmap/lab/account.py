"""The guest's own account of its memory, as printed on the console by /init."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import LabError
from .initramfs import MARK_ACCOUNT_BEGIN, MARK_ACCOUNT_END, MARK_SECTION, MARK_STATE, MARK_STATE_END


@dataclass
class GuestAccount:
    release: str = ""
    cmdline: str = ""
    mem_total_kb: int = 0
    hugepages_total: int = 0
    hugepages_free: int = 0
    hugepage_size_kb: int = 0
    meminfo: dict[str, int] = field(default_factory=dict)  # /proc/meminfo, values in kB (or counts)
    nodes: list[int] = field(default_factory=list)
    node_mem_total_kb: dict[int, int] = field(default_factory=dict)
    memory_block_size: int = 0  # bytes
    memory_blocks: dict[int, str] = field(default_factory=dict)  # block index -> state
    #: node -> its memory blocks (/sys/devices/system/node/nodeN/memoryM)
    node_memory_blocks: dict[int, list[int]] = field(default_factory=dict)
    iomem: list[tuple[int, int, str]] = field(default_factory=list)  # top-level /proc/iomem
    nr_hugepages: dict[int, int] = field(default_factory=dict)  # page size in kB -> count
    cpu_flags: list[str] = field(default_factory=list)
    #: /proc/sys/kernel/tainted (kernel/panic.c taint_flags: bit 5, "B", a bad page was
    #: found); None: not in the account
    tainted: int | None = None
    raw: str = ""

    @property
    def la57(self) -> bool:
        """True if the guest runs with 5-level paging (the kernel clears the la57 flag otherwise)."""
        return "la57" in self.cpu_flags

    @property
    def mmu(self) -> str:
        """/proc/cpuinfo's "mmu" of the first hart (riscv64: sv39, sv48 or sv57), or ''."""
        m = re.search(r"^@@ cpuinfo-mmu\nmmu\s*:\s*(\S+)", self.raw, re.M)
        return m.group(1) if m else ""

    def iomem_ranges(self, name: str) -> list[tuple[int, int]]:
        return [(s, e) for s, e, n in self.iomem if n == name]


def _meminfo_value(text: str) -> int:
    return int(text.split()[0])


def extract_account_text(console: str) -> str:
    """The text between the account markers (the last complete account on the console)."""
    lines = console.replace("\r", "").split("\n")
    try:
        end = max(i for i, line in enumerate(lines) if line.strip() == MARK_ACCOUNT_END)
        begin = max(i for i, line in enumerate(lines[:end]) if line.strip() == MARK_ACCOUNT_BEGIN)
    except ValueError:
        raise LabError("no guest account on the console") from None
    return "\n".join(lines[begin + 1 : end])


def parse_account(console: str) -> GuestAccount:
    """Parse the account printed by /init (``console`` may be the whole console log)."""
    text = extract_account_text(console)
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.split("\n"):
        if line.startswith(MARK_SECTION + " "):
            current = line[len(MARK_SECTION) + 1 :].strip()
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line.rstrip())

    acc = GuestAccount(raw=text)
    acc.release = (sections.get("uname-r") or [""])[0].strip()
    acc.cmdline = (sections.get("cmdline") or [""])[0].strip()

    for line in sections.get("meminfo", []):
        key, sep, value = line.partition(":")
        if sep and value.split():
            acc.meminfo[key.strip()] = _meminfo_value(value)
    acc.mem_total_kb = acc.meminfo.get("MemTotal", 0)
    acc.hugepages_total = acc.meminfo.get("HugePages_Total", 0)
    acc.hugepages_free = acc.meminfo.get("HugePages_Free", 0)
    acc.hugepage_size_kb = acc.meminfo.get("Hugepagesize", 0)

    taint = (sections.get("tainted") or [""])[0].strip()
    acc.tainted = int(taint) if taint.isdigit() else None
    flags = sections.get("cpuinfo-flags") or [""]
    acc.cpu_flags = flags[0].partition(":")[2].split()

    for line in sections.get("nodes", []):
        m = re.fullmatch(r"node(\d+)", line.strip())
        if m:
            acc.nodes.append(int(m.group(1)))
    acc.nodes.sort()
    for name, lines in sections.items():
        m = re.fullmatch(r"node-meminfo node(\d+)", name)
        if not m:
            continue
        for line in lines:
            mm = re.match(r"Node\s+\d+\s+MemTotal:\s+(\d+)", line)
            if mm:
                acc.node_mem_total_kb[int(m.group(1))] = int(mm.group(1))

    for name, lines in sections.items():
        m = re.fullmatch(r"node-memory-blocks node(\d+)", name)
        if m:
            acc.node_memory_blocks[int(m.group(1))] = sorted(
                int(mm.group(1)) for mm in (re.fullmatch(r"memory(\d+)", x.strip()) for x in lines) if mm)
    # the first line of the form sysfs gives (a guest's own background output may fall between)
    bs = [l.strip() for l in sections.get("memory-block-size") or [] if re.fullmatch(r"[0-9a-fA-F]+", l.strip())]
    if bs:
        acc.memory_block_size = int(bs[0], 16)
    for line in sections.get("memory-blocks", []):
        m = re.fullmatch(r"memory(\d+)\s+(\S+)", line.strip())
        if m:
            acc.memory_blocks[int(m.group(1))] = m.group(2)

    for line in sections.get("iomem", []):
        m = re.fullmatch(r"([0-9a-fA-F]+)-([0-9a-fA-F]+)\s*:\s*(.*)", line.strip())
        if m:
            acc.iomem.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()))

    for line in sections.get("hugepages", []):
        m = re.fullmatch(r"hugepages-(\d+)kB\s+(\d+)", line.strip())
        if m:
            acc.nr_hugepages[int(m.group(1))] = int(m.group(2))
    return acc


@dataclass(frozen=True)
class GuestState:
    """One state line of the guest (initramfs._STATE_REPORTER): what its own sysfs and
    /proc said at one moment."""

    seq: int
    mem_total_kb: int
    memory_blocks: dict  # block index -> state ("online", "offline", ...)
    hugepages: dict  # page size in kB -> (nr_hugepages, free_hugepages)

    def blocks_text(self, blocks) -> str:
        """``memory32=online, memory33=absent, ...`` for ``blocks``, runs of one state merged."""
        runs: list = []
        for b in blocks:
            st = self.memory_blocks.get(b, "absent")
            if runs and runs[-1][2] == st and runs[-1][1] == b - 1:
                runs[-1][1] = b
            else:
                runs.append([b, b, st])
        return ", ".join(f"memory{a}{f'-{e}' if e != a else ''}={st}" for a, e, st in runs)


_STATE_RE = re.compile(rf"{MARK_STATE} (\d+) memtotal=(\d+) blocks:(.*) hugepages:(.*) {MARK_STATE_END}$")


def parse_state(text: str) -> GuestState | None:
    """The last whole state line in ``text`` (a line cut short or garbled is skipped:
    the guest writes a whole one again within seconds)."""
    for line in reversed(text.replace("\r", "").split("\n")):
        m = _STATE_RE.search(line.strip())
        if not m:
            continue
        blocks: dict = {}
        huge: dict = {}
        try:
            for tok in m.group(3).split():
                name, _, st = tok.partition("=")
                if not name.startswith("memory") or not st:
                    raise ValueError(tok)
                blocks[int(name[len("memory"):])] = st
            for tok in m.group(4).split():
                size, _, counts = tok.partition("=")
                n, _, free = counts.partition("/")
                huge[int(size.removesuffix("kB"))] = (int(n), int(free))
        except ValueError:
            continue
        return GuestState(int(m.group(1)), int(m.group(2)), blocks, huge)
    return None
