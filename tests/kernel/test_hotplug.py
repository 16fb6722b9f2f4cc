"""Memory hotplug on real kernels: `check`, `sections` and `map` on hot-added pc-dimms,
with and without memory_hotplug.memmap_on_memory.

Each scenario boots once (module scope), hot-adds its DIMMs through QMP, waits for the
guest to online them (memhp_default_state=online; the guest prints its account again when
its memory blocks change), dumps it and keeps it running for one live check. Ground truth:
QEMU's placement of the DIMMs (query-memory-devices), the guest's own account (memory block
states, MemTotal, /proc/iomem) and drgn (its sparsemem helpers, follow_phys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from inspect_vmemmap.lab import GuestAccount, GuestSpec, boot_guest
from tests.kernel import independent as ind
from tests.kernel.conftest import Booted, errors

pytestmark = pytest.mark.kernel

SECTION = 128 << 20
STRUCT_PAGE = 64
PAGE = 4096

_HP = dict(mem="1G", maxmem="4G", slots=2)

#: name -> (spec, sizes hot-added in order)
SCENARIOS = {
    "6.12": (GuestSpec(debian="6.12", la57=False, **_HP), ("1G",)),
    "6.12-mom": (GuestSpec(debian="6.12", la57=False, memmap_on_memory=True, **_HP), ("1G",)),
    # 6.1 hosts the memmap on the memory only when the DIMM is one memory block
    # (mhp_supports_memmap_on_memory(size): size == memory_block_size_bytes()): the 1G DIMM
    # gets its memmap from boot memory, the 128M one from itself.
    "6.1-la57-mom": (GuestSpec(debian="6.1", la57=True, memmap_on_memory=True, **_HP), ("1G", "128M")),
    "7.2-mom": (GuestSpec(debian="7.2", memmap_on_memory=True, **_HP), ("1G",)),
    # memhp_default_state=offline: the blocks stay offline, their sections not SECTION_IS_ONLINE
    "6.12-offline": (GuestSpec(debian="6.12", la57=False, hotplug_online="offline", **_HP), ("1G",)),
}



@dataclass
class Hot:
    booted: Booted
    before: GuestAccount  # the account at boot

    @property
    def guest(self):
        return self.booted.guest

    @property
    def online(self) -> bool:
        return self.booted.spec.hotplug_online != "offline"

    @property
    def block_size(self) -> int:
        return self.guest.account.memory_block_size

    def self_hosted(self, dimm) -> bool:
        """Whether the kernel should put this DIMM's memmap on the DIMM itself."""
        spec = self.booted.spec
        return spec.memmap_on_memory and (spec.debian != "6.1" or dimm.size == self.block_size)

    def sections_of(self, dimm) -> range:
        return range(dimm.addr // SECTION, dimm.end // SECTION)

    def cli(self, *args: str, live: bool = False) -> tuple[int, dict]:
        b = self.booted
        tgt = ["--qemu", str(b.guest.qmp_socket)] if live else ["--core", str(b.core)]
        cmd = [sys.executable, "-m", "inspect_vmemmap", *args, *tgt, "--vmlinux", str(b.vmlinux), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert "Traceback" not in p.stderr, p.stderr
        assert p.returncode in (0, 1), f"{cmd} exited {p.returncode}: {p.stderr}"
        from tests.kernel.conftest import cli_json

        return p.returncode, cli_json(p.stdout, args[0])


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def hot(request, tmp_path_factory):
    name = request.param
    spec, sizes = SCENARIOS[name]
    work = tmp_path_factory.mktemp(f"hotplug-{name}")
    with boot_guest(spec, workdir=work) as guest:
        before = guest.account
        for size in sizes:
            guest.hotplug(size)
        core = guest.dump(work / "vmcore")
        try:
            yield Hot(Booted(name, spec, guest, core, guest.kernel.vmlinux), before)
        finally:
            try:
                os.unlink(core)
            except OSError:
                pass


def test_guest_account(hot):
    """QEMU placed the DIMMs above boot RAM; the guest onlined every block (or left it
    offline, as told) and counts the online ones in MemTotal."""
    acc, bs = hot.guest.account, hot.block_size
    assert bs and bs % SECTION == 0
    expected_kb = 0
    for dimm in hot.guest.dimms:
        assert dimm.addr >= 4 << 30 and dimm.addr % bs == 0
        blocks = range(dimm.addr // bs, dimm.end // bs)
        assert len(blocks) == dimm.size // bs
        assert all(hot.before.memory_blocks.get(b) is None for b in blocks)
        assert {acc.memory_blocks.get(b) for b in blocks} == {"online" if hot.online else "offline"}, \
            acc.memory_blocks
        assert any(s <= dimm.addr and dimm.end - 1 <= e for s, e in acc.iomem_ranges("System RAM")), acc.iomem
        # MemTotal grows by the DIMM, less the memmap it hosts (a 2M PMD per 128M block)
        memmap = dimm.size // PAGE * STRUCT_PAGE if hot.self_hosted(dimm) else 0
        if hot.online:
            expected_kb += (dimm.size - memmap) // 1024
    assert acc.mem_total_kb - hot.before.mem_total_kb == expected_kb
    assert set(hot.before.memory_blocks.items()) <= set(acc.memory_blocks.items())


def test_check_is_consistent(hot):
    rc, doc = hot.cli("check")
    assert doc["findings"] == []
    assert rc == 0
    hot_nrs = {nr for d in hot.guest.dimms for nr in hot.sections_of(d)}
    listed = {s["nr"] for s in doc["sections"]["list"]}
    assert hot_nrs <= listed


def test_hot_added_sections(hot):
    _, doc = hot.cli("sections")
    assert doc["findings"] == []
    by_nr = {s["nr"]: s for s in doc["sections"]["list"]}
    truth = ind.drgn_sections(hot.booted.prog())
    hot_nrs = set()
    for dimm in hot.guest.dimms:
        nrs = [s["nr"] for s in by_nr.values() if dimm.addr // PAGE <= s["start_pfn"] < dimm.end // PAGE]
        assert nrs == list(hot.sections_of(dimm))
        assert len(nrs) == dimm.size // SECTION
        for nr in nrs:
            s = by_nr[nr]
            assert set(s["flags"]) == {"present", "has_mem_map"} | ({"online"} if hot.online else set()), s
            assert s["state"] == ("PMO" if hot.online else "PM")
            # drgn decodes the same: online (or not), never early
            flags = set(truth[nr][0].split("|"))
            assert {"SECTION_MARKED_PRESENT", "SECTION_HAS_MEM_MAP"} <= flags
            assert ("SECTION_IS_ONLINE" in flags) == hot.online
            assert "SECTION_IS_EARLY" not in flags
            assert int(s["coded_mem_map"], 16) == truth[nr][1]
        hot_nrs.update(nrs)
    # boot memory is untouched: still early
    boot = [s for nr, s in by_nr.items() if nr not in hot_nrs and "present" in s["flags"]]
    assert boot and all("early" in s["flags"] for s in boot)
    assert doc["sections"]["early"] == len(boot)


def _phys_of(ranges, va):
    """Physical address backing vmemmap address ``va`` according to `map` ranges."""
    for r in ranges:
        start, end = int(r["start"], 16), int(r["end"], 16)
        if start <= va < end:
            if r["phys_stride"]:
                return int(r["phys_start"], 16) + (va - start)
            return int(r["phys_start"], 16) + (va - start) % r["page_size"]
    raise AssertionError(f"{va:#x} is not in any vmemmap range")


def test_hot_added_vmemmap_backing(hot):
    """With memmap_on_memory each memory block's memmap sits at the start of that block;
    without it, in boot memory (populated when the memory is added, online or not).
    `map` and drgn's follow_phys agree on it."""
    _, smap = hot.cli("sections")
    _, mdoc = hot.cli("map")
    assert mdoc["findings"] == []
    ranges = mdoc["vmemmap"]["ranges"]
    mem_map = {s["nr"]: int(s["mem_map"], 16) for s in smap["sections"]["list"]}
    prog = hot.booted.prog()
    bs = hot.block_size
    boot_ram = [(s, e + 1) for s, e in hot.before.iomem_ranges("System RAM")]
    memmap_per_block = bs // PAGE * STRUCT_PAGE
    for dimm in hot.guest.dimms:
        for nr in hot.sections_of(dimm):
            va = mem_map[nr]
            size = SECTION // PAGE * STRUCT_PAGE
            for off in (0, size - PAGE):  # first and last page of the section's memmap
                phys = _phys_of(ranges, va + off)
                assert phys == ind.follow(prog, va + off), (nr, hex(va + off))
                if hot.self_hosted(dimm):
                    block = nr * SECTION // bs * bs
                    assert block <= phys < block + memmap_per_block, (nr, hex(phys))
                else:
                    assert any(s <= phys < e for s, e in boot_ram), (nr, hex(phys))
            # the range holding this section's memmap names it
            r = [r for r in ranges if int(r["start"], 16) <= va < int(r["end"], 16)][0]
            assert r["holds"] == "memmap" and r["sections"][0] <= nr <= r["sections"][1]
            if hot.self_hosted(dimm):
                assert dimm.addr <= int(r["phys_start"], 16) < dimm.end


def test_check_live(hot):
    """The same through the running guest's QMP socket."""
    rc, doc = hot.cli("check", live=True)
    assert doc["findings"] == []
    assert rc == 0
    assert doc["target"]["source"] != "vmcore"


def _self_hosted_blocks(hot) -> list:
    """Start pfns of the memory blocks whose memmap the kernel must put on themselves."""
    bs = hot.block_size
    return [b * bs // PAGE for d in hot.guest.dimms if hot.self_hosted(d) for b in range(d.addr // bs, d.end // bs)]


def test_memmap_on_memory_prediction(hot, tmp_path):
    """The model's exact prediction for each memmap_on_memory block (`check --save-layout`,
    `model`): its memmap, a 2M PMD per 128M section, on the block's own first pages; the
    block reserves those 512 pages of a 128M block, by the rule of its kernel (6.1: what
    the population used, 6.12 and 7.2: memory_block_memmap_on_memory_pages()) and as the kernel's
    own record says (nr_vmemmap_pages, altmap->free). check finds it so."""
    layout = tmp_path / "layout.json"
    rc, doc = hot.cli("check", "--save-layout", str(layout))
    p = subprocess.run([sys.executable, "-m", "inspect_vmemmap", "model", str(layout), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    blocks = json.loads(p.stdout)["model"]["memmap_on_memory"]
    starts = _self_hosted_blocks(hot)
    assert [b["start_pfn"] for b in blocks] == starts
    _, smap = hot.cli("sections")
    mem_map = {s["nr"]: int(s["mem_map"], 16) for s in smap["sections"]["list"]}
    per_block = hot.block_size // PAGE * STRUCT_PAGE // PAGE  # 512 pages of struct pages
    for b in blocks:
        assert b["end_pfn"] - b["start_pfn"] == hot.block_size // PAGE
        assert b["reserved_pages"] == b["recorded_pages"] == b["used_pages"] == per_block
        va = mem_map[b["start_pfn"] * PAGE // SECTION]
        assert b["hosted"] == [[hex(va), hex(va + per_block * PAGE), hex(b["start_pfn"] * PAGE)]]
    assert doc["self_hosted"] == {"memory_blocks": len(starts), "device_maps": 0, "bytes": len(starts) * per_block * PAGE}


@pytest.mark.parametrize("hot", sorted(n for n, (spec, _) in SCENARIOS.items() if spec.memmap_on_memory),
                         indirect=True)
def test_memmap_elsewhere_is_found(hot):
    """A memmap_on_memory block's vmemmap PMD pointed at another hot-added section's memmap
    (RAM of the same zone, so its struct pages still say the right node and zone): exactly
    one backing-misplaced error, for that block's struct pages; the sharing it makes is not
    reported again as an alias."""
    starts = _self_hosted_blocks(hot)
    assert starts, f"{hot.booted.name}: memmap_on_memory, but no block has its memmap on itself"
    b = hot.booted
    prog = b.prog()
    base = ind.vmemmap_base(prog)
    pfn = starts[-1]
    va = base + pfn * STRUCT_PAGE
    hot_nrs = [nr for d in hot.guest.dimms for nr in hot.sections_of(d) if nr != pfn * PAGE // SECTION]
    other = ind.follow(prog, base + hot_nrs[0] * SECTION // PAGE * STRUCT_PAGE)
    addr, e = ind.entry_addr(prog, va, ind.levels(prog) - 2)
    assert ind.is_block(prog, e) and ind.leaf_phys(prog, e) == pfn * PAGE
    core = ind.ElfCore(str(b.core))
    try:
        core.write_u64(addr, ind.with_addr(prog, e, other))
        rc, doc = hot.cli("check")
    finally:
        core.restore()
    assert rc == 1
    f = errors(doc)
    assert [(x["kind"], x["section"], x["pfn_start"], x["pfn_end"], int(x["phys"], 16)) for x in f] == [
        ("backing-misplaced", pfn * PAGE // SECTION, pfn, pfn + SECTION // PAGE - 1, other)], f
    assert doc["self_hosted"]["memory_blocks"] == len(starts) - 1
