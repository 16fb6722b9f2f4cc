"""Opening a kernel: the running one, a crash dump or a QEMU guest, as a :class:`Target`.

Data flows one way: the adapter opens a drgn program (:mod:`.drgn`), the dump file's own
headers say what it left out (:mod:`.dumpfile`), the layout is decided (:mod:`.decide`),
then the memory stack is built once (drgn's reads, and over them the dump's filter) and
the Target is made from all of it; nothing changes it afterwards.
"""

from __future__ import annotations

import os
from typing import Optional

from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.memory import Memory
from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo, parse_vmcoreinfo


class Target:
    """An opened kernel: where it came from, its layout, its memory, its type information
    and symbols. Plain data; the facts read from it are a :class:`.gather.Reading`."""

    def __init__(self, source: str, vmcoreinfo: VmcoreInfo, layout: KernelLayout, memory: Memory, types,
                 lookup, dump=None, program=None) -> None:
        #: "live", "vmcore" or "qemu"
        self.source = source
        self.vmcoreinfo = vmcoreinfo
        self.layout = layout
        self.memory = memory
        #: DWARF or BTF type information (one interface), or None
        self.types = types
        #: symbols and DWARF variables (:class:`inspect_vmemmap.arch.KernelLookup`)
        self.lookup = lookup
        #: a ``--core`` dump's :class:`~inspect_vmemmap.source.dumpfile.DumpFile`
        self.dump = dump
        #: the debugger's own handle (a drgn.Program), for callers that hold one
        self.program = program

    def symbol(self, name: str) -> Optional[int]:
        """:return: a symbol's address, or None."""
        return self.lookup.symbol(name)

    def to_json(self) -> dict:
        lay = self.layout
        return {
            "source": self.source,
            "kernel_release": lay.kernel_release,
            "arch": lay.arch,
            "page_size": lay.page_size,
            "pgtable_levels": lay.pgtable_levels,
            "vmemmap_base": hex(lay.vmemmap_base),
            "struct_page_size": lay.struct_page_size,
            "section_size_bits": lay.section_size_bits,
            "type_source": lay.type_source,
            # kdump-compressed or filtered dumps: format, dump level, what was left out
            **({"dump": self.dump.to_json()} if self.dump is not None and self.dump.worth_saying else {}),
        }


def open_target(core: Optional[str] = None, qemu: Optional[str] = None, vmlinux: Optional[str] = None,
                no_debuginfo: bool = False, vmcoreinfo: Optional[str] = None) -> Target:
    """Open the running kernel (neither ``core`` nor ``qemu``), a crash dump or a QEMU guest.

    :raises AnalysisError: with a one-line reason when the target cannot be analysed.
    """
    from inspect_vmemmap.source import drgn as adapter

    adapter.quiet()
    if core and qemu:
        raise AnalysisError("--core and --qemu are two different targets: give one")
    if core:
        if not os.path.exists(core):
            raise AnalysisError(f"{core}: no such file")
        if not os.access(core, os.R_OK):
            raise AnalysisError(f"{core}: not readable (permission denied)")
        if os.path.isdir(core):
            raise AnalysisError(f"{core}: is a directory, not a crash dump")
        note = None
        if vmcoreinfo:
            try:
                with open(vmcoreinfo, "rb") as f:
                    note = f.read()
            except OSError as e:
                raise AnalysisError(f"{vmcoreinfo}: {e.strerror}") from None
        prog, source = adapter.open_core(core, note), "vmcore"
    elif qemu:
        prog, source = adapter.open_qemu(qemu), "qemu"
    else:
        if os.geteuid() != 0:
            raise AnalysisError("reading the running kernel needs root (it reads /proc/kcore); "
                                "run as root or give --core/--qemu")
        if not os.path.exists("/proc/kcore"):
            raise AnalysisError("/proc/kcore does not exist (kernel built without CONFIG_PROC_KCORE)")
        prog, source = adapter.open_live(), "live"
    return target_from_program(prog, source, vmlinux, no_debuginfo, dump_path=core)


def reopened(t: Target) -> Target:
    """``t``, the running kernel, with its memory read through /proc/kcore opened again,
    its layout, types and symbols kept.

    fs/proc/kcore.c lists the segments it serves when it is opened, and rebuilds the list
    on the next open after memory was hot-added or removed (kcore_callback() on
    MEM_ONLINE/MEM_OFFLINE); drgn reads the list once, so an open /proc/kcore has no
    segment for memory added since. The kernel's layout, its BTF and its symbols do not
    change with hotplug: opening the whole target again parsed the BTF and kallsyms again,
    19 s of an emulated guest's watch after each hot-add.
    """
    from inspect_vmemmap.source import drgn as adapter

    prog = adapter.open_live()
    return Target(t.source, t.vmcoreinfo, t.layout, adapter.live_memory(prog), t.types, t.lookup, None, prog)


def target_from_program(prog, source: str, vmlinux: Optional[str] = None, no_debuginfo: bool = False,
                        dump_path: Optional[str] = None, load_debug_info: bool = True) -> Target:
    """A :class:`Target` over a drgn program that is already set to a Linux kernel (also
    a custom one: the fixture recorder uses this); ``dump_path`` is the dump file it
    reads, whose headers say which pages it left out; ``load_debug_info`` false uses
    only the debug info the program already has (inspect_vmemmap.analyze).

    :raises AnalysisError: with a one-line reason when the target cannot be analysed.
    """
    from inspect_vmemmap.source import drgn as adapter
    from inspect_vmemmap.source.decide import arch_for, decide_layout
    from inspect_vmemmap.source.dumpfile import describe, filtering_memory

    k = adapter.kernel(prog, source, vmlinux, no_debuginfo, load_debug_info)
    arch = arch_for(k.arch_name)
    info = VmcoreInfo(parse_vmcoreinfo(k.vmcoreinfo_text))
    types = k.types  # without DWARF: the BTF, or the BTF found in the image (issue 15)
    layout = decide_layout(arch, info, k.lookup, k.memory, types)
    dump = describe(dump_path, layout.page_size) if dump_path else None
    memory = filtering_memory(k.memory, dump, layout)
    return Target(source, info, layout, memory, types, k.lookup, dump, prog)
