"""``inspect-vmemmap boot``: validate a kernel in a throwaway QEMU guest.

Boots a Debian kernel of the lab (``--debian``) or the user's own build (``--kernel``)
under the memory layout the options describe, waits for the guest, optionally hot-adds
pc-dimms and dumps it, then runs ``check`` against it: from the host through QMP, or
(``--in-guest``) inside the guest on its own /proc/kcore (:mod:`.inguest`). Prints the
same report and exit status as ``check``; ``--json`` adds a ``guest`` object with the
guest's own account of its memory.

Exit status: 0/1 as ``check``; 2 when it could not boot or analyse (one reason line on
stderr, then the guest's last console lines indented where there are any).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import click

from . import inguest
from . import modules as kmod
from .arch import ARCHES, arch_info
from .cache import require_tool
from .debian import SERIES
from .errors import LabError

EXIT_BAD_INPUT = 2
GIB = 1 << 30
#: memory a guest needs beside its hugepages (kernel, initramfs; the host's Python in-guest)
HEADROOM_MIB = 384
HEADROOM_IN_GUEST_MIB = 640
#: the host's Python starting over 9p under TCG, then check on /proc/kcore
IN_GUEST_CHECK_TIMEOUT = 300.0


class BootError(Exception):
    """A reason to give up before or after booting (bad options, unreadable files)."""


# --- options --------------------------------------------------------------------------------------


def click_options(f: Callable) -> Callable:
    """The ``boot`` command's options (cli.py applies them)."""
    opts = [
        click.option("--debian", metavar="SERIES", type=click.Choice(list(SERIES)),
                     help="Boot the lab's current Debian kernel of this series: "
                          + ", ".join(f"{k} ({v})" for k, v in SERIES.items()) + " (downloaded and cached)."),
        click.option("--kernel", "kernel_image", metavar="IMAGE", type=click.Path(dir_okay=False),
                     help="Boot your own kernel image (bzImage; arm64 Image)."),
        click.option("--vmlinux", type=click.Path(dir_okay=False),
                     help="Debug info for the check from outside (default: the Debian kernel's; for --kernel, BTF and kallsyms)."),
        click.option("--modules", "modules_dir", metavar="DIR", type=click.Path(file_okay=False),
                     help="lib/modules/<release> of --kernel, for what is not built in (qemu_fw_cfg, 9p, virtio)."),
        click.option("--arch", type=click.Choice(sorted(ARCHES)), default=None,
                     help="Guest architecture (default x86_64; for --kernel, the image's)."),
        click.option("--mem", metavar="SIZE", default=None,
                     help="Boot memory, QEMU syntax (default 1G, more when hugepages need it)."),
        click.option("--numa", metavar="N", type=click.IntRange(0, 64), default=0,
                     help="N NUMA nodes splitting the memory evenly, one CPU each."),
        click.option("--hugepages", metavar="N", type=click.IntRange(0), default=0,
                     help="N default-size (2M) HugeTLB pages reserved at boot."),
        click.option("--hugepages-1g", "hugepages_1g", metavar="N", type=click.IntRange(0), default=0,
                     help="N 1G HugeTLB pages reserved at boot (hugepagesz=1G hugepages=N)."),
        click.option("--hvo", is_flag=True, help="HugeTLB vmemmap optimisation (hugetlb_free_vmemmap=on)."),
        click.option("--la57/--no-la57", default=None,
                     help="x86_64: a CPU with (or without) 5-level paging (default: QEMU's max CPU, which has it)."),
        click.option("--sv57", "paging", flag_value="sv57", default=None,
                     help="riscv64: Sv57, 5-level paging (the kernel's choice on QEMU's rv64 CPU)."),
        click.option("--sv48", "paging", flag_value="sv48", help="riscv64: Sv48, 4-level paging (no5lvl)."),
        click.option("--sv39", "paging", flag_value="sv39", help="riscv64: Sv39, 3-level paging (no4lvl)."),
        click.option("--hotplug", metavar="SIZE", multiple=True,
                     help="After boot, hot-add a pc-dimm of SIZE and wait until the guest onlined it (repeatable)."),
        click.option("--memmap-on-memory", is_flag=True,
                     help="memory_hotplug.memmap_on_memory=1: hot-added memory hosts its own memmap."),
        click.option("--cmdline", metavar="TEXT", default="", help="Appended to the kernel command line."),
        click.option("--in-guest", is_flag=True,
                     help="Run check inside the guest on its /proc/kcore (the host's Python over a read-only 9p root)."),
        click.option("--watch", is_flag=True,
                     help="With --in-guest: run watch (eBPF) in the guest instead of check, while the host applies --then steps."),
        click.option("--then", "then", metavar="STEP", multiple=True,
                     help="With --watch, after boot, in order, each waited for: hugepages=N, hugepages-1g=N, "
                          "hotplug=SIZE (a pc-dimm, onlined), devdax=SIZE (an NVDIMM, raw from boot, made "
                          "device-dax: ZONE_DEVICE memory; x86_64, aarch64), unplug (the last hot-added one)."),
        click.option("--dump", metavar="PATH", type=click.Path(dir_okay=False),
                     help="Also write the guest's memory as an ELF vmcore (check --core PATH reads it)."),
        click.option("--dump-kdump", metavar="DIR", type=click.Path(file_okay=False),
                     help="Boot with crashkernel= and a kdump capture kernel loaded (kexec -p); after the check, "
                          "panic the guest (sysrq c) and let the capture kernel save its /proc/vmcore into DIR with "
                          "makedumpfile: elf-d0 (-E -d 0), kdump-d31 (-d 31 -e, compressed), elf-d31 (-E -d 31). "
                          "x86_64; needs kexec-tools and makedumpfile on the host."),
        click.option("--json", "as_json", is_flag=True,
                     help="check's JSON document plus a `guest` object: the guest's own account."),
        click.option("--no-debuginfo", is_flag=True, help="Check from outside without DWARF (VMCOREINFO, kallsyms, BTF)."),
        click.option("--deep", is_flag=True, help="Read every struct page's node and zone, not a sample per section."),
        click.option("--accel", type=click.Choice(["tcg", "kvm"]), default="tcg", show_default=True,
                     help="QEMU accelerator."),
        click.option("--timeout", metavar="SECONDS", type=click.FloatRange(1), default=None,
                     help="How long to wait for the guest to come up, for each hot-added DIMM to be onlined, and for "
                          "an in-guest check (default: scaled to the memory, hugepages, NUMA nodes and DIMMs asked for)."),
        click.option("--workdir", metavar="DIR", type=click.Path(file_okay=False),
                     help="Keep the guest's console.log, qemu.log and qemu.cmd here (default: a temporary directory)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click_options
def command(**kwargs) -> int:
    """Boot a kernel in a throwaway QEMU VM with the given memory layout and check its vmemmap.

    A Debian kernel of the lab (--debian, downloaded and cached) or your own build
    (--kernel, with --modules for what is not built in). After boot (and --hotplug,
    --dump) it runs `check` from the host through QMP, or with --in-guest inside the
    guest on its own /proc/kcore. Same report and exit status as `check`; --json adds
    the guest's own account (`guest`). Progress goes to stderr.
    """
    from inspect_vmemmap.report import stdout_console

    return main(kwargs, stdout_console)


@dataclass
class BootOptions:
    debian: Optional[str] = None
    kernel_image: Optional[str] = None
    vmlinux: Optional[str] = None
    modules_dir: Optional[str] = None
    arch: Optional[str] = None
    mem: Optional[str] = None
    numa: int = 0
    hugepages: int = 0
    hugepages_1g: int = 0
    hvo: bool = False
    la57: Optional[bool] = None
    paging: Optional[str] = None
    hotplug: tuple = ()
    memmap_on_memory: bool = False
    cmdline: str = ""
    in_guest: bool = False
    watch: bool = False
    then: tuple = ()
    dump: Optional[str] = None
    dump_kdump: Optional[str] = None
    as_json: bool = False
    no_debuginfo: bool = False
    deep: bool = False
    accel: str = "tcg"
    timeout: Optional[float] = None  # None: scaled to what is asked (guest.boot_deadline, hotplug_deadline)
    workdir: Optional[str] = None
    quiet: bool = False


# --- the user's own kernel ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalKernel:
    """A kernel the user built, in the shape :func:`~.guest.boot_guest` takes
    (``release``, ``boot_image``, ``suite``, ``ensure_modules``).

    ``modules_root`` is a ``lib/modules/<release>`` tree (``make modules_install``); its
    modules.dep is used when there is one, else one is built from the modules' .modinfo.
    Without it every module the lab asks for is taken to be built in.
    """

    release: str
    image: Path
    vmlinux: Optional[Path]
    modules_root: Optional[Path]
    scratch: Path  # decompressed modules go here
    arch: str
    suite: str = "trixie"  # for a foreign architecture's busybox-static
    series: str = ""
    _deps: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def boot_image(self) -> Path:
        return self.image

    @property
    def vmlinuz(self) -> Path:
        return self.image

    def modules_dep(self) -> kmod.ModulesDep:
        if "dep" not in self._deps:
            self._deps["dep"] = self._read_modules_dep()
        return self._deps["dep"]

    def _read_modules_dep(self) -> kmod.ModulesDep:
        root = self.modules_root
        if root is None:
            return {}
        dep = root / "modules.dep"
        if dep.is_file():
            return kmod.parse_modules_dep(dep.read_text())
        # no depmod run: the dependencies from each module's .modinfo (as the lab does for Debian)
        direct = {}
        for p in sorted(root.rglob("*.ko*")):
            rel = str(p.relative_to(root))
            if not kmod.is_module_path(rel):
                continue
            try:
                plain = kmod.decompress_module(p.read_bytes(), rel)
                direct[kmod.module_name(rel)] = (rel, kmod.module_depends(plain))
            except (LabError, OSError, ValueError):
                continue
        return kmod.parse_modules_dep(kmod.build_modules_dep(direct)) if direct else {}

    def builtin_modules(self) -> Optional[set]:
        f = self.modules_root / "modules.builtin" if self.modules_root else None
        return kmod.parse_modules_builtin(f.read_text()) if f and f.is_file() else None

    def ensure_modules(self, names, progress=None) -> list:
        deps = self.modules_dep()
        builtin = self.builtin_modules()
        names = [kmod.normalize_name(n) for n in names]
        if builtin is None:  # nothing says what is built in: whatever is not a module is
            builtin = {n for n in names if n not in deps}
        out = []
        for rel in kmod.resolve_modules(names, deps, builtin):
            src = Path(rel) if os.path.isabs(rel) else self.modules_root / rel
            if not src.exists() and src.with_name(kmod.uncompressed_path(src.name)).exists():
                src = src.with_name(kmod.uncompressed_path(src.name))  # decompressed in place
            dst = self.scratch / kmod.uncompressed_path(rel.lstrip("/"))
            if not dst.exists():
                try:
                    data = kmod.decompress_module(src.read_bytes(), rel)
                except OSError as e:
                    raise LabError(f"{src}: {e.strerror}") from None
                vermagic = (kmod.modinfo(data).get("vermagic") or [""])[0].split()
                if vermagic and vermagic[0] != self.release:
                    raise LabError(f"{src} is built for {vermagic[0]}, the kernel is {self.release}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
            out.append(dst)
        return out


def image_arch(head: bytes) -> Optional[str]:
    """The architecture of a kernel image from its boot header, or None."""
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":  # x86 boot protocol
        return "x86_64"
    if len(head) >= 0x40 and head[0x38:0x3C] == b"ARM\x64":  # arm64 Image header
        return "aarch64"
    if len(head) >= 8 and head[:2] == b"MZ" and head[4:8] == b"zimg":  # EFI zboot (arm64 vmlinuz)
        return "aarch64"
    if len(head) >= 0x40 and head[0x38:0x3C] == b"RSC\x05":  # riscv Image header (Documentation/arch/riscv/boot-image-header.rst)
        return "riscv64"
    return None


_BANNER_RE = re.compile(rb"Linux version (\S+) \(")


def image_release(image: Path, vmlinux: Optional[Path]) -> Optional[str]:
    """``uname -r`` of a kernel: the x86 boot header's kernel_version string, else the
    linux_banner in an uncompressed image or the vmlinux."""
    with open(image, "rb") as f:
        head = f.read(0x1000)
    if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
        ptr = int.from_bytes(head[0x20E:0x210], "little")
        with open(image, "rb") as f:
            f.seek(0x200 + ptr)
            text = f.read(256).split(b"\0", 1)[0]
        if text:
            return text.split()[0].decode(errors="replace")
    for path in (image, vmlinux):
        if path is None:
            continue
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                match = _BANNER_RE.search(m)
                if match:
                    return match.group(1).decode(errors="replace")
        except (OSError, ValueError):
            continue
    return None


def local_kernel(o: BootOptions, scratch: Path) -> LocalKernel:
    image = Path(o.kernel_image).absolute()
    if not image.exists():
        raise BootError(f"{o.kernel_image}: no such file")
    if not os.access(image, os.R_OK):
        raise BootError(f"{o.kernel_image}: not readable (permission denied)")
    with open(image, "rb") as f:
        head = f.read(0x1000)
    arch = image_arch(head)
    if arch is None:
        raise BootError(f"{o.kernel_image}: not a kernel image QEMU boots (no x86 boot header, no arm64 Image header)")
    if o.arch and o.arch != arch:
        raise BootError(f"{o.kernel_image} is an {arch} kernel, not {o.arch}")
    if head[:2] == b"MZ" and head[4:8] == b"zimg":
        try:
            from .debian import unpack_zboot
        except ImportError:
            raise BootError(f"{o.kernel_image} is an EFI zboot image, which QEMU cannot boot: give arch/arm64/boot/Image") from None
        data = unpack_zboot(image.read_bytes())
        image = scratch / "Image"
        image.write_bytes(data)
    vmlinux = None
    if o.vmlinux:
        vmlinux = Path(o.vmlinux).absolute()
        if not vmlinux.is_file():
            raise BootError(f"{o.vmlinux}: no such file")
    modules_root = None
    if o.modules_dir:
        modules_root = Path(o.modules_dir).absolute()
        if not modules_root.is_dir():
            raise BootError(f"{o.modules_dir}: no such directory")
        if not (modules_root / "modules.dep").is_file() and not any(modules_root.rglob("*.ko*")):
            raise BootError(f"{o.modules_dir}: no modules.dep and no .ko files (give lib/modules/<release>)")
    release = (image_release(image, vmlinux) or (modules_root.name if modules_root else None)
               or image.name)
    if modules_root is not None and modules_root.name != release and re.match(r"\d+\.\d+", modules_root.name):
        raise BootError(f"--modules {o.modules_dir} is for {modules_root.name}, the kernel is {release}")
    return LocalKernel(release, image, vmlinux, modules_root, scratch / "modules", arch, suite=_host_suite())


def _host_suite() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME=") and line.split("=", 1)[1].strip():
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "trixie"


# --- the scenario ----------------------------------------------------------------------------------


def _mib(size: str, what: str) -> int:
    from .guest import parse_size_mib

    try:
        return parse_size_mib(size)
    except LabError:
        raise BootError(f"{what} {size!r}: not a memory size (1G, 512M, ...)") from None


def _size_text(mib: int) -> str:
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def guest_spec(o: BootOptions, arch: str):
    """The lab's :class:`~.guest.GuestSpec` for these options (without the in-guest hooks)."""
    from .guest import GuestSpec

    if o.la57 is not None and arch != "x86_64":
        raise BootError(f"--la57/--no-la57 is for x86_64 guests, not {arch}")
    if o.paging and o.paging not in arch_info(arch).paging_modes:
        raise BootError(f"--{o.paging} is for riscv64 guests, not {arch}")
    headroom = HEADROOM_IN_GUEST_MIB if o.in_guest else HEADROOM_MIB
    # 1G pages need free, 1G-aligned GiBs beside the first one (the kernel boots in it)
    least = o.hugepages * 2 + headroom + ((o.hugepages_1g + 1) * 1024 if o.hugepages_1g else 0)
    steps_1g = max([int(s.value) for s in _steps(o) if s.what == "hugepages-1g"], default=0)
    if o.dump_kdump:
        from .kdump import DEFAULT_CRASHKERNEL

        least += _mib(DEFAULT_CRASHKERNEL, "crashkernel")  # the capture kernel's reserve
    if o.mem:
        mem = _mib(o.mem, "--mem")
        if mem < least:
            raise BootError(f"--mem {o.mem} is too small for {_hugepages_text(o)}: give at least "
                            f"--mem {_size_text(-(-least // 1024) * 1024)}")
    else:
        # a 1G page allocated at run time (--then hugepages-1g=N; mm/hugetlb.c alloc_gigantic_folio()
        # -> alloc_contig_pages(): a free or movable, 1G-aligned GiB of one zone, never ZONE_MOVABLE)
        # needs free GiBs below 4G: QEMU's pc keeps RAM below 3G up to 3.5G (a 3G guest's top GiB
        # ends 128K short of RAM), and only what exceeds it goes above 4G, into ZONE_NORMAL, which
        # takes the kernel's own allocations first; with less, one Debian 6.12 run in two found no
        # GiB. So the GiB for the kernel, one per page and one above 4G. With --mem the kernel
        # says what it could.
        if steps_1g > o.hugepages_1g:
            least += (steps_1g - o.hugepages_1g + (0 if o.hugepages_1g else 2)) * 1024
        mem = max(1024, -(-least // 1024) * 1024)  # whole GiB
    if o.numa and o.numa > 1 and mem // o.numa < 256:
        raise BootError(f"{_size_text(mem)} is too little memory for {o.numa} NUMA nodes")
    cmdline = []
    if o.hugepages_1g:
        cmdline.append(f"hugepagesz=1G hugepages={o.hugepages_1g}")
    if o.cmdline.strip():
        cmdline.append(o.cmdline.strip())
    if steps_1g > o.hugepages_1g and arch == "x86_64" and "kaslr" not in o.cmdline:
        # the kernel image where KASLR puts it (arch/x86/boot/compressed/kaslr.c
        # find_random_phys_addr(): any RAM from 16M) may take the one free GiB a run-time 1G page
        # can have (the one below 3G; ZONE_NORMAL's takes the kernel's allocations): nokaslr
        # keeps it at LOAD_PHYSICAL_ADDR, 16M, in the first GiB (KASLR keeps GiBs free only for
        # boot-time 1G pages, process_gb_huge_pages())
        cmdline.append("nokaslr")
    extra: dict = {}
    from .guest import DEVDAX_ALIGNS, Nvdimm
    from .watching import DEVDAX_STEP_ALIGN, devdax_sizes, hotplug_sizes

    plugs = list(o.hotplug) + hotplug_sizes(_steps(o))
    # --then devdax=SIZE: an NVDIMM of SIZE from boot, left raw until its step (QEMU's nvdimm=on
    # and ACPI NFIT: ArchInfo.nvdimm_firmware); it takes a slot and room in the hotplug area like a DIMM
    daxes = devdax_sizes(_steps(o))
    if daxes and not arch_info(arch).nvdimms:
        raise BootError(f"--then devdax: no NVDIMM in {arch} guests (QEMU describes them in ACPI NFIT, which its machine has not)")
    dax_mib = [_mib(s, "--then devdax") for s in daxes]
    for s, n in zip(daxes, dax_mib):
        if (n << 20) % DEVDAX_ALIGNS[DEVDAX_STEP_ALIGN]:
            raise BootError(f"--then devdax={s}: not a whole number of its {DEVDAX_STEP_ALIGN} alignment")
    if plugs or daxes:
        total = sum(_mib(s, "--hotplug") for s in plugs) + sum(dax_mib)
        extra = dict(maxmem=_size_text(mem + total), slots=len(plugs) + len(daxes))
        if daxes:
            extra["nvdimms"] = tuple(Nvdimm(s, devdax_align=DEVDAX_STEP_ALIGN, deferred=True) for s in daxes)
    if plugs:
        if arch_info(arch).hotplug_device == "virtio-mem":
            extra.update(_virtio_mem(o, arch, plugs))
        if any(s.what == "unplug" for s in _steps(o)):
            # offlining a block fails (EBUSY) once the kernel put an unmovable page in it, as it
            # soon does in ZONE_NORMAL (mm/memory_hotplug.c offline_pages(): the pages must
            # migrate): --then unplug onlines hot-added memory to ZONE_MOVABLE
            extra["hotplug_online"] = "online_movable"
    return GuestSpec(
        debian=o.debian or "6.12", arch=arch, mem=_size_text(mem), numa=o.numa, hugepages=o.hugepages,
        hvo=o.hvo, la57=o.la57, paging=o.paging, cmdline=" ".join(cmdline), memmap_on_memory=o.memmap_on_memory,
        accel=o.accel, **extra,
    )


def _virtio_mem(o: BootOptions, arch: str, plugs: list) -> dict:
    """What a guest that hot-adds through virtio-mem (lab/virtiomem.py) needs of its spec."""
    from . import virtiomem

    if o.memmap_on_memory:
        raise BootError(f"--memmap-on-memory: {arch} guests hot-add through virtio-mem (Debian's {arch} kernels have "
                        "no CONFIG_ACPI_HOTPLUG_MEMORY for a pc-dimm), whose memory never hosts its memmap "
                        "(drivers/virtio/virtio_mem.c virtio_mem_add_memory(): no MHP_MEMMAP_ON_MEMORY)")
    return {"hotplug_block": virtiomem.block_size([_mib(s, "--hotplug") << 20 for s in plugs])}


def _steps(o: BootOptions) -> list:
    from .watching import parse_step

    return [parse_step(t) for t in o.then]


def _hugepages_text(o: BootOptions) -> str:
    parts = []
    if o.hugepages:
        parts.append(f"{o.hugepages} 2M")
    if o.hugepages_1g:
        parts.append(f"{o.hugepages_1g} 1G")
    return (" and ".join(parts) + " hugepages") if parts else "the guest"


# --- the guest's account as JSON -------------------------------------------------------------------


def guest_json(guest, mode: str) -> dict:
    acc = guest.account
    out = {
        "kernel_release": acc.release,
        "cmdline": acc.cmdline,
        "check": mode,
        "boot_seconds": round(guest.boot_seconds or 0.0, 1),
        "mem_total_kb": acc.mem_total_kb,
        "hugepages_total": acc.hugepages_total,
        "hugepages_free": acc.hugepages_free,
        "hugepage_size_kb": acc.hugepage_size_kb,
        "hugepages": {f"{kb}kB": n for kb, n in sorted(acc.nr_hugepages.items())},
        "nodes": list(acc.nodes),
        "node_mem_total_kb": {str(n): kb for n, kb in sorted(acc.node_mem_total_kb.items())},
        "memory_block_size": acc.memory_block_size,
        "memory_blocks": {str(b): st for b, st in sorted(acc.memory_blocks.items())},
        "dimms": [{"id": d.id, "addr": hex(d.addr), "size": d.size, "node": d.node, "device": d.device}
                  for d in guest.dimms],
    }
    if guest.spec.arch == "x86_64":
        out["la57"] = acc.la57
    if acc.mmu:
        out["mmu"] = acc.mmu
    return out


def account_line(guest) -> str:
    acc = guest.account
    states: dict = {}
    for st in acc.memory_blocks.values():
        states[st] = states.get(st, 0) + 1
    huge = ", ".join(f"{n} x {_size_text(kb // 1024) if kb >= 1024 else f'{kb}K'}"
                     for kb, n in sorted(acc.nr_hugepages.items()) if n) or "none"
    blocks = ", ".join(f"{n} {st}" for st, n in sorted(states.items())) or "none"
    return (f"the guest's own account: {acc.release}, MemTotal {acc.mem_total_kb} kB, hugepages {huge}, "
            f"nodes {','.join(map(str, acc.nodes)) or '-'}, memory blocks {blocks}")


# --- running it ------------------------------------------------------------------------------------


def main(kwargs: dict, console_factory: Callable) -> int:
    """Run ``boot`` with the click options in ``kwargs``; return the exit status."""
    o = BootOptions(**kwargs)
    progress = (lambda msg: None) if o.quiet else _progress
    try:
        return _run(o, progress, console_factory)
    except BootError as e:
        return _fail(str(e))
    except LabError as e:
        return _fail(str(e), hint=_hint(o, str(e)))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: still one line, the traceback on request (as the other commands)
        if os.environ.get("INSPECT_VMEMMAP_DEBUG"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (set INSPECT_VMEMMAP_DEBUG=1 for the traceback)")


def _progress(msg: str) -> None:
    print(f"[boot] {msg}", file=sys.stderr, flush=True)


def _fail(message: str, hint: str = "") -> int:
    """The reason on one line, then (for a guest that failed) its console tail, indented."""
    lines = message.rstrip("\n").split("\n")
    first = lines[0].rstrip()
    if hint:
        first = f"{first.rstrip(':')} ({hint})"
    print(f"inspect-vmemmap: {first}", file=sys.stderr)
    for line in lines[1:]:
        print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()
    return EXIT_BAD_INPUT


def _hint(o: BootOptions, message: str) -> str:
    panic = re.search(r"Kernel panic - not syncing: (.*)", message)
    if panic:
        return f"kernel panic: {panic.group(1).strip()}"
    if o.kernel_image and "qemu_fw_cfg" in message and not o.modules_dir:
        return "give --modules DIR, or build with CONFIG_FW_CFG_SYSFS=y"
    if o.kernel_image and "in-guest" in message and not o.modules_dir:
        return "the kernel needs 9p over virtio: give --modules DIR, or build CONFIG_NET_9P_VIRTIO and CONFIG_9P_FS in"
    return ""


def _run(o: BootOptions, progress, console_factory) -> int:
    from .guest import boot_guest
    from .initramfs import find_static_busybox

    if bool(o.debian) == bool(o.kernel_image):
        raise BootError(f"give --debian SERIES ({', '.join(SERIES)}) or --kernel IMAGE (one of them)")
    if o.debian and o.modules_dir:
        raise BootError("--modules is for --kernel; Debian kernels bring their own")
    if o.vmlinux and not os.path.isfile(o.vmlinux):
        raise BootError(f"{o.vmlinux}: no such file")
    if o.dump:
        dump_dir = Path(o.dump).absolute().parent
        if not dump_dir.is_dir():
            raise BootError(f"--dump {o.dump}: no directory {dump_dir}")
        if not os.access(dump_dir, os.W_OK):
            raise BootError(f"--dump {o.dump}: {dump_dir} is not writable")
    if o.dump_kdump and o.in_guest:
        raise BootError("--dump-kdump and --in-guest both mount the host root in the guest: give one")
    if (o.watch or o.then) and not o.in_guest:
        raise BootError("--watch runs watch inside the guest: give --in-guest too")
    if o.then and not o.watch:
        raise BootError("--then steps are for --watch")
    if o.then:
        from .watching import parse_step

        try:
            [parse_step(t) for t in o.then]
        except ValueError as e:
            raise BootError(str(e)) from None
    if o.memmap_on_memory and not o.hotplug and not any(s.what == "hotplug" for s in _steps(o)):
        raise BootError("--memmap-on-memory concerns hot-added memory: give --hotplug SIZE (or --then hotplug=SIZE) too")
    if o.in_guest:
        problem = inguest.environment_problem()
        if problem:
            raise BootError(f"--in-guest: {problem}")

    scratch = Path(tempfile.mkdtemp(prefix="ivm-boot-", dir="/tmp"))  # short: holds a socket
    try:
        if o.kernel_image:
            kernel = local_kernel(o, scratch)
            arch = kernel.arch
        else:
            arch = o.arch or "x86_64"
            kernel = None
        info = arch_info(arch)
        if o.dump_kdump and arch != "x86_64":
            raise BootError(f"--dump-kdump: kdump captures are implemented for x86_64 guests, not {arch}")
        spec = guest_spec(o, arch)
        require_tool(info.qemu, info.qemu_package)
        if info.name == os.uname().machine:
            find_static_busybox()
        if kernel is None:
            from .debian import fetch_debian_kernel

            kernel = fetch_debian_kernel(o.debian, arch, progress=progress)
            progress(f"kernel {kernel.release} (Debian {o.debian}, {kernel.version})")
        else:
            progress(f"kernel {kernel.release} from {o.kernel_image}")
        if o.in_guest:
            chan = inguest.channel_path(scratch)
            userland = _foreign_userland(arch, progress)
            spec = replace(
                spec,
                extra_modules=tuple(inguest.modules_for(arch, kernel.modules_dep())),
                init_extra=inguest.init_script(arch, userland=userland),
                qemu_args=tuple(inguest.qemu_args(arch, chan, userland=userland)),
            )
        kd = None
        if o.dump_kdump:
            from .kdump import KdumpSetup

            kd = KdumpSetup(Path(o.dump_kdump), progress=progress)
            spec = kd.guest_spec(spec, kernel)
        workdir = Path(o.workdir).absolute() if o.workdir else scratch / "guest"
        with boot_guest(spec, workdir=workdir, timeout=o.timeout, progress=progress, kernel=kernel) as guest:
            _note_shortfalls(o, guest, progress)
            for size in o.hotplug:
                progress(f"hot-adding {size} ({info.hotplug_device})")
                guest.hotplug(size, timeout=o.timeout, progress=progress)
                d = guest.dimms[-1]
                progress(f"{d.device} {d.id} at {d.addr:#x}-{d.end - 1:#x} {spec.hotplug_online}"
                         f"{' (memmap on memory)' if o.memmap_on_memory else ''}")
            if o.dump:
                progress(f"dumping the guest to {o.dump}")
                t0 = time.monotonic()
                guest.dump(o.dump)
                progress(f"dump written in {time.monotonic() - t0:.1f}s "
                         f"({os.path.getsize(o.dump) / GIB:.1f} GiB)")
            if o.watch:
                return _watch_in_guest(o, guest, scratch, progress, console_factory)
            if o.in_guest:
                return _check_in_guest(o, guest, scratch, progress, console_factory)
            return _check_outside(o, guest, kernel, progress, console_factory,
                                  after=(lambda doc: _kdump_capture(o, kd, guest, doc, progress)) if kd else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _foreign_userland(arch: str, progress):
    """For --in-guest: None when the guest runs the host's own Python (same architecture),
    else a Debian userland of the guest's architecture (:mod:`.userland`, built once)."""
    u = inguest.userland_for(arch, progress)
    if u is None:
        return None
    progress(f"in-guest userland: Debian {u.suite} {arch} (python3 {u.packages.get('python3', '?')}, "
             f"drgn {u.packages.get('python3-drgn', '?')})")
    return u


def _note_shortfalls(o: BootOptions, guest, progress) -> None:
    """Say so when the kernel reserved fewer hugepages than asked for (its word, not an error)."""
    acc = guest.account
    for kb, want in ((2048, o.hugepages), (1 << 20, o.hugepages_1g)):
        got = acc.nr_hugepages.get(kb, 0)
        if want and got != want:
            progress(f"note: the guest reserved {got} of {want} {_size_text(kb // 1024)} hugepages")


def _kdump_capture(o: BootOptions, kd, guest, doc: Optional[dict], progress) -> None:
    """Panic the guest into its capture kernel and wait for makedumpfile's saves (--dump-kdump);
    with --json, ``guest.kdump`` says what was saved and how long it took."""
    res = kd.capture(guest, timeout=max(900.0, o.timeout or 0))
    if doc is not None:
        doc["guest"]["kdump"] = {
            "crashkernel": kd.crashkernel,
            "panic_to_capture_seconds": round(res.panic_to_capture_seconds, 1),
            "capture_seconds": round(res.capture_seconds, 1),
            "saves": {n: {"path": str(r.path), "makedumpfile": list(r.args), "seconds": round(r.seconds, 1),
                          "bytes": r.path.stat().st_size} for n, r in res.saves.items()},
        }


def _check_outside(o: BootOptions, guest, kernel, progress, console_factory, after=None) -> int:
    from inspect_vmemmap import report
    from inspect_vmemmap.commands import confirmed_check
    from inspect_vmemmap.findings import exit_status
    from inspect_vmemmap.errors import AnalysisError
    from inspect_vmemmap.source import open_target

    vmlinux = None if o.no_debuginfo else (o.vmlinux or kernel.vmlinux)
    progress(f"checking through QMP {f'with {vmlinux}' if vmlinux else 'from BTF and kallsyms'}")
    t0 = time.monotonic()
    try:
        t = open_target(qemu=str(guest.qmp_socket), vmlinux=str(vmlinux) if vmlinux else None,
                        no_debuginfo=o.no_debuginfo)
        # the guest is ours: stop it so that the check reads one state, not a kernel changing
        # underneath (confirmed_check would report that as races)
        guest.qmp("stop")
        try:
            ld, doc, findings, res, _inputs, notes = confirmed_check(t, o.deep)
        finally:
            guest.qmp("cont")
    except AnalysisError as e:
        raise BootError(str(e)) from None
    progress(f"check done in {time.monotonic() - t0:.1f}s")
    if o.as_json:
        doc["guest"] = guest_json(guest, "qemu")
        if after is not None:
            after(doc)
        report.print_json(doc)
    else:
        con = console_factory()
        report.print_check_report(con, ld, doc, findings, res, notes)
        con.print(account_line(guest), highlight=False)
        sys.stdout.flush()
        if after is not None:
            after(None)
    sys.stdout.flush()
    return exit_status(findings)


def _check_in_guest(o: BootOptions, guest, scratch: Path, progress, console_factory) -> int:
    args = (["--json"] if o.as_json else []) + (["--deep"] if o.deep else []) + ["--no-debuginfo"]
    progress("checking inside the guest (the host's Python over 9p, the guest's /proc/kcore)")
    chan = inguest.Channel(inguest.channel_path(scratch))

    def alive() -> None:
        if guest.process is not None and guest.process.poll() is not None:
            raise LabError(f"QEMU exited (status {guest.process.returncode}) during the in-guest check; "
                           "last console lines:\n" + "\n".join(guest.console_tail(30)))

    try:
        res = chan.run_check(args, timeout=o.timeout or IN_GUEST_CHECK_TIMEOUT, alive=alive)
    except LabError as e:
        if "\n" in str(e):  # already carries the console tail
            raise
        raise LabError(f"{e}; last console lines:\n" + "\n".join(guest.console_tail(30))) from None
    finally:
        chan.close()
    progress(f"in-guest check done in {res.seconds:.1f}s (status {res.status})")
    err_lines = [l for l in res.stderr.splitlines() if l.strip()]
    if res.status not in (0, 1):
        reason = err_lines[0] if err_lines else f"exited with status {res.status} and said nothing"
        reason = reason.removeprefix("inspect-vmemmap: ")
        raise BootError(f"in-guest check: {reason}")
    for line in err_lines:
        print(line, file=sys.stderr)
    if o.as_json:
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            raise BootError("in-guest check: its output is not a JSON document") from None
        doc["guest"] = guest_json(guest, "in-guest")
        from inspect_vmemmap import report

        report.print_json(doc)
    else:
        sys.stdout.write(res.stdout if res.stdout.endswith("\n") else res.stdout + "\n")
        console_factory().print(account_line(guest), highlight=False)
    sys.stdout.flush()
    return res.status


def _watch_in_guest(o: BootOptions, guest, scratch: Path, progress, console_factory) -> int:
    from inspect_vmemmap import report

    from . import watching

    status, out, accounts, err = watching.run(o, guest, scratch, progress,
                                              [watching.parse_step(t) for t in o.then],
                                              o.timeout or 2 * IN_GUEST_CHECK_TIMEOUT)  # bpftrace starts, re-checks
    err_lines = [l for l in err.splitlines() if l.strip() and "probes attached" not in l and "inspect-vmemmap: settled" not in l]
    if status not in (0, 1):
        reason = err_lines[0] if err_lines else f"exited with status {status} and said nothing"
        raise BootError(f"in-guest watch: {reason.removeprefix('inspect-vmemmap: ')}")
    for line in err_lines:
        print(line, file=sys.stderr)
    if o.as_json:
        doc = watching.document(out, accounts)
        doc["guest"] = dict(guest_json(guest, "in-guest watch"), steps=accounts)
        report.print_json(doc)
    else:
        watching.write_text(out, accounts)
        console_factory().print(account_line(guest), highlight=False)
    sys.stdout.flush()
    return status
