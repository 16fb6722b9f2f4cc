"""The lab's virtio-mem hotplug (arm64 guests): the device on QEMU's command line, its block
size, and what the lab refuses there. There is no real-kernel proof in the suite yet: the
arm64 watch chain (branch arm64watch, tests/kernel/test_watch_arm64.py) took 20 min a boot
and did not pass."""

from __future__ import annotations

import pytest

from inspect_vmemmap.lab import virtiomem
from inspect_vmemmap.lab.arch import ARCHES
from inspect_vmemmap.lab.boot import BootError, BootOptions, guest_spec
from inspect_vmemmap.lab.guest import GuestSpec, qemu_argv

M, G = 1 << 20, 1 << 30


def argv(spec: GuestSpec) -> list:
    return qemu_argv(spec, ARCHES[spec.arch], "qemu", "k", "i", "q.sock", "c.sock", "/w/console.log")


def test_block_size_divides_every_hotplug_size():
    assert virtiomem.block_size([G]) == G
    assert virtiomem.block_size([G, 512 * M]) == 512 * M
    assert virtiomem.block_size([384 * M]) == 128 * M
    assert virtiomem.block_size([G, G]) == G  # not 2G: each step plugs one block
    assert virtiomem.block_size([64 * M]) == virtiomem.MIN_BLOCK  # at least a memory block
    assert virtiomem.block_size([]) == virtiomem.MIN_BLOCK


def test_arm64_hotplug_is_one_virtio_mem_device_of_all_the_room():
    spec = guest_spec(BootOptions(debian="6.12", arch="aarch64", mem="1G", in_guest=True, watch=True,
                                  then=("hotplug=1G", "unplug")), "aarch64")
    assert (spec.maxmem, spec.hotplug_block, spec.memmap_on_memory) == ("2G", G, False)
    a = argv(spec)
    assert f"memory-backend-ram,id={virtiomem.MEMDEV_ID},size={G}" in a
    assert (f"virtio-mem-pci,id={virtiomem.DEVICE_ID},memdev={virtiomem.MEMDEV_ID},requested-size=0,"
            f"block-size={G}") in a
    # two steps of 1G and 512M: 1.5G of room in 512M blocks
    spec = guest_spec(BootOptions(debian="6.12", arch="aarch64", mem="1G", in_guest=True, watch=True,
                                  then=("hotplug=1G", "hotplug=512M")), "aarch64")
    assert any(x.endswith(f"block-size={512 * M}") for x in argv(spec))
    assert f"memory-backend-ram,id={virtiomem.MEMDEV_ID},size={1536 * M}" in argv(spec)


def test_no_virtio_mem_without_hotplug_nor_on_x86_64():
    plain = argv(GuestSpec(debian="6.12", arch="aarch64", mem="1G"))
    assert not any("virtio-mem" in x for x in plain) and "-bios" not in plain
    x86 = argv(guest_spec(BootOptions(debian="6.12", then=("hotplug=1G",), in_guest=True, watch=True), "x86_64"))
    assert not any("virtio-mem" in x for x in x86)


def test_memmap_on_memory_is_refused_where_hotplug_is_virtio_mem():
    with pytest.raises(BootError, match=r"^--memmap-on-memory: aarch64 guests hot-add through virtio-mem .*"
                                        r"no MHP_MEMMAP_ON_MEMORY\)$"):
        guest_spec(BootOptions(debian="6.12", arch="aarch64", memmap_on_memory=True, in_guest=True, watch=True,
                               then=("hotplug=1G",)), "aarch64")


def test_a_region_that_is_not_whole_blocks_is_refused():
    with pytest.raises(Exception, match="not a whole number of 1024M blocks"):
        virtiomem.qemu_args(1536 * M, G)
