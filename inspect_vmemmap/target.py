"""The drgn adapter: the only module that imports drgn.

It opens a target (the running kernel, a crash dump or a QEMU guest), decides the
kernel's :class:`~inspect_vmemmap.layout.KernelLayout` and hands the rest of the tool a
:class:`~inspect_vmemmap.memory.Memory` plus plain data (node spans, RAM ranges).

Layout decisions go from VMCOREINFO first (it is in every dump and every live kernel,
and it is what makedumpfile trusts) and use debug info only for what VMCOREINFO lacks.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, List, Optional, Tuple

from inspect_vmemmap.errors import AnalysisError
from inspect_vmemmap.errors import one_line as _one_line
from inspect_vmemmap.layout import (
    HISTORICAL_SECTION_FLAGS,
    HISTORICAL_SECTION_MAP_LAST_BIT,
    KernelLayout,
    flag_bits_from_enumerators,
)
from inspect_vmemmap.memory import FaultError, PhysRanges

# arch/x86/include/asm/page_64_types.h
_START_KERNEL_MAP = 0xFFFFFFFF80000000
# arch/arm64/include/asm/memory.h _PAGE_END(48): the end of the linear map, MODULES_VADDR
_ARM64_PAGE_END_48 = 0xFFFF800000000000


def parse_vmcoreinfo(text: str) -> Dict[str, str]:
    """``KEY=VALUE`` lines of a VMCOREINFO note.

    :return: key -> value string (``SYMBOL(x)`` and ``NUMBER(x)`` keys as written).
    """
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


class VmcoreInfo:
    """Typed access to VMCOREINFO values."""

    def __init__(self, entries: Dict[str, str]) -> None:
        self.entries = entries

    def get(self, key: str) -> Optional[str]:
        return self.entries.get(key)

    def _int(self, key: str, base: int) -> Optional[int]:
        v = self.entries.get(key)
        if not v:
            return None
        try:
            return int(v, base)
        except ValueError:
            raise AnalysisError(f"VMCOREINFO {key} has an impossible value {v[:40]!r}") from None

    def symbol(self, name: str) -> Optional[int]:
        return self._int(f"SYMBOL({name})", 16)

    def number(self, name: str) -> Optional[int]:
        return self._int(f"NUMBER({name})", 0)

    def size(self, name: str) -> Optional[int]:
        return self._int(f"SIZE({name})", 10)

    def length(self, name: str) -> Optional[int]:
        return self._int(f"LENGTH({name})", 10)

    def offset(self, name: str) -> Optional[int]:
        return self._int(f"OFFSET({name})", 10)


class DrgnMemory:
    """:class:`~inspect_vmemmap.memory.Memory` over a drgn program."""

    def __init__(self, prog) -> None:
        import drgn

        self._read = prog.read
        self._fault = drgn.FaultError

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        try:
            return self._read(address, size, physical)
        except self._fault as e:
            raise FaultError(address, physical, str(e)) from None
        except (ValueError, OverflowError) as e:
            raise FaultError(address, physical, str(e)) from None


class Target:
    """An opened kernel: its layout, memory and the plain facts the checks need."""

    def __init__(self, prog, source: str, vmcoreinfo: VmcoreInfo, has_dwarf: bool, btf=None) -> None:
        self.prog = prog
        self.source = source
        self.vmcoreinfo = vmcoreinfo
        self.has_dwarf = has_dwarf
        self.btf = btf
        self.memory = DrgnMemory(prog)
        self.layout = decide_layout(prog, vmcoreinfo, has_dwarf, self.memory, btf)
        self._nodes: Optional[List[Tuple[int, int, int]]] = None
        self._ram: Optional[PhysRanges] = None
        self._sysram: Optional[List[Tuple[int, int]]] = None
        self.dump = None  # a --core dump's inspect_vmemmap.dumpfile.DumpFile (dumpfile.attach_dump)

    def forget(self) -> None:
        """Drop the facts read so far (node spans, RAM), so that the next reader of a
        running kernel sees them as they are now."""
        self._nodes = None
        self._ram = None
        self._sysram = None

    # -- plain facts ---------------------------------------------------------------

    def node_spans(self) -> List[Tuple[int, int, int]]:
        """:return: ``[(nid, start_pfn, end_pfn)]`` of each online node (pglist_data spans)."""
        if self._nodes is None:
            self._nodes = _node_spans(self)
        return self._nodes

    def ram(self) -> PhysRanges:
        """:return: physical RAM ranges ("System RAM" in iomem, else the node spans)."""
        if self._ram is None:
            ranges = self._system_ram()
            if not ranges:
                shift = self.layout.page_shift
                ranges = [(s << shift, e << shift) for _, s, e in self.node_spans()]
            self._ram = PhysRanges(ranges)
        return self._ram

    def _system_ram(self) -> List[Tuple[int, int]]:
        from inspect_vmemmap import kstructs

        if self._sysram is None:
            types = _types(self)
            self._sysram = kstructs.system_ram(self.memory, types, _symbol(self)) if types is not None else []
        return self._sysram

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
    import logging

    import drgn

    # drgn logs its debug-info search to stderr; the tool says what matters in one line
    logging.getLogger("drgn").setLevel(logging.CRITICAL)
    if core and qemu:
        raise AnalysisError("--core and --qemu are two different targets: give one")
    prog = drgn.Program()
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
        prog = _open_core(core, note)
        source = "vmcore"
    elif qemu:
        try:
            prog.set_qemu_qmp(qemu)
        except Exception as e:
            raise AnalysisError(f"{qemu}: cannot attach to the QEMU guest through QMP ({_one_line(e)})") from None
        source = "qemu"
    else:
        if os.geteuid() != 0:
            raise AnalysisError("reading the running kernel needs root (it reads /proc/kcore); run as root or give --core/--qemu")
        if not os.path.exists("/proc/kcore"):
            raise AnalysisError("/proc/kcore does not exist (kernel built without CONFIG_PROC_KCORE)")
        try:
            prog.set_kernel()
        except PermissionError as e:
            raise AnalysisError(f"/proc/kcore: permission denied ({_one_line(e)}); kernel lockdown may forbid it") from None
        except Exception as e:
            raise AnalysisError(f"cannot open the running kernel: {_one_line(e)}") from None
        source = "live"
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise AnalysisError(f"{core or qemu}: not a Linux kernel core (no VMCOREINFO note)")
    t = target_from_program(prog, source, vmlinux, no_debuginfo)
    if core:
        from inspect_vmemmap.dumpfile import attach_dump

        attach_dump(t, core)  # the dump's format and what its filter left out
    return t


def _open_core(core: str, note: Optional[bytes]):
    """drgn on a crash dump; where the dump has no VMCOREINFO note (QEMU without
    ``-device vmcoreinfo``, raw images), the note text is taken from ``note`` or found in
    the dump's memory by its text."""
    import drgn

    def attempt(info: Optional[bytes]):
        prog = drgn.Program(vmcoreinfo=info) if info else drgn.Program()
        prog.set_core_dump(core)
        return prog

    try:
        prog = attempt(note)
        if prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
            return prog
        err = "no VMCOREINFO note"
    except Exception as e:  # drgn raises several kinds
        err = _one_line(e)
    if not note:
        found = find_vmcoreinfo_text(core)
        if found:
            try:
                prog = attempt(found)
                if prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
                    return prog
            except Exception as e:
                err = _one_line(e)
    raise AnalysisError(f"{core}: not a kernel crash dump drgn can open ({err})")


