"""`watch` (eBPF) in an arm64 guest: Debian 6.12 arm64 (4K pages), `boot --arch aarch64
--in-guest --watch --then hotplug=1G --then unplug --then devdax=512M`, one boot: the hotplug
and the device paths.

arm64 has no HVO in Debian's kernels (no hugetlb_vmemmap* symbols), so its chain is
hotplug. A pc-dimm cannot be used there: Debian's arm64 kernels have no
CONFIG_ACPI_HOTPLUG_MEMORY (drivers/acpi/acpi_memhotplug.c), so the guest never sees one.
The lab hot-adds through virtio-mem instead (lab/virtiomem.py): one virtio-mem-pci device
from boot, 1G device blocks (Big Block Mode), so the 1G is one add_memory_driver_managed()
and its removal one try_remove_memory(), as a 1G pc-dimm's are on x86_64. virtio-mem never
hosts the memmap on its memory, so there is no memmap_on_memory scenario here (boot refuses
--memmap-on-memory for arm64; tests/unit/test_virtiomem.py).

Truth from outside the code under test: the guest's own sysfs memory blocks after each step,
and QEMU's account of the device (query-memory-devices: where it put the device's memory,
and the lab waited until QEMU's plugged size equalled the requested size). arm64 4K: a
section and a memory block are 128M (arch/arm64/include/asm/sparsemem.h SECTION_SIZE_BITS
27; the guest's block_size_bytes is checked).
"""

from __future__ import annotations

import json

import pytest

from tests.kernel.test_watch import BLOCK_PAGES, SECTION_PAGES, blocks_of, by_kind, devdax_checked, hotplug_steps, \
    pfns_of, watch_boot, within

pytestmark = pytest.mark.kernel

#: --timeout: each request to the in-guest watch may take this long (the whole boot took 3 min here
#: under TCG; before arm64 guests ran with pauth-impdef=on, 20 min, bpftrace attaching for minutes)
CHAIN = ["--arch", "aarch64", "--mem", "1G", "--timeout", "1200", "--then", "hotplug=1G", "--then", "unplug",
         "--then", "devdax=512M"]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    doc, err = watch_boot("6.12", CHAIN)
    (tmp_path_factory.mktemp("watch-arm64") / "boot.json").write_text(json.dumps(doc, indent=1))  # to read after a failure
    return doc, err


def test_every_change_once_with_a_clean_recheck(watched):
    doc, _ = watched
    assert doc["target"]["arch"] == "aarch64"
    assert doc["guest"]["memory_block_size"] == BLOCK_PAGES << 12
    steps = doc["guest"]["steps"]
    assert [s["step"] for s in steps] == ["hotplug=1G", "unplug", "devdax=512M"]
    assert all("short" not in s for s in steps), [s.get("short") for s in steps]
    for e in doc["watch"]["events"]:
        assert e["check"]["errors"] == 0 and e["check"]["warnings"] == 0, e
    assert doc["summary"]["errors"] == 0 and doc["summary"]["warnings"] == 0
    end = doc["watch"]["end"]
    assert end["lost"] == 0 and end["unpaired"] == 0
    (plug, before), (unplug, after_plug) = hotplug_steps(doc)
    offlined = set(after_plug["memory_blocks"]) - set(unplug["memory_blocks"])  # the guest's sysfs
    assert len(offlined) == 8
    # no HVO on arm64: nothing but the hot-add, each block offlined, the removal, and the
    # device-dax's add and memmap init
    assert end["by_kind"] == {"section-add": 2, "offline": len(offlined), "section-remove": 1, "device-memmap": 1}
    assert sum(end["by_kind"].values()) == len([e for e in doc["watch"]["events"] if e["kind"] != "periodic"])


def test_hot_add_is_the_plugged_range_covering_its_eight_sections(watched):
    doc, _ = watched
    (s, _), (removed, _) = hotplug_steps(doc)
    # the hot-add is the chain's first step: the guest as it booted is the guest after the removal
    # (test_unplug_... proves that the removal took exactly the added blocks away)
    prev = removed
    dimm = s["dimm"]
    assert dimm["device"] == "virtio-mem" and dimm["size"] == 1 << 30 and s["memmap_on_memory"] is False
    (add,) = [e for e in by_kind(doc, "section-add") if within(e, dimm)]
    assert within(add, dimm) and (add["pfn_start"], add["pfn_end"]) == pfns_of(dimm)  # where QEMU put it
    assert add["sections"][1] - add["sections"][0] + 1 == 8 == dimm["size"] // (SECTION_PAGES << 12)
    assert add["sections"][0] == pfns_of(dimm)[0] // SECTION_PAGES
    new_blocks = set(s["memory_blocks"]) - set(prev["memory_blocks"])
    assert new_blocks == blocks_of(dimm) and all(s["memory_blocks"][b] == "online" for b in new_blocks)
    assert s["mem_total_kb"] - prev["mem_total_kb"] == (1 << 30) >> 10  # the guest's MemTotal grew by 1G
    after = add["check"]["after"]
    assert after["sections_present"] == after["sections_online"] == 8
    assert (after["memmap_on_memory_blocks"], after["memmap_on_memory_pages"]) == (0, 0)


def test_unplug_offlines_each_block_and_removes_the_range_once(watched):
    doc, _ = watched
    (plug, _), (s, prev) = hotplug_steps(doc)
    dimm = s["dimm"]
    assert dimm == plug["dimm"] and doc["guest"]["dimms"] == []
    blocks = blocks_of(dimm)
    assert blocks <= set(prev["memory_blocks"]) and not blocks & set(s["memory_blocks"])  # gone from sysfs
    assert prev["mem_total_kb"] - s["mem_total_kb"] == (1 << 30) >> 10  # the guest's MemTotal lost the 1G
    first, last = pfns_of(dimm)
    offline = by_kind(doc, "offline")
    assert all(within(e, dimm) for e in offline)
    assert sorted((e["pfn_start"] - first) // BLOCK_PAGES for e in offline) == list(range(len(blocks)))
    for e in offline:  # one offline_pages() per block, the whole block (no memmap on it)
        assert (e["pfn_end"] - e["pfn_start"] + 1, (e["pfn_start"] - first) % BLOCK_PAGES) == (BLOCK_PAGES, 0)
        assert e["check"]["after"]["sections_online"] == 0 and e["check"]["after"]["sections_present"] == 1
    (rm,) = by_kind(doc, "section-remove")
    assert (rm["pfn_start"], rm["pfn_end"]) == (first, last)
    assert rm["check"]["after"]["sections_present"] == 0


def test_device_dax_is_one_add_and_one_memmap_init_over_its_namespace(watched):
    """As on x86_64 (test_watch.py): an NVDIMM, raw since boot, made device-dax. QEMU's virt
    describes it in ACPI (NFIT) only, so this guest boots through edk2 with acpi=force."""
    doc, _ = watched
    assert "acpi=force" in doc["guest"]["cmdline"].split()
    devdax_checked(doc)


def test_probes_chosen_by_what_the_kernel_has(watched):
    doc, _ = watched
    probes = {p["function"]: p for p in doc["watch"]["probes"]}
    attached = {f for f, p in probes.items() if p["attached"]}
    assert {"add_memory_resource", "__remove_pages", "offline_pages", "vmemmap_populate"} <= attached
    # Debian 6.12 arm64 has no HVO: no hugetlb_vmemmap function is there to attach
    assert not {f for f in attached if "hugetlb_vmemmap" in f}
    assert all(p["why"] for p in probes.values() if not p["attached"])
