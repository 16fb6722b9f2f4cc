"""System RAM as the kernel itself finds it in the iomem resource tree (kernel/resource.c).
No drgn here.

The kernel's walkers (``walk_system_ram_range()``, ``walk_system_ram_res()``, through
``find_next_iomem_res()``) take every resource of the tree, at any depth, whose flags hold
``IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY``; a match is taken whole, so what lies inside it
("Kernel code", "Crash kernel") is not looked at again. Boot RAM is at the top of the tree,
but hot-added RAM is requested (``register_memory_resource()`` in mm/memory_hotplug.c,
``__request_region_locked()``) inside the deepest resource that covers it and is not
busy: a driver's own region. virtio-mem's ``virtio0`` (drivers/virtio/virtio_mem.c
``virtio_mem_create_resource()``) and dax/kmem's ``dax0.0`` (drivers/dax/kmem.c) carry
"System RAM (virtio_mem)" and "System RAM (kmem)" as children, and ``/proc/iomem`` shows
them indented. A reader of the top level only misses that RAM, and then takes its
sections for sections without RAM.

Such RAM is always hot-added: ``register_memory_resource()`` flags
IORESOURCE_SYSRAM_DRIVER_MANAGED on any resource not named "System RAM", and only
``add_memory_driver_managed()`` (mm/memory_hotplug.c) names it otherwise. Where the
firmware's RAM table is not read (arm64, riscv64), that is what tells hot-added RAM from
boot RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from inspect_vmemmap.memory import FaultError, Memory
from inspect_vmemmap.source.kstructs import _u64, read_cstring

# include/linux/ioport.h
IORESOURCE_MEM = 0x00000200
IORESOURCE_SYSRAM = 0x01000000
IORESOURCE_SYSRAM_DRIVER_MANAGED = 0x02000000
IORESOURCE_BUSY = 0x80000000
_RAM_FLAGS = IORESOURCE_MEM | IORESOURCE_SYSRAM | IORESOURCE_BUSY  # IORESOURCE_SYSTEM_RAM | IORESOURCE_BUSY

_MAX_RESOURCES = 100000  # a corrupt tree must end


@dataclass(frozen=True)
class SystemRam:
    """What the iomem tree says of System RAM."""

    #: physical ``[start, end)`` ranges, in the tree's order
    ranges: Tuple[Tuple[int, int], ...]
    #: resources below the top level whose subtree could not be read (RAM there is unknown)
    unread: int = 0
    #: the ranges among ``ranges`` flagged IORESOURCE_SYSRAM_DRIVER_MANAGED (hot-added by a driver)
    driver_managed: Tuple[Tuple[int, int], ...] = ()
    #: top-level resources of the architecture's nomap name (Arch.nomap_resource), flags
    #: IORESOURCE_MEM alone: boot memory kept out of the linear map, ``[start, end)``
    nomap: Tuple[Tuple[int, int], ...] = ()


def system_ram(mem: Memory, types, symbol: Callable[[str], Optional[int]],
               nomap_name: Optional[str] = None) -> SystemRam:
    """The System RAM resources of ``iomem_resource``'s tree, as the kernel's
    ``walk_system_ram_res()`` finds them (module docstring): boot and hot-added, driver
    managed included.

    A top-level resource named "System RAM" counts whatever its flags (a kernel before
    IORESOURCE_SYSRAM, commit 03cb525eb25c "resource: Handle resource flags IORESOURCE_SYSRAM"
    of 4.6, named RAM so only).

    ``nomap_name``: also the top-level resources of that name whose flags are
    IORESOURCE_MEM alone (arm64's "reserved": memblock nomap regions).

    :return: :class:`SystemRam`; no ranges if the top level cannot be read.
    """
    root = symbol("iomem_resource")
    if root is None:
        return SystemRam(())
    try:
        o_start, o_end, o_name, o_flags, o_sib, o_child = (
            types.offsetof("struct resource", m) for m in ("start", "end", "name", "flags", "sibling", "child"))
    except KeyError:  # a damaged type: iomem cannot be read
        return SystemRam(())
    out: List[Tuple[int, int]] = []
    managed: List[Tuple[int, int]] = []
    nomap: List[Tuple[int, int]] = []
    seen = set()
    unread = 0
    try:
        todo = [(_u64(mem, root + o_child), True)]  # (resource, at the top level), depth first
    except FaultError:
        return SystemRam(())
    while todo and len(seen) < _MAX_RESOURCES:
        res, top = todo.pop()
        if not res or res in seen:
            continue
        seen.add(res)
        try:
            flags = _u64(mem, res + o_flags)
            name_ptr = _u64(mem, res + o_name)
            flagged = (flags & _RAM_FLAGS) == _RAM_FLAGS
            # a top-level resource's name, where its flags do not say already (read once)
            name = read_cstring(mem, name_ptr, 16) if top and name_ptr and not flagged else None
            ram = flagged or name == "System RAM"
            if ram:
                out.append((_u64(mem, res + o_start), _u64(mem, res + o_end) + 1))
                if flags & IORESOURCE_SYSRAM_DRIVER_MANAGED:
                    managed.append(out[-1])
            elif nomap_name and flags == IORESOURCE_MEM and name == nomap_name:
                nomap.append((_u64(mem, res + o_start), _u64(mem, res + o_end) + 1))
            todo.append((_u64(mem, res + o_sib), top))
            if not ram:
                todo.append((_u64(mem, res + o_child), False))  # before the sibling: the tree's order
        except FaultError:
            if top:  # the top level itself: iomem cannot be read
                return SystemRam(())
            unread += 1
    return SystemRam(tuple(out), unread, tuple(managed), tuple(nomap))