def find_vmcoreinfo_text(path: str) -> Optional[bytes]:
    """The kernel's VMCOREINFO text (kernel/vmcore_info.c ``vmcoreinfo_data``) found in
    a dump by its first lines, for dumps without the note.

    :return: the text, or None.
    """
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            at = m.find(b"OSRELEASE=")
            while at >= 0:
                end = m.find(b"\0", at, at + 65536)
                text = m[at:end if end >= 0 else at + 65536]
                if b"\nPAGESIZE=" in text and b"SYMBOL(" in text:
                    return bytes(text)
                at = m.find(b"OSRELEASE=", at + 1)
    except (OSError, ValueError):
        return None
    return None


def target_from_program(prog, source: str, vmlinux: Optional[str] = None, no_debuginfo: bool = False) -> Target:
    """A :class:`Target` over a drgn program that is already set to a Linux kernel
    (also a custom one: the fixture recorder uses this).

    :raises AnalysisError: with a one-line reason when the target cannot be analysed.
    """
    import drgn

    has_dwarf = False
    if not no_debuginfo:
        try:
            if vmlinux:
                if not os.path.exists(vmlinux):
                    raise AnalysisError(f"{vmlinux}: no such file")
                prog.load_debug_info([vmlinux], main=True)
            else:
                prog.load_debug_info(main=True)
        except drgn.MissingDebugInfoError:
            pass
        except AnalysisError:
            raise
        except Exception as e:
            raise AnalysisError(f"cannot load debug info: {_one_line(e)}") from None
        has_dwarf = _main_has_dwarf(prog)
        if vmlinux and not has_dwarf:
            raise AnalysisError(f"{vmlinux}: does not match this kernel (build IDs differ) or has no debug info")

    try:
        text = prog["VMCOREINFO"].string_().decode(errors="replace")
    except Exception:
        text = ""
    info = VmcoreInfo(parse_vmcoreinfo(text))
    btf = None if has_dwarf else load_btf(prog, source)
    return Target(prog, source, info, has_dwarf, btf)


