"""Memory hotplug through virtio-mem, for guests whose kernel cannot take a pc-dimm.

A pc-dimm reaches the guest through ACPI: QEMU's GED device notifies the memory device
(PNP0C80) and the kernel's ACPI memory hotplug driver adds the memory
(drivers/acpi/acpi_memhotplug.c, built only with CONFIG_ACPI_HOTPLUG_MEMORY). Debian's
arm64 kernels do not build it (6.12.117 and 7.2.13: ``# CONFIG_ACPI_HOTPLUG_MEMORY is not
set``; their vmlinux has no acpi_memory_device_add), so there the PNP0C80 handler has no
attach and a hot-added pc-dimm is never seen, whatever the firmware. They have virtio-mem
(CONFIG_VIRTIO_MEM=m, drivers/virtio/virtio_mem.c), which QEMU 7.2's arm ``virt`` machine
plugs over PCI, with no ACPI and no firmware.

The lab gives such a guest one ``virtio-mem-pci`` device from boot, its backend as large
as all the hotplug it will be asked for, plugged size 0. A ``hotplug(SIZE)`` raises the
device's ``requested-size`` by SIZE; the guest's driver plugs device blocks from the
lowest address up and adds them through add_memory_driver_managed() (onlined by
memhp_default_state, as a pc-dimm's are). An unplug lowers it again; the driver takes back
offline big blocks first, newest first (virtio_mem_bbm_unplug_request()), offlines what is
still online and removes it (offline_and_remove_memory() -> try_remove_memory()).

The device block size is the largest power of two that divides every hotplug size (at
least a memory block): one of at least a memory block puts the driver in Big Block Mode
(virtio_mem_init(): sb_size >= memory_block_size_bytes()), where one block is one
add_memory_driver_managed() and one try_remove_memory(), as a pc-dimm of that size is.
virtio-mem never hosts the memmap on its memory (virtio_mem_add_memory() passes
MHP_MERGE_RESOURCE | MHP_NID_IS_MGID, no MHP_MEMMAP_ON_MEMORY).
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import LabError

DEVICE = "virtio-mem"
DEVICE_ID = "ivm-vmem0"
MEMDEV_ID = "ivm-vmem-mem0"
MODULE = "virtio_mem"
#: the least block size the lab gives the device: a memory block of the guests it boots
#: (arm64 4K: 128M, SECTION_SIZE_BITS 27; the guest's own block_size_bytes is checked at hotplug)
MIN_BLOCK = 128 << 20


def block_size(sizes: Iterable[int]) -> int:
    """The largest power of two dividing every size in ``sizes`` (bytes), at least MIN_BLOCK."""
    b = 0
    for s in sizes:
        b |= s
    if b <= 0:
        return MIN_BLOCK
    return max(MIN_BLOCK, b & -b)


def qemu_args(region: int, block: int) -> list[str]:
    """The device, plugged size 0, over a RAM backend of ``region`` bytes."""
    if region % block:
        raise LabError(f"virtio-mem: {region >> 20}M of hotplug is not a whole number of {block >> 20}M blocks")
    return ["-object", f"memory-backend-ram,id={MEMDEV_ID},size={region}",
            "-device", f"virtio-mem-pci,id={DEVICE_ID},memdev={MEMDEV_ID},requested-size=0,block-size={block}"]


def state(guest) -> dict:
    """QEMU's account of the device (query-memory-devices): memaddr, size (plugged),
    requested-size, block-size, max-size, node."""
    for d in guest.qmp("query-memory-devices"):
        data = d.get("data", {})
        if d.get("type") == "virtio-mem" and data.get("id") == DEVICE_ID:
            return data
    raise LabError(f"QEMU does not list {DEVICE_ID} (the guest was booted without hotplug room)")


def _request(guest, size: int) -> None:
    guest.qmp("qom-set", path=f"/machine/peripheral/{DEVICE_ID}", property="requested-size", value=size)


def plug(guest, nbytes: int, node: Any = None) -> tuple:
    """Raise the requested size by ``nbytes``; :return: ``(addr, size, node)``, the range it
    asks the guest to plug (the driver plugs from the device's lowest address up)."""
    st = state(guest)
    block = int(st["block-size"])
    if nbytes % block:
        raise LabError(f"hotplug size {nbytes >> 20}M is not a multiple of the virtio-mem block size ({block >> 20}M)")
    if node is not None and node != st.get("node"):
        raise LabError(f"hotplug on node {node}: the guest's virtio-mem device is on node {st.get('node')}")
    requested = int(st["requested-size"])
    if requested + nbytes > int(st["max-size"]):
        raise LabError(f"hotplug of {nbytes >> 20}M: the virtio-mem device has {(int(st['max-size']) - requested) >> 20}M left")
    _request(guest, requested + nbytes)
    return int(st["memaddr"]) + requested, nbytes, st.get("node")


def unplug_request(guest, dimm) -> None:
    """Lower the requested size by ``dimm``'s size (the last range plugged)."""
    st = state(guest)
    _request(guest, max(0, int(st["requested-size"]) - dimm.size))


def settled(guest) -> bool:
    """The guest's driver has done what was asked (plugged size == requested size)."""
    st = state(guest)
    return int(st["size"]) == int(st["requested-size"])
