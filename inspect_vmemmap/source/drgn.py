"""The drgn adapter: the only module of the package that imports drgn.

It opens a program on the running kernel, a crash dump or a QEMU guest, loads debug info
(DWARF) or the kernel's own BTF, and hands the rest of the tool drgn-free interfaces:
a :class:`~inspect_vmemmap.memory.Memory` (:class:`DrgnMemory`), type information
(:class:`DwarfTypes`, with the interface of :class:`inspect_vmemmap.btf.Btf`) and a
:class:`~inspect_vmemmap.arch.KernelLookup` (:class:`DrgnLookup`).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional

import drgn

from inspect_vmemmap.arch import KernelLookup
from inspect_vmemmap.btf import Btf, BtfError
from inspect_vmemmap.errors import AnalysisError, one_line
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.source.vmcoreinfo import find_vmcoreinfo_text


class DrgnMemory:
    """:class:`~inspect_vmemmap.memory.Memory` over a drgn program."""

    def __init__(self, prog: drgn.Program) -> None:
        self._read = prog.read

    def read(self, address: int, size: int, physical: bool = False) -> bytes:
        try:
            return self._read(address, size, physical)
        except (drgn.FaultError, ValueError, OverflowError) as e:
            raise FaultError(address, physical, str(e)) from None


class DwarfTypes:
    """DWARF type information through drgn, with the interface of
    :class:`inspect_vmemmap.btf.Btf` that the readers of kernel structures use."""

    source = "dwarf"

    def __init__(self, prog: drgn.Program) -> None:
        self.prog = prog

    def sizeof(self, name: str) -> int:
        return drgn.sizeof(self.prog.type(name))

    def offsetof(self, name: str, member: str) -> int:
        try:
            return drgn.offsetof(self.prog.type(name), member)
        except LookupError as e:
            raise KeyError(f"{name}.{member}") from e

    def member_size(self, name: str, member: str) -> int:
        try:
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

    def enumerators(self, enum_name: Optional[str] = None, *, containing: Optional[str] = None) -> Dict[str, int]:
        """The enumerators of the enum that has ``containing`` (or is ``enum_name``).

        :raises KeyError: if there is no such enum.
        """
        try:
            t = self.prog[containing].type_ if containing else self.prog.type(
                enum_name if enum_name.startswith("enum ") else f"enum {enum_name}")
        except LookupError as e:
            raise KeyError(containing or enum_name) from e
        return {e.name: e.value for e in t.enumerators or ()}


class DrgnLookup(KernelLookup):
    """Symbols through drgn (ELF symbols, or kallsyms where :func:`load_btf` registered
    it), and variables from DWARF where it is loaded."""

    def __init__(self, prog: drgn.Program, has_dwarf: bool, symbols=None) -> None:
        self.prog = prog
        self.has_dwarf = has_dwarf
        #: a :class:`inspect_vmemmap.kcache.RecordedSymbols` to answer first, or None
        self.symbols = symbols

    def symbol(self, name: str) -> Optional[int]:
        if self.symbols is not None:
            return self.symbols(name)
        try:
            return self.prog.symbol(name).address
        except LookupError:
            return None

    def _object(self, name: str) -> Optional[drgn.Object]:
        if not self.has_dwarf:
            return None
        try:
            return self.prog[name]
        except KeyError:
            return None

    def value(self, name: str) -> Optional[int]:
        obj = self._object(name)
        try:
            return None if obj is None else int(obj.value_())
        except (TypeError, ValueError):
            return None

    def is_pointer(self, name: str) -> Optional[bool]:
        obj = self._object(name)
        return None if obj is None else obj.type_.unaliased_kind() == drgn.TypeKind.POINTER

    def length(self, name: str) -> Optional[int]:
        obj = self._object(name)
        try:
            return None if obj is None else len(obj)
        except (TypeError, ValueError):
            return None

    def address(self, name: str) -> Optional[int]:
        """:return: a variable's address (DWARF), or None."""
        obj = self._object(name)
        return None if obj is None else obj.address_

    def kernel_phys(self, address: int) -> Optional[int]:
        from drgn.helpers.linux.mm import follow_phys

        if not self.has_dwarf:
            return None
        try:
            return int(follow_phys(self.prog["init_mm"].address_of_(), address))
        except (drgn.FaultError, LookupError, ValueError):
            return None