def load_btf(prog, source: str):
    """The kernel's own BTF: /sys/kernel/btf/vmlinux live, else the .BTF data between
    ``__start_BTF`` and ``__stop_BTF`` in kernel memory, found through kallsyms
    (VMCOREINFO's kallsyms_* entries, v6.0+).

    :return: a :class:`inspect_vmemmap.btf.Btf`, or None where there is none.
    """
    from inspect_vmemmap.btf import Btf, BtfError

    try:
        from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms

        prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
    except Exception:
        pass
    try:
        if source == "live" and os.path.exists("/sys/kernel/btf/vmlinux"):
            with open("/sys/kernel/btf/vmlinux", "rb") as f:
                return Btf.parse(f.read())
        start = prog.symbol("__start_BTF").address
        size = prog.symbol("__stop_BTF").address - start
        if not 0 < size < 1 << 28:
            return None
        return Btf.parse(prog.read(start, size))
    except (BtfError, LookupError, ValueError, OSError, Exception):
        return None


def _main_has_dwarf(prog) -> bool:
    try:
        prog.type("struct mem_section")
        return True
    except LookupError:
        return False


# -- the layout decision -------------------------------------------------------------


def decide_layout(prog, info: VmcoreInfo, has_dwarf: bool, mem, btf=None) -> KernelLayout:
    """Every layout constant, from VMCOREINFO first and debug info second.

    :raises AnalysisError: for kernels out of scope (not SPARSEMEM_VMEMMAP, foreign arch).
    """
    import drgn

    arch = {drgn.Architecture.X86_64: "x86_64", drgn.Architecture.AARCH64: "aarch64"}.get(prog.platform.arch)
    if arch is None:
        raise AnalysisError(f"architecture {prog.platform.arch.name} is not supported (x86_64 and aarch64 only)")
    notes: Dict[str, str] = {}
    release = info.get("OSRELEASE") or ""
    page_size = int(info.get("PAGESIZE") or 4096)

    def sane(value, what: str, lo: int, hi: int, pow2: bool = False):
        """A VMCOREINFO value that later arithmetic divides or shifts by: in range or a
        one-line reason (a corrupt note, or not a kernel this tool knows)."""
        if value is not None and (not lo <= value <= hi or (pow2 and value & (value - 1))):
            raise AnalysisError(f"VMCOREINFO {what}={value} is impossible (expected {lo}..{hi}"
                                f"{', a power of two' if pow2 else ''})")
        return value

    def need(value, what: str):
        if value is None:
            raise AnalysisError(f"VMCOREINFO lacks {what}; is this a SPARSEMEM_VMEMMAP kernel?")
        return value

    mem_section = info.symbol("mem_section")
    nr_roots = info.length("mem_section")
    ms_size = info.size("mem_section")
    if mem_section is None and has_dwarf:
        try:
            obj = prog["mem_section"]
        except KeyError:
            raise AnalysisError("this kernel has no mem_section: it is not SPARSEMEM (FLATMEM is out of scope)") from None
        mem_section = obj.value_() if obj.type_.unaliased_kind() == drgn.TypeKind.POINTER else obj.address_
    need(mem_section, "SYMBOL(mem_section)")
    if has_dwarf:
        ms_type = prog.type("struct mem_section")
        ms_size = ms_size or ms_type.size
        extreme = prog["mem_section"].type_.unaliased_kind() == drgn.TypeKind.POINTER
        if not extreme and nr_roots is None:
            nr_roots = len(prog["mem_section"])
        usage_off = _offsetof(ms_type, "usage", 8)
        try:
            msu = prog.type("struct mem_section_usage")
            sub_off = _offsetof(msu, "subsection_map", 16)
        except LookupError:
            sub_off = 16
    else:
        # Static arrays live in the kernel image; SPARSEMEM_EXTREME roots are memblock
        # allocations in the direct map (mm/sparse.c sparse_index_alloc). arm64's linear
        # map lies below MODULES_VADDR, its kernel image above (asm/memory.h).
        extreme = mem_section < ((info.number("MODULES_VADDR") or _ARM64_PAGE_END_48) if arch == "aarch64" else _START_KERNEL_MAP)
        usage_off, sub_off = 8, 16
        if btf is not None:
            try:
                usage_off = btf.offsetof("struct mem_section", "usage")
                sub_off = btf.offsetof("struct mem_section_usage", "subsection_map")
            except (KeyError, Exception):
                notes["mem_section_usage"] = "assumed usage at offset 8, subsection_map at 16 (not in BTF)"
        else:
            notes["mem_section_usage"] = "assumed usage at offset 8, subsection_map at 16 (no type information)"
    need(ms_size, "SIZE(mem_section)")
    sane(ms_size, "SIZE(mem_section)", 8, 4096, pow2=True)
    need(nr_roots, "LENGTH(mem_section)")
    spr = page_size // ms_size if extreme else None
    section_size_bits = sane(need(info.number("SECTION_SIZE_BITS"), "NUMBER(SECTION_SIZE_BITS)"),
                             "NUMBER(SECTION_SIZE_BITS)", 16, 40)

    arm = _arm64_layout(info, page_size, notes) if arch == "aarch64" else None
    l5 = info.number("pgtable_l5_enabled")
    if l5 is None and has_dwarf and arm is None:
        for name in ("__pgtable_l5_enabled", "pgtable_l5_enabled"):
            try:
                l5 = int(prog[name].value_())
                break
            except (KeyError, TypeError):
                continue
    levels = 5 if l5 else 4
    max_phys = info.number("MAX_PHYSMEM_BITS") or (52 if levels == 5 else 46)
    if arm is not None:
        levels, max_phys = arm["pgtable_levels"], arm["max_physmem_bits"]
    if spr is None:
        nr_sections = 1 << (max_phys - section_size_bits)
        spr = nr_sections // nr_roots

    struct_page = info.size("page")
    if struct_page is None and has_dwarf:
        struct_page = prog.type("struct page").size
    need(struct_page, "SIZE(page)")
    sane(struct_page, "SIZE(page)", 32, 512)
    sane(max_phys, "NUMBER(MAX_PHYSMEM_BITS)", section_size_bits + 1, 57)

    # Section flag bits: the kernel's enum since v6.0 (ed7802dd48f7), #defines before.
    flags = None
    type_source = "vmcoreinfo"
    if has_dwarf:
        type_source = "dwarf"
        try:
            enum_t = prog["SECTION_MARKED_PRESENT_BIT"].type_
            flags = flag_bits_from_enumerators({e.name: e.value for e in enum_t.enumerators})
        except KeyError:
            flags = (dict(HISTORICAL_SECTION_FLAGS), HISTORICAL_SECTION_MAP_LAST_BIT)
            notes["section_flags"] = "pre-6.0 kernel: historical #define values"
    if flags is None and btf is not None:
        type_source = "btf"
        try:
            enums = btf.enumerators(containing="SECTION_MARKED_PRESENT_BIT")
        except Exception:
            enums = {}
        flags = flag_bits_from_enumerators(enums)
    if flags is None:
        flags = (dict(HISTORICAL_SECTION_FLAGS), HISTORICAL_SECTION_MAP_LAST_BIT)
        notes["section_flags"] = "assumed the v5.12-v6.x values P=0 M=1 O=2 E=3 D=4, last bit 5 (no type information)"

    # The vmemmap base: SYMBOL(vmemmap) since 6.12's generic vmcoreinfo, vmemmap_base
    # otherwise (x86 KASLR, arch/x86/mm/kaslr.c), else the coded mem_map of a valid section.
    vmemmap = info.symbol("vmemmap")
    if vmemmap is not None:
        notes["vmemmap_base"] = "VMCOREINFO SYMBOL(vmemmap)"
    elif arm is not None and arm["vmemmap"] is not None:
        vmemmap = arm["vmemmap"]
        notes["vmemmap_base"] = "VMEMMAP_START - (PHYS_OFFSET >> PAGE_SHIFT) * sizeof(struct page) (VMCOREINFO)"
    elif has_dwarf:
        try:
            vmemmap = int(prog["vmemmap_base"].value_())
            notes["vmemmap_base"] = "vmemmap_base (debug info)"
        except KeyError:
            pass
    else:
        # x86 KASLR's variable, through kallsyms (registered by load_btf when present)
        try:
            vmemmap = struct.unpack("<Q", mem.read(prog.symbol("vmemmap_base").address, 8))[0]
            notes["vmemmap_base"] = "vmemmap_base (kallsyms)"
        except (LookupError, FaultError):
            vmemmap = None

    root = None
    top = info.symbol("init_top_pgt")
    phys_base = info.number("phys_base")
    if arm is not None:
        root = arm["pgtable_root"]
    elif top is not None and phys_base is not None:
        root = top - _START_KERNEL_MAP + phys_base
    elif has_dwarf:
        try:
            from drgn.helpers.linux.mm import follow_phys

            # init_top_pgt is defined in assembly (head_64.S): a symbol without DWARF
            addr = prog.symbol("init_top_pgt").address
            root = int(follow_phys(prog["init_mm"].address_of_(), addr))
        except Exception:
            root = None
    need(root, "SYMBOL(swapper_pg_dir) and NUMBER(kimage_voffset)" if arm is not None
         else "SYMBOL(init_top_pgt) and NUMBER(phys_base)")

    layout = KernelLayout(
        arch=arch, page_size=page_size, pgtable_levels=levels, vmemmap_base=vmemmap or 0,
        struct_page_size=struct_page, section_size_bits=section_size_bits, max_physmem_bits=max_phys,
        section_flags=flags[0], section_map_last_bit=flags[1], mem_section_addr=mem_section,
        sparsemem_extreme=extreme, nr_section_roots=nr_roots, sections_per_root=spr,
        mem_section_size=ms_size, usage_offset=usage_off, subsection_map_offset=sub_off,
        pgtable_root=root, sme_mask=info.number("sme_mask") or 0, kernel_release=release,
        type_source=type_source, notes=notes,
        **({k: v for k, v in arm.items() if k not in ("pgtable_levels", "max_physmem_bits", "pgtable_root", "vmemmap")}
           if arm is not None else {}),
    )
    if vmemmap is None:
        layout.vmemmap_base = _vmemmap_from_sections(mem, layout)
        notes["vmemmap_base"] = "decoded from the first valid section's coded mem_map"
    return layout


