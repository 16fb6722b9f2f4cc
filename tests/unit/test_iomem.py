"""System RAM from the iomem tree (inspect_vmemmap/source/iomem.py) on a synthetic tree
laid out as the kernel does it: ``struct resource`` as in include/linux/ioport.h, the
flags each registrar sets (arch/arm64/kernel/setup.c request_standard_resources() for
boot RAM and its "Kernel code" child, drivers/virtio/virtio_mem.c
virtio_mem_create_resource() for the device's region, mm/memory_hotplug.c
register_memory_resource() for what add_memory_driver_managed() adds inside it). The
tree is the one an arm64 6.12 guest with a plugged virtio-mem device printed in
/proc/iomem (lab account)."""

from __future__ import annotations

from inspect_vmemmap.source.iomem import system_ram
from tests.synthmem import SyntheticMemory

MEM, SYSRAM, BUSY, EXCLUSIVE, DRIVER_MANAGED = 0x200, 0x01000000, 0x80000000, 0x08000000, 0x02000000
SYSTEM_RAM = MEM | SYSRAM
OFF = {"start": 0, "end": 8, "name": 16, "flags": 24, "desc": 32, "parent": 40, "sibling": 48, "child": 56}
BASE = 0xFFFF000010000000


class Types:
    def offsetof(self, t, m):
        assert t == "struct resource"
        return OFF[m]


class Tree:
    def __init__(self):
        self.mem = SyntheticMemory(virt_base=BASE)
        self.next = BASE + 0x1000
        self.root = self.node("iomem", 0, (1 << 64) - 1, MEM)

    def node(self, name, start, end, flags):
        addr, self.next = self.next, self.next + 0x100
        w = self.mem.write_u64
        w(addr + OFF["start"], start, False)
        w(addr + OFF["end"], end, False)
        self.mem.write(addr + 0x80, name.encode() + b"\0", False)
        w(addr + OFF["name"], addr + 0x80, False)
        w(addr + OFF["flags"], flags, False)
        return addr

    def children(self, parent, *kids):
        self.mem.write_u64(parent + OFF["child"], kids[0], False)
        for a, b in zip(kids, kids[1:]):
            self.mem.write_u64(a + OFF["sibling"], b, False)

    def ram(self):
        return system_ram(self.mem, Types(), lambda s: self.root if s == "iomem_resource" else None)


def _virtio_guest():
    t = Tree()
    uart = t.node("pl011@9000000", 0x09000000, 0x09000FFF, MEM | BUSY)
    pcie = t.node("pcie@10000000", 0x10000000, 0x3EFEFFFF, MEM)
    boot = t.node("System RAM", 0x40000000, 0x7FFFFFFF, SYSTEM_RAM | BUSY)
    code = t.node("Kernel code", 0x40210000, 0x4121FFFF, SYSTEM_RAM | BUSY)
    dev = t.node("virtio0", 0x80000000, 0xBFFFFFFF, SYSTEM_RAM | EXCLUSIVE)  # BUSY cleared by the driver
    added = t.node("System RAM (virtio_mem)", 0x80000000, 0xBFFFFFFF, SYSTEM_RAM | BUSY | DRIVER_MANAGED)
    t.children(t.root, uart, pcie, boot, dev)
    t.children(boot, code)
    t.children(dev, added)
    return t, dev, added


def test_driver_managed_ram_inside_its_devices_region_is_ram_and_the_region_itself_is_not():
    t, _, _ = _virtio_guest()
    got = t.ram()
    # boot RAM whole (its "Kernel code" child not again), then the plugged 1G: not virtio0
    assert got.ranges == ((0x40000000, 0x80000000), (0x80000000, 0xC0000000)) and got.unread == 0
    assert got.driver_managed == ((0x80000000, 0xC0000000),)  # hot-added by its driver, never boot RAM


def test_an_unplugged_device_region_holds_no_ram():
    t, dev, _ = _virtio_guest()
    t.mem.write_u64(dev + OFF["child"], 0, False)  # virtio_mem_bbm_offline_remove_and_unplug_bb() removed it
    assert t.ram().ranges == ((0x40000000, 0x80000000),)


def test_an_unreadable_subtree_is_counted_and_the_rest_read():
    t, dev, _ = _virtio_guest()
    t.mem.write_u64(dev + OFF["child"], 0xFFFF7000DEAD0000, False)  # nowhere
    got = t.ram()
    assert got.ranges == ((0x40000000, 0x80000000),) and got.unread == 1


def test_an_unreadable_top_level_reads_as_nothing():
    t, _, _ = _virtio_guest()
    t.mem.write_u64(t.root + OFF["child"], 0xFFFF7000DEAD0000, False)
    assert t.ram().ranges == () and t.ram().unread == 0


def test_a_top_level_system_ram_without_the_sysram_flag_still_counts():
    t = Tree()
    old = t.node("System RAM", 0x100000, 0x3FFFFFFF, MEM | BUSY)  # before IORESOURCE_SYSRAM (4.6)
    t.children(t.root, old)
    assert t.ram().ranges == ((0x100000, 0x40000000),)


def test_a_cycle_ends():
    t, dev, added = _virtio_guest()
    t.mem.write_u64(added + OFF["sibling"], dev, False)
    assert t.ram().ranges == ((0x40000000, 0x80000000), (0x80000000, 0xC0000000))


def test_arm64_nomap_memory_is_its_top_level_reserved_resources():
    """The tree a Debian 6.12 arm64 guest booted through edk2 printed: the variable flash at
    64M is memblock nomap memory, which request_standard_resources() (arch/arm64/kernel/
    setup.c) names "reserved" with IORESOURCE_MEM alone; a "reserved" child of System RAM
    (a memblock reservation, reserve_region_with_split()) and a busy "reserved" are not."""
    t = Tree()
    flash = t.node("reserved", 0x04000000, 0x07FFFFFF, MEM)
    uart = t.node("ARMH0011:00", 0x09000000, 0x09000FFF, MEM)
    boot = t.node("System RAM", 0x40000000, 0x7C17FFFF, SYSTEM_RAM | BUSY)
    rt = t.node("reserved", 0x7C180000, 0x7C18FFFF, MEM)
    busy = t.node("reserved", 0x7C190000, 0x7C19FFFF, MEM | BUSY)
    child = t.node("reserved", 0x40000000, 0x40FFFFFF, MEM | BUSY)
    t.children(t.root, flash, uart, boot, rt, busy)
    t.children(boot, child)
    got = system_ram(t.mem, Types(), lambda s: t.root if s == "iomem_resource" else None, "reserved")
    assert got.ranges == ((0x40000000, 0x7C180000),)
    assert got.nomap == ((0x04000000, 0x08000000), (0x7C180000, 0x7C190000))
    # an architecture that names no nomap memory (x86_64: "reserved" is e820's, not memblock's)
    assert t.ram().nomap == ()