@dataclass
class Kernel:
    """A drgn program set to a Linux kernel, with what was loaded for it."""

    prog: drgn.Program
    #: "live", "vmcore" or "qemu"
    source: str
    memory: DrgnMemory
    lookup: DrgnLookup
    #: DWARF or BTF type information, or None
    types: object
    vmcoreinfo_text: str
    #: drgn.Architecture's member name ("X86_64", "AARCH64", ...)
    arch_name: str


#: drgn's own plugins: its interactive commands (drgn.commands), which the tool does not use
#: and whose import costs a fourth of a second in every process that opens a program
DRGN_COMMAND_PLUGINS = "builtin_commands,crash_commands"


def quiet() -> None:
    """drgn logs its debug-info search to stderr; the tool says what matters in one line.
    drgn's command plugins are left unloaded unless the user chose plugins
    (DRGN_PLUGINS, DRGN_DISABLE_PLUGINS); other plugins load as ever."""
    logging.getLogger("drgn").setLevel(logging.CRITICAL)
    if "DRGN_PLUGINS" not in os.environ and "DRGN_DISABLE_PLUGINS" not in os.environ:
        os.environ["DRGN_DISABLE_PLUGINS"] = DRGN_COMMAND_PLUGINS


def open_core(core: str, note: Optional[bytes]) -> drgn.Program:
    """drgn on a crash dump; where the dump has no VMCOREINFO note (QEMU without
    ``-device vmcoreinfo``, raw images), the note text is taken from ``note`` or found in
    the dump's memory by its text.

    :raises AnalysisError: where drgn cannot open it as a kernel dump.
    """
    def attempt(info: Optional[bytes]) -> drgn.Program:
        prog = drgn.Program(vmcoreinfo=info) if info else drgn.Program()
        prog.set_core_dump(core)
        return prog

    try:
        prog = attempt(note)
        if prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
            return prog
        err = "no VMCOREINFO note"
    except Exception as e:  # drgn raises a plain Exception for libelf's errors (DRGN_ERROR_OTHER)
        err = one_line(e)
    if not note:
        found = find_vmcoreinfo_text(core)
        if found:
            try:
                prog = attempt(found)
                if prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
                    return prog
            except Exception as e:  # as above
                err = one_line(e)
    raise AnalysisError(f"{core}: not a kernel crash dump drgn can open ({err})")


def open_qemu(socket: str) -> drgn.Program:
    """drgn on a running QEMU guest through its QMP socket. A guest whose QEMU has no
    vmcoreinfo device (riscv virt cannot have one) gets the VMCOREINFO text found in its
    RAM, as a dump without the note does."""
    def attach() -> drgn.Program:
        prog = drgn.Program()
        try:
            prog.set_qemu_qmp(socket)
        except Exception as e:  # drgn's QMP client raises whatever the socket gives
            raise AnalysisError(f"{socket}: cannot attach to the QEMU guest through QMP ({one_line(e)})") from None
        return prog

    prog = attach()
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        from inspect_vmemmap.source.qemu import guest_ram
        from inspect_vmemmap.source.vmcoreinfo import find_vmcoreinfo_in_ram

        del prog  # QEMU serves one QMP client at a time: drgn's connection closes first
        gc.collect()
        ram = guest_ram(socket)
        prog = attach()
        read = prog.read

        def phys(address: int, size: int) -> bytes:
            try:
                return read(address, size, True)
            except drgn.FaultError as e:
                raise ValueError(str(e)) from None

        text = find_vmcoreinfo_in_ram(phys, ram)
        if text is not None:
            prog.set_linux_kernel_custom(text, True)
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise AnalysisError(f"{socket}: not a Linux kernel core (no VMCOREINFO note)")
    return prog


def open_live() -> drgn.Program:
    """drgn on the running kernel (/proc/kcore)."""
    prog = drgn.Program()
    try:
        prog.set_kernel()
    except PermissionError as e:
        raise AnalysisError(f"/proc/kcore: permission denied ({one_line(e)}); kernel lockdown may forbid it") from None
    except Exception as e:  # OSError and drgn's own errors: all end the same way
        raise AnalysisError(f"cannot open the running kernel: {one_line(e)}") from None
    return prog