def _arm64_layout(info: VmcoreInfo, page_size: int, notes: Dict[str, str]) -> dict:
    """arm64's paging and vmemmap region from its VMCOREINFO (arch/arm64/kernel/
    vmcore_info.c, crash_core.c before 6.5; the same entries in 6.1, 6.12 and 7.2).

    - VA bits at run time: ``vabits_actual`` = 64 - NUMBER(TCR_EL1_T1SZ); a 52-bit kernel
      (NUMBER(VA_BITS), the compile-time value) runs with 48 (47 with 16K pages) on a CPU
      without LPA2/LVA, folding its top level (asm/pgtable.h pgtable_l5_enabled() ...).
    - PA bits: NUMBER(MAX_PHYSMEM_BITS) = PHYS_MASK_SHIFT, 52 with 4K/16K pages only when
      TCR_EL1.DS (LPA2) is set (6.12+ asm/pgtable-prot.h ``lpa2_is_enabled() ? 52 : 48``).
    - The root: TTBR1 points at swapper_pg_dir (a kernel image address, so its physical
      address is SYMBOL(swapper_pg_dir) - kimage_voffset, asm/memory.h __kimg_to_phys),
      plus TTBR1_BADDR_4852_OFFSET for 64K pages with a 52-bit VA on 48-bit hardware.
    - The vmemmap region: VMEMMAP_START..VMEMMAP_END, except that with 52-bit VA on 48-bit
      hardware the struct pages of the unused bottom of the linear map
      (VMEMMAP_UNUSED_NPAGES, asm/pgtable.h 6.12+) are vmalloc space: the region starts
      at VMEMMAP_START + ((_PAGE_OFFSET(vabits_actual) - PAGE_OFFSET) >> PAGE_SHIFT) *
      sizeof(struct page).
    """
    from inspect_vmemmap.pgtable.arm64 import VALID_VA_BITS, Arm64Paging, ttbr1_root

    page_shift = page_size.bit_length() - 1
    kernel_va = info.number("VA_BITS")
    t1sz = info.number("TCR_EL1_T1SZ")
    if kernel_va is None:
        raise AnalysisError("VMCOREINFO lacks NUMBER(VA_BITS); is this an arm64 kernel?")
    if t1sz is not None:
        va_bits = 64 - t1sz
        notes["va_bits"] = f"64 - NUMBER(TCR_EL1_T1SZ) = {va_bits} (compile-time VA_BITS {kernel_va})"
    else:
        va_bits = kernel_va
        notes["va_bits"] = f"NUMBER(VA_BITS) = {kernel_va} (no NUMBER(TCR_EL1_T1SZ): a pre-5.9 kernel)"
    if va_bits not in VALID_VA_BITS.get(page_size, ()):
        raise AnalysisError(f"arm64 with {page_size // 1024}K pages and a {va_bits}-bit VA: not a valid configuration")
    pa_bits = info.number("MAX_PHYSMEM_BITS") or 48
    lpa2 = page_size != 65536 and pa_bits == 52
    try:
        fmt = Arm64Paging(page_size, va_bits, pa_bits, lpa2)
    except ValueError as e:
        raise AnalysisError(f"arm64 paging from VMCOREINFO: {e}") from None
    u64 = (1 << 64) - 1
    phys_offset = (info.number("PHYS_OFFSET") or 0) & u64
    voff = info.number("kimage_voffset")
    pgdir = info.symbol("swapper_pg_dir")
    root = None
    if voff is not None and pgdir is not None:
        root = ttbr1_root((pgdir - voff) & u64, page_size, kernel_va, va_bits)
    start = info.number("VMEMMAP_START")
    end = info.number("VMEMMAP_END")
    sps = info.size("page") or 64
    # asm/pgtable.h: vmemmap = (struct page *)VMEMMAP_START - (memstart_addr >> PAGE_SHIFT),
    # memstart_addr an s64 (6.12+ also give it as SYMBOL(vmemmap), which wins)
    vmemmap = None
    if start is not None and info.number("PHYS_OFFSET") is not None:
        memstart = phys_offset - (1 << 64 if phys_offset >> 63 else 0)
        vmemmap = (start - (memstart >> page_shift) * sps) & u64
    region_start = region_end = 0
    if start is not None and end is not None:
        # _PAGE_OFFSET(va) = -(1 << va); the linear map below _PAGE_OFFSET(vabits_actual)
        # has no memory, so neither have its struct pages
        unused = ((1 << kernel_va) - (1 << va_bits)) >> page_shift if va_bits < kernel_va else 0
        region_start, region_end = start + unused * sps, end
        if unused:
            notes["vmemmap_region"] = (f"VMEMMAP_START {start:#x} + {unused:#x} unused pages' struct pages "
                                       f"(a {kernel_va}-bit kernel on {va_bits}-bit hardware lends them to vmalloc)")
    return {
        "pgtable_levels": fmt.levels, "max_physmem_bits": pa_bits, "pgtable_root": root, "va_bits": va_bits,
        "kernel_va_bits": kernel_va, "lpa2": lpa2, "phys_offset": phys_offset, "kimage_voffset": (voff or 0) & u64,
        "vmemmap_region_start": region_start, "vmemmap_region_end": region_end, "vmemmap": vmemmap,
    }


def _offsetof(type_, member: str, default: int) -> int:
    import drgn

    try:
        return drgn.offsetof(type_, member)
    except (LookupError, ValueError):
        return default


def _vmemmap_from_sections(mem, layout: KernelLayout) -> int:
    from inspect_vmemmap.sections import read_sections

    for s in read_sections(mem, layout, read_usage=False):
        if s.valid:
            return s.coded_mem_map
    raise AnalysisError("cannot find the vmemmap base: no SYMBOL(vmemmap), no debug info and no valid section")


# -- the model's inputs ----------------------------------------------------------------


class DwarfTypes:
    """DWARF type information through drgn, with the interface of
    :class:`inspect_vmemmap.btf.Btf` that :mod:`inspect_vmemmap.kstructs` uses."""

    source = "dwarf"

    def __init__(self, prog) -> None:
        self.prog = prog

    def sizeof(self, name: str) -> int:
        import drgn

        return drgn.sizeof(self.prog.type(name))

    def offsetof(self, name: str, member: str) -> int:
        import drgn

        try:
            return drgn.offsetof(self.prog.type(name), member)
        except LookupError as e:
            raise KeyError(f"{name}.{member}") from e

    def member_size(self, name: str, member: str) -> int:
        try:
            import drgn

            return drgn.sizeof(self.prog.type(name).member(member).type)
        except LookupError as e:
            raise KeyError(f"{name}.{member}") from e

    def has_member(self, name: str, member: str) -> bool:
        try:
            self.prog.type(name).member(member)
            return True
        except LookupError:
            return False

    def enum_value(self, name: str) -> Optional[int]:
        try:
            return int(self.prog[name].value_())
        except (KeyError, TypeError, ValueError):
            return None