def live_memory(prog: drgn.Program) -> DrgnMemory:
    """The memory of a program :func:`open_live` opened (its address space lent first, as
    :func:`kernel` does), for a :class:`~.target.Target` whose kernel was read before."""
    _lend_address_space(prog, "live")
    return DrgnMemory(prog)


def program_source(prog: drgn.Program) -> tuple:
    """What a drgn program the caller set up reads: ``("live", None)`` (/proc/kcore),
    ``("qemu", None)`` (a QEMU guest through QMP, live but not local) or ``("vmcore", path)``.

    :raises AnalysisError: for a program that is not a Linux kernel.
    """
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise AnalysisError("the drgn program is not a Linux kernel (set_kernel(), set_core_dump(PATH) "
                            "or set_qemu_qmp(SOCKET) first)")
    path = prog.core_dump_path
    if prog.flags & drgn.ProgramFlags.IS_LIVE:
        return ("live" if prog.flags & drgn.ProgramFlags.IS_LOCAL or path == "/proc/kcore" else "qemu"), None
    return "vmcore", path


def kernel(prog: drgn.Program, source: str, vmlinux: Optional[str] = None, no_debuginfo: bool = False,
           load_debug_info: bool = True) -> Kernel:
    """What the tool reads a kernel with, from a drgn program that is already set to a
    Linux kernel (also a custom one: the fixture recorder uses this): DWARF where it
    loads (``vmlinux``, or drgn's search), else the kernel's own BTF. With
    ``load_debug_info`` false (a program the user holds), only the debug info already
    loaded is used.

    :raises AnalysisError: with a one-line reason.
    """
    _lend_address_space(prog, source)
    has_dwarf = False
    if not no_debuginfo and not load_debug_info:
        has_dwarf = _main_has_dwarf(prog)
    elif not no_debuginfo:
        if vmlinux and not os.path.exists(vmlinux):
            raise AnalysisError(f"{vmlinux}: no such file")
        try:
            if vmlinux:
                prog.load_debug_info([vmlinux], main=True)
            else:
                prog.load_debug_info(main=True)
        except drgn.MissingDebugInfoError:
            pass
        except Exception as e:  # drgn's loader raises several kinds for broken files
            raise AnalysisError(f"cannot load debug info: {one_line(e)}") from None
        has_dwarf = _main_has_dwarf(prog)
        if vmlinux and not has_dwarf:
            raise AnalysisError(f"{vmlinux}: does not match this kernel (build IDs differ) or has no debug info")
    try:
        text = prog["VMCOREINFO"].string_().decode(errors="replace")
    except (LookupError, drgn.FaultError, ValueError):
        text = ""
    memory = DrgnMemory(prog)
    if has_dwarf:
        lookup, types = DrgnLookup(prog, True), DwarfTypes(prog)
    elif load_debug_info:  # our own program: what an earlier run on this build found is reused
        lookup, types = _recorded(prog, source, memory, text)
    else:
        lookup, types = DrgnLookup(prog, False), _btf_or_scan(prog, source, memory, text)
    return Kernel(prog, source, memory, lookup, types, text, prog.platform.arch.name)


def _btf_or_scan(prog: drgn.Program, source: str, memory: DrgnMemory, text: str) -> Optional[Btf]:
    """:func:`load_btf`, and where drgn's kallsyms loader failed (no SYMBOL(kallsyms_*),
    a byte it cannot decode), the BTF found by scanning the image (issue 15)."""
    btf = load_btf(prog, source)
    if btf is None:
        from inspect_vmemmap.btfscan import find_btf
        from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo, parse_vmcoreinfo

        btf = find_btf(memory, VmcoreInfo(parse_vmcoreinfo(text)).symbol("_stext"))
    return btf