def _node_data(t: "Target") -> Tuple[Optional[int], Optional[int]]:
    """The address of ``node_data`` (the array of pglist_data pointers) and its length,
    MAX_NUMNODES: x86 VMCOREINFO has SYMBOL(node_data) and LENGTH(node_data); elsewhere
    (arm64: drivers/base/arch_numa.c) the symbol comes from the ELF symbols or kallsyms and
    the length from DWARF's array type, else from struct hstate's per-node free lists
    (``hugepage_freelists[MAX_NUMNODES]``, include/linux/hugetlb.h) in DWARF or BTF.

    :return: ``(address, length)``, either None where unknown.
    """
    info = t.vmcoreinfo
    addr, n = info.symbol("node_data"), info.length("node_data")
    if addr is not None and n is not None:
        return addr, n
    try:
        addr = t.prog.symbol("node_data").address
    except (LookupError, ValueError):
        return None, None
    if t.has_dwarf:
        try:
            n = len(t.prog["node_data"])
        except (KeyError, TypeError, ValueError):
            n = None
    if n is None:
        types = _types(t)
        try:
            n = types.member_size("struct hstate", "hugepage_freelists") // types.sizeof("struct list_head") \
                if types is not None else None
        except KeyError:
            n = None
    return addr, n


def _node_spans(t: Target) -> List[Tuple[int, int, int]]:
    """Node spans from node_data and node_online_map, by VMCOREINFO offsets (DWARF if needed)."""
    info = t.vmcoreinfo
    mem = t.memory
    node_data, n = _node_data(t)
    off_start = info.offset("pglist_data.node_start_pfn")
    off_span = info.offset("pglist_data.node_spanned_pages")
    online = info.symbol("node_online_map")
    spans: List[Tuple[int, int, int]] = []
    if None in (node_data, n, off_start, off_span):
        # CONFIG_NUMA=n: contig_page_data
        if t.has_dwarf:
            try:
                pg = t.prog["contig_page_data"]
                s = int(pg.node_start_pfn)
                return [(0, s, s + int(pg.node_spanned_pages))]
            except KeyError:
                pass
        return spans
    try:
        mask_words = (n + 63) // 64
        mask = 0
        if online is not None:
            for i, w in enumerate(struct.unpack(f"<{mask_words}Q", mem.read(online, mask_words * 8))):
                mask |= w << (64 * i)
        else:
            mask = (1 << n) - 1
        ptrs = struct.unpack(f"<{n}Q", mem.read(node_data, n * 8))
    except FaultError:
        return spans
    for nid in range(n):
        if not mask >> nid & 1 or not ptrs[nid]:
            continue
        try:
            start, = struct.unpack("<Q", mem.read(ptrs[nid] + off_start, 8))
            span, = struct.unpack("<Q", mem.read(ptrs[nid] + off_span, 8))
        except FaultError:
            continue
        spans.append((nid, start, start + span))
    return spans