def _recorded(prog: drgn.Program, source: str, memory: DrgnMemory, text: str):
    """Symbols and BTF answered from the record of an earlier run on this kernel build
    (:mod:`inspect_vmemmap.kcache`), kallsyms and the BTF loaded only for what it lacks;
    the record is written when the process ends. Without a build ID: loaded as ever."""
    import atexit

    from inspect_vmemmap import kcache
    from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo, parse_vmcoreinfo

    info = VmcoreInfo(parse_vmcoreinfo(text))
    record = kcache.KernelRecord.open(info.get("BUILD-ID"), info.get("OSRELEASE") or "")
    stext = info.symbol("_stext")
    if record is None or stext is None:
        return DrgnLookup(prog, False), _btf_or_scan(prog, source, memory, text)
    record.writable = source in ("live", "qemu")  # a dump reads records, never writes one
    atexit.register(record.save)
    kallsyms = []

    def lookup(name: str) -> Optional[int]:
        if not kallsyms:
            kallsyms.append(_register_kallsyms(prog))
        try:
            return prog.symbol(name).address
        except LookupError:
            if not kallsyms[0]:
                raise kcache.SymbolsUnavailable(name) from None
            return None

    symbols = kcache.RecordedSymbols(record, stext, lookup)
    types = kcache.recorded_types(record, lambda: _btf_or_scan(prog, source, memory, text))
    return DrgnLookup(prog, False, symbols), types


def _register_kallsyms(prog: drgn.Program) -> bool:
    """drgn's symbol finder over the kernel's kallsyms (VMCOREINFO's kallsyms_* entries,
    v6.0+), once. :return: whether it is there."""
    if "vmlinux_kallsyms" in prog.registered_symbol_finders():
        return True
    try:
        from drgn.helpers.linux.kallsyms import load_vmlinux_kallsyms

        prog.register_symbol_finder("vmlinux_kallsyms", load_vmlinux_kallsyms(prog), enable_index=0)
        return True
    except Exception:  # no kallsyms in VMCOREINFO, or unreadable: ELF symbols only
        return False


def _lend_address_space(prog: drgn.Program, source: str) -> None:
    """Where drgn cannot translate the kernel's virtual addresses (riscv64), give it
    memory segments that do, from the architecture's rules and VMCOREINFO, before
    anything reads kernel memory (debug info's module list, kallsyms, BTF, the layout).
    The VMCOREINFO object drgn makes is its note's text, not a memory read."""
    from inspect_vmemmap import arch as arches
    from inspect_vmemmap.source.vmcoreinfo import VmcoreInfo, parse_vmcoreinfo

    arch = arches.by_drgn_name(prog.platform.arch.name) if prog.platform is not None else None
    if arch is None:
        return
    try:
        text = prog["VMCOREINFO"].string_().decode(errors="replace")
    except (LookupError, drgn.FaultError, ValueError):
        return
    read = prog.read
    segments = arch.kernel_address_space(VmcoreInfo(parse_vmcoreinfo(text)), lambda a, n: read(a, n, True),
                                         static=source == "vmcore")
    for start, size, fn in segments:
        prog.add_memory_segment(start, size, lambda address, count, offset, physical, fn=fn: fn(address, count))


def load_btf(prog: drgn.Program, source: str) -> Optional[Btf]:
    """The kernel's own BTF: /sys/kernel/btf/vmlinux live, else the .BTF data between
    ``__start_BTF`` and ``__stop_BTF`` in kernel memory, found through kallsyms
    (VMCOREINFO's kallsyms_* entries, v6.0+).

    :return: a :class:`inspect_vmemmap.btf.Btf`, or None where there is none.
    """
    _register_kallsyms(prog)
    try:
        if source == "live" and os.path.exists("/sys/kernel/btf/vmlinux"):
            with open("/sys/kernel/btf/vmlinux", "rb") as f:
                return Btf.parse(f.read())
        start = prog.symbol("__start_BTF").address
        size = prog.symbol("__stop_BTF").address - start
        if not 0 < size < 1 << 28:
            return None
        return Btf.parse(prog.read(start, size))
    except (BtfError, LookupError, ValueError, OSError, drgn.FaultError):
        return None


def _main_has_dwarf(prog: drgn.Program) -> bool:
    try:
        prog.type("struct mem_section")
        return True
    except LookupError:
        return False