# -- the model's inputs ----------------------------------------------------------------


def _types(t: "Target"):
    """:return: DWARF or BTF type information (one interface), or None."""
    if t.has_dwarf:
        return DwarfTypes(t.prog)
    return t.btf


def _symbol(t: "Target"):
    def symbol(name: str) -> Optional[int]:
        try:
            return t.prog.symbol(name).address
        except LookupError:
            return None

    return symbol


def gather_inputs(t: "Target", notes: Optional[List[str]] = None):
    """The reference model's inputs, read from sources independent of what is checked:
    iomem "System RAM", the firmware's e820 table, node spans, the HugeTLB pools, with
    DWARF or BTF type information (the same code for both).

    :param notes: receives a line for each input that could not be read (and was assumed).
    :return: :class:`inspect_vmemmap.model.Inputs`.
    """
    from inspect_vmemmap import kstructs
    from inspect_vmemmap.facts import Inputs

    notes = notes if notes is not None else []
    types = _types(t)
    symbol = _symbol(t)
    ram = t.ram()
    if not t._system_ram():
        notes.append("RAM ranges: node spans (iomem could not be read)")
    boot_ram = None
    folios: List = []
    shared_tails = False
    zone_list: List = []
    page_flags = None
    offline_blocks: List = []
    device_maps = hosted = mom_mode = pageblock_order = None
    if types is None:
        notes.append("no type information (no DWARF, no BTF): boot RAM, HugeTLB pools unknown; "
                     "HVO remaps will show as unexplained")
    else:
        boot_ram = kstructs.e820_ram(t.memory, types, symbol)
        if boot_ram is None:
            notes.append("boot RAM: no e820 table; all RAM treated as boot memory" if t.layout.arch == "x86_64"
                         else "boot RAM: no firmware RAM table read on arm64; all RAM treated as boot memory")
        zones = kstructs.ZoneSpans(t.memory, types, _node_pgdats(t))
        from inspect_vmemmap.vmemmap import NodeMap

        nid_of = NodeMap(t.node_spans()).nid

        try:
            folios = kstructs.hugetlb_folios(t.memory, types, symbol, t.layout, nid_of, zones.zone)
        except kstructs.PartialPools as e:
            folios = e.folios
            notes.append(f"HugeTLB pools could not all be read ({_one_line(e)}): {len(folios)} folios found")
        except (FaultError, KeyError) as e:
            notes.append(f"HugeTLB pools could not be read ({_one_line(e)})")
        shared_tails = types.has_member("struct zone", "vmemmap_tails")
        zone_list = [(nid, s, e, z) for s, e, z, nid in zones.spans]
        try:
            blocks = kstructs.memory_block_states(t.memory, types, symbol, t.layout)
        except FaultError as e:
            blocks = None
            notes.append(f"memory blocks could not be read ({_one_line(e)}): all memory treated as online")
        else:
            if blocks is None:
                notes.append("memory blocks: not read; all memory treated as online")
        if blocks is not None:
            offline_blocks = [(a, b) for a, b, online in blocks if not online]
        page_flags = _page_flags_layout(t, types)
        if page_flags is None:
            notes.append("page->flags layout unknown: struct pages' node and zone unchecked")
        try:
            device_maps = kstructs.device_pagemaps(t.memory, types, symbol, t.layout.max_physmem_bits)
        except (FaultError, KeyError, ValueError) as e:
            notes.append(f"ZONE_DEVICE page maps could not be read ({_one_line(e)}): device memory's sections "
                         "and vmemmap not predicted")
        try:
            hosted = kstructs.hosted_memory_blocks(t.memory, types, symbol, t.layout)
        except (FaultError, KeyError, ValueError) as e:
            notes.append(f"memory blocks' memmap_on_memory altmaps could not be read ({_one_line(e)}): "
                         "where their vmemmap lives is not predicted")
        mom_mode = kstructs.memmap_on_memory_mode(t.memory, types, symbol)
        pageblock_order = _pageblock_order(t, symbol)
    return Inputs(layout=t.layout, ram=ram.ranges, boot_ram=boot_ram, nodes=t.node_spans(), folios=folios,
                  hvo_shared_tails=shared_tails, offline_blocks=offline_blocks,
                  zones=zone_list if types is not None else [],
                  page_flags=page_flags if types is not None else None,
                  device_maps=device_maps, hosted_blocks=hosted, memmap_on_memory=mom_mode,
                  pageblock_order=pageblock_order)


def _pageblock_order(t: "Target", symbol) -> Optional[int]:
    """pageblock_order (include/linux/pageblock-flags.h): the variable where the kernel has
    one (CONFIG_HUGETLB_PAGE_SIZE_VARIABLE), else the PMD order capped by MAX_PAGE_ORDER
    (NR_PAGE_ORDERS - 1, VMCOREINFO LENGTH(zone.free_area)), which is what x86_64 and arm64
    define (HUGETLB_PAGE_ORDER / HPAGE_PMD_ORDER). 7.2 caps it by CONFIG_PAGE_BLOCK_MAX_ORDER
    instead, whose default (mm/Kconfig) is that same MAX_PAGE_ORDER: assumed. Only
    memmap_on_memory=force uses it."""
    addr = symbol("pageblock_order")
    if addr is not None:
        try:
            return struct.unpack("<I", t.memory.read(addr, 4))[0]
        except FaultError:
            pass
    orders = t.vmcoreinfo.length("zone.free_area")
    return min(t.layout.page_shift - 3, (orders or 11) - 1)


def _page_flags_layout(t: "Target", types) -> Optional[dict]:
    """page->flags node and zone fields, from MAX_NUMNODES (x86 VMCOREINFO
    LENGTH(node_data), else the length of struct hstate's per-node free lists) and
    MAX_NR_ZONES (enum zone_type's __MAX_NR_ZONES)."""
    from inspect_vmemmap.model import page_flags_layout

    zones = types.enum_value("__MAX_NR_ZONES")
    nodes = t.vmcoreinfo.length("node_data")
    if nodes is None:
        try:
            nodes = types.member_size("struct hstate", "hugepage_freelists") // types.sizeof("struct list_head")
        except KeyError:
            nodes = None
    if zones is None or nodes is None or (t.vmcoreinfo.offset("page.flags") or 0) != 0:
        return None
    return page_flags_layout(nodes, zones)


def _node_pgdats(t: "Target") -> List[Tuple[int, int]]:
    """(nid, address of pglist_data) of each node in node_spans()."""
    node_data, n = _node_data(t)
    if node_data is None or n is None:
        return []
    try:
        ptrs = struct.unpack(f"<{n}Q", t.memory.read(node_data, n * 8))
    except FaultError:
        return []
    return [(nid, ptrs[nid]) for nid, _, _ in t.node_spans() if nid < n and ptrs[nid]]


def buddy_checker(t: "Target"):
    """:return: pfn -> free in the buddy allocator (see kstructs.buddy_checker), or None."""
    from inspect_vmemmap import kstructs

    types = _types(t)
    # NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1 (VMCOREINFO LENGTH(zone.free_area)): 11 with 4K
    # pages, 12 with arm64's 16K (ARCH_FORCE_MAX_ORDER 11)
    orders = t.vmcoreinfo.length("zone.free_area")
    return None if types is None else kstructs.buddy_checker(t.memory, types, t.layout,
                                                            max_order=orders - 1 if orders else 10)
