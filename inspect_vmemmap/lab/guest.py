"""Booting a Debian kernel under QEMU and taking crash dumps of it."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from .account import GuestAccount, GuestState, parse_account, parse_state
from .arch import ArchInfo, arch_info
from .cache import Progress, reporter, require_tool
from .debian import DebianKernel, fetch_busybox, fetch_debian_kernel
from .errors import LabError
from .initramfs import MARK_ERROR, MARK_READY, build_initramfs
from .qmp import dump_vmcoreinfo, qmp_command
from . import virtiomem

DEFAULT_TIMEOUT = None  # boot_deadline(spec)
#: the guest end of its state line (initramfs._STATE_REPORTER): a serial port of its own
#: (QEMU isa-serial index 2, COM3: the console is ttyS0, boot --in-guest's requests ttyS1).
#: Elsewhere the state lines go to the console.
STATE_DEVICE = {"x86_64": "/dev/ttyS2"}


def boot_deadline(spec: "GuestSpec") -> float:
    """How long a boot of ``spec`` may take before it is called stuck: TCG boots a 1G guest
    in about 10 s on an idle machine; each GiB of struct pages to initialise, each hugepage
    to allocate (and with HVO to remap), each NVDIMM to turn into device-dax and each NUMA
    node cost more, and a host shared with other guests multiplies it all. Generous on
    purpose: the deadline only tells a hung guest from a slow one."""
    gib = parse_size_mib(spec.mem) / 1024
    huge = spec.hugepages * (0.1 if spec.hvo else 0.02)
    return round(120 + 30 * gib + huge + 60 * len(spec.nvdimms) + 10 * spec.numa)


def hotplug_deadline(blocks: int, memmap_on_memory: bool) -> float:
    """How long onlining ``blocks`` hot-added memory blocks may take: each block's struct
    pages are initialised (on the block itself with memmap_on_memory), under TCG."""
    return round(60 + blocks * (15 if memmap_on_memory else 10))
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes; keep a margin
#: memhp_default_state= values (mm/memory_hotplug.c mhp_online_type_from_str)
HOTPLUG_ONLINE_STATES = ("online", "online_kernel", "online_movable", "offline")
#: device-dax alignments x86_64 offers (drivers/nvdimm/pfn_devs.c nd_pfn_supported_alignments():
#: PAGE_SIZE, HPAGE_PMD_SIZE, HPAGE_PUD_SIZE)
DEVDAX_ALIGNS = {"4K": 4096, "2M": 2 << 20, "1G": 1 << 30}
#: where a device-dax device keeps its memmap: nd_pfn mode "ram" (PFN_MODE_RAM) or "pmem" (PFN_MODE_PMEM)
DEVDAX_LOCATIONS = {"mem": "ram", "dev": "pmem"}
#: modules an NVDIMM turned into device-dax needs (ACPI NFIT, the nd bus's dax_pmem driver, device_dax)
NVDIMM_MODULES = ("nfit", "dax_pmem", "device_dax")
MARK_DEVDAX = "IVM-DEVDAX"


@dataclass(frozen=True)
class Nvdimm:
    """An emulated NVDIMM (QEMU ``nvdimm`` on a sparse file, without labels, so the
    kernel gives its region one raw "io" namespace) that /init turns into a device-dax
    device through sysfs alone, as ndctl create-namespace -m devdax would: the region's
    dax seed gets a uuid, ``align`` and ``mode`` and claims the namespace, and is bound to
    the dax_pmem driver (drivers/nvdimm/pfn_devs.c, dax_devs.c; drivers/dax/pmem.c)."""

    size: str = "1G"  # QEMU size syntax
    devdax_align: str | None = "2M"  # '4K' | '2M' | '1G'; None: leave the namespace raw
    location: str = "mem"  # the memmap in RAM ('mem') or on the device ('dev', an altmap)
    #: left raw at boot: the running guest makes it device-dax later, when asked (the in-guest
    #: request line's ``devdax``: ``boot --in-guest --watch --then devdax=SIZE``)
    deferred: bool = False


@dataclass(frozen=True)
class GuestSpec:
    debian: str = "6.1"  # kernel series: '6.1' | '6.12' | '7.2'
    arch: str = "x86_64"
    mem: str = "1G"  # QEMU size syntax: '1G', '1536M', ...
    numa: int = 0  # N > 0: N nodes splitting memory evenly, one CPU each
    hugepages: int = 0  # 2 MiB pages reserved at boot (hugepages=N)
    hvo: bool = False  # hugetlb_free_vmemmap=on
    la57: bool | None = None  # False: CPU without la57; True: CPU with la57 (checked); None: max
    cmdline: str = ""  # appended to the kernel command line
    extra_modules: Sequence[str] = ()  # loaded after qemu_fw_cfg, dependencies resolved
    init_extra: str = ""  # shell run by /init before the account (use `fail MSG` to fail)
    qemu_args: Sequence[str] = ()  # appended to the QEMU command line (e.g. -virtfs ...)
    accel: str = "tcg"  # KVM guests hang on some hosts; see kvm_usable()
    smp: int = 0  # 0: max(1, numa)
    # Memory hotplug (Guest.hotplug): maxmem gives QEMU `-m MEM,slots=N,maxmem=MAXMEM`, and the
    # guest watches its memory blocks and prints its account again when they change.
    maxmem: str | None = None  # QEMU size syntax; None: no hotplug
    slots: int = 0  # pc-dimm slots (0: 4 when maxmem is set)
    hotplug_online: str = "online"  # memhp_default_state= when maxmem is set ('': kernel default)
    memmap_on_memory: bool = False  # memory_hotplug.memmap_on_memory=1
    flavour: str = ""  # Debian kernel flavour ('' the arch's default; 'arm64-16k')
    lpa2: bool | None = None  # aarch64: False gives a CPU without FEAT_LPA2 (48-bit VA/PA); None: max
    paging: str | None = None  # a paging mode of ArchInfo.paging_modes (riscv64 'sv39'; checked); None: default
    # virtio-mem guests (ArchInfo.hotplug_device): the device's block size, bytes (0: the
    # largest power of two dividing maxmem - mem; boot gives one dividing every hotplug size)
    hotplug_block: int = 0
    # NVDIMMs (x86_64; aarch64 through edk2 and ACPI, ArchInfo.nvdimm_firmware; needs maxmem): QEMU places them in the hotplug area in order; each
    # becomes device-dax (Guest.devdax has the guest's own account of them)
    nvdimms: Sequence[Nvdimm] = ()


@dataclass(frozen=True)
class DevDax:
    """A device-dax device as the guest's /init set it up (its own sysfs account)."""

    region: str
    namespace_start: int  # the namespace (the whole NVDIMM), physical
    namespace_size: int
    device: str  # daxN.M
    align: int
    mode: str  # nd_pfn mode: 'ram' (memmap in RAM) or 'pmem' (memmap on the device)
    data_start: int  # where the dax device's data starts (after the info block and any memmap)
    data_size: int


def parse_devdax(console: str) -> list[DevDax]:
    """The IVM-DEVDAX lines /init printed: ``IVM-DEVDAX region ns_start ns_size dev align
    mode data_start data_size`` (numbers as sysfs shows them)."""
    out = []
    for line in console.replace("\r", "").split("\n"):
        f = line.split()
        if len(f) == 9 and f[0] == MARK_DEVDAX:
            try:
                out.append(DevDax(f[1], int(f[2], 0), int(f[3], 0), f[4], int(f[5], 0), f[6], int(f[7], 0),
                                  int(f[8], 0)))
            except ValueError:
                continue
    return out


def devdax_script(spec: GuestSpec) -> str:
    """Shell for /init that turns the spec's NVDIMMs into device-dax devices, in the
    spec's order, and prints one IVM-DEVDAX line for each (``fail`` on error). A
    ``deferred`` one stays raw: the in-guest request line's ``devdax`` calls the same
    ``ivm_devdax`` later (``ivm_regions``: the regions by address)."""
    if not spec.nvdimms:
        return ""
    lines = [
        "echo 1 > /proc/sys/kernel/printk",
        "ivm_devdax() {",
        "  [ -n \"$1\" ] || { fail \"devdax: fewer nd regions than NVDIMMs\"; return; }",
        "  r=/sys/bus/nd/devices/region$1; ns=namespace$1.0",
        '  [ -d $r ] || { fail "devdax: no region$1 (nd devices: $(ls /sys/bus/nd/devices | tr "\\n" " "))"; return; }',
        "  d=/sys/bus/nd/devices/$(cat $r/dax_seed)",
        '  why() { echo "$1 (dmesg: $(dmesg | tail -n 2 | tr "\\n" " "))"; }',
        '  cat /proc/sys/kernel/random/uuid > $d/uuid || { fail "devdax: $(why "uuid of $d")"; return; }',
        '  echo $2 > $d/align || { fail "devdax: $(why "align $2 of $d, supported: $(cat $d/supported_alignments)")"; return; }',
        '  echo $3 > $d/mode || { fail "devdax: $(why "mode $3 of $d")"; return; }',
        '  echo $ns > $d/namespace || { fail "devdax: $(why "$d claiming $ns")"; return; }',
        '  echo ${d##*/} > /sys/bus/nd/drivers/dax_pmem/bind || { fail "devdax: $(why "binding ${d##*/} to dax_pmem")"; return; }',
        "  x=/sys/bus/dax/devices/${d##*/}",
        '  [ -e $x/driver ] || { fail "devdax: $(why "${d##*/} has no device_dax driver")"; return; }',
        '  echo "%s region$1 $(cat /sys/bus/nd/devices/$ns/resource) $(cat /sys/bus/nd/devices/$ns/size)'
        ' ${d##*/} $2 $3 $(cat $d/resource) $(cat $d/size)"' % MARK_DEVDAX,
        "}",
    ]
    # the kernel numbers regions in its own order: the i-th NVDIMM is the i-th region by
    # address (QEMU places them in order, one after another)
    lines.append("ivm_regions=$(for r in /sys/bus/nd/devices/region*; do [ -e $r/resource ] && "
                 "echo \"$(( $(cat $r/resource) )) ${r##*/region}\"; done | sort -n | cut -d' ' -f2)")
    for i, n in enumerate(spec.nvdimms):
        if n.devdax_align is not None and not n.deferred:
            lines.append(f"ivm_devdax $(echo $ivm_regions | cut -d' ' -f{i + 1}) {DEVDAX_ALIGNS[n.devdax_align]} "
                         f"{DEVDAX_LOCATIONS[n.location]}")
    return "\n".join(lines) + "\n"


def _check_nvdimms(spec: GuestSpec) -> None:
    if not spec.nvdimms:
        return
    if not arch_info(spec.arch).nvdimms:
        raise LabError(f"NVDIMMs: not in {spec.arch} guests (QEMU describes them in ACPI NFIT, which this machine has not)")
    if not spec.maxmem:
        raise LabError("NVDIMMs need maxmem (QEMU puts them in the memory hotplug area)")
    for n in spec.nvdimms:
        parse_size_mib(n.size)
        if n.devdax_align is not None and n.devdax_align not in DEVDAX_ALIGNS:
            raise LabError(f"devdax_align {n.devdax_align!r}: not one of {', '.join(DEVDAX_ALIGNS)}")
        if n.location not in DEVDAX_LOCATIONS:
            raise LabError(f"nvdimm location {n.location!r}: not one of {', '.join(DEVDAX_LOCATIONS)}")
    total = parse_size_mib(spec.mem) + sum(parse_size_mib(n.size) for n in spec.nvdimms)
    if total > parse_size_mib(spec.maxmem):
        raise LabError(f"maxmem {spec.maxmem} is less than mem plus the NVDIMMs ({total}M)")


def nvdimm_files(spec: GuestSpec, workdir: Path) -> list[Path]:
    """The sparse files backing the spec's NVDIMMs."""
    return [Path(workdir) / f"nvdimm{i}.img" for i in range(len(spec.nvdimms))]


@dataclass(frozen=True)
class Dimm:
    """One hot-added pc-dimm, as QEMU placed it (query-memory-devices)."""

    id: str  # device id
    memdev: str  # memory backend object id
    addr: int  # guest physical start, bytes
    size: int  # bytes
    node: int | None
    device: str = "pc-dimm"  # or "virtio-mem": then the range of the lab's one device this hotplug plugged;
    # "nvdimm": one of the spec's NVDIMMs (Guest.nvdimms)

    @property
    def end(self) -> int:
        return self.addr + self.size


def kvm_usable() -> bool:
    """True if /dev/kvm can be opened read-write (it may still not work: default is TCG)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def parse_size_mib(size: str) -> int:
    """QEMU-style size ('1G', '512M', '2048', '1.5G') -> MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(size), re.I)
    if not m:
        raise LabError(f"bad memory size {size!r}")
    mult = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    mib = float(m.group(1)) * mult
    if mib != int(mib) or mib <= 0:
        raise LabError(f"memory size {size!r} is not a whole number of MiB")
    return int(mib)


def kernel_cmdline(spec: GuestSpec, info: ArchInfo) -> str:
    parts = [f"console={info.console}", "panic=-1"]
    if spec.hugepages:
        parts.append(f"hugepages={spec.hugepages}")
    if spec.hvo:
        parts.append("hugetlb_free_vmemmap=on")
    if spec.maxmem and spec.hotplug_online:
        parts.append(f"memhp_default_state={spec.hotplug_online}")
    if spec.memmap_on_memory:
        parts.append("memory_hotplug.memmap_on_memory=1")
    if spec.nvdimms and info.nvdimm_firmware is not None:
        parts.append(info.nvdimm_firmware.cmdline)
    if spec.paging and info.paging_cmdline(spec.paging):
        parts.append(info.paging_cmdline(spec.paging))
    if spec.cmdline:
        parts.append(spec.cmdline.strip())
    return " ".join(parts)


def qemu_argv(
    spec: GuestSpec, info: ArchInfo, qemu: str, kernel: Path, initrd: Path,
    qmp_socket: Path, control_socket: Path, console_log: Path,
) -> list[str]:
    """QEMU's command line. With hotplug (maxmem) on x86_64, the guest's state port writes
    to ``state.log`` beside ``console_log``."""
    total = parse_size_mib(spec.mem)
    smp = spec.smp or max(1, spec.numa)
    mem_arg = f"{total}M"
    if spec.maxmem:
        maxmem = parse_size_mib(spec.maxmem)
        if maxmem <= total:
            raise LabError(f"maxmem {spec.maxmem} leaves no room above mem {spec.mem} for hotplug")
        if spec.hotplug_online and spec.hotplug_online not in HOTPLUG_ONLINE_STATES:
            raise LabError(f"hotplug_online={spec.hotplug_online!r}: not one of {', '.join(HOTPLUG_ONLINE_STATES)}")
        mem_arg += f",slots={spec.slots or 4},maxmem={maxmem}M"
    elif spec.slots:
        raise LabError("slots needs maxmem")
    argv = [
        qemu, "-accel", spec.accel, "-cpu", info.cpu_arg(spec.la57, spec.lpa2), *info.machine_args,
        "-m", mem_arg, "-smp", str(smp),
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", kernel_cmdline(spec, info),
        *(("-device", "vmcoreinfo") if info.vmcoreinfo_device else ()),
        "-serial", f"file:{console_log}",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-chardev", f"socket,id=ivmctl,path={control_socket},server=on,wait=off",
        "-mon", "chardev=ivmctl,mode=control",
    ]
    if spec.maxmem and info.hotplug_device == virtiomem.DEVICE:
        region = (parse_size_mib(spec.maxmem) - total - sum(parse_size_mib(n.size) for n in spec.nvdimms)) << 20
        argv += virtiomem.qemu_args(region, spec.hotplug_block or virtiomem.block_size([region]))
    if spec.maxmem and spec.arch in STATE_DEVICE:
        argv += ["-chardev", f"file,id=ivmstate,path={Path(console_log).parent / 'state.log'}",
                 "-device", "isa-serial,chardev=ivmstate,index=2"]
    _check_nvdimms(spec)
    if spec.nvdimms:
        argv += ["-machine", "nvdimm=on"]
        if info.nvdimm_firmware is not None:
            argv += ["-bios", info.nvdimm_firmware.path]
        for i, (n, f) in enumerate(zip(spec.nvdimms, nvdimm_files(spec, Path(console_log).parent))):
            argv += ["-object", f"memory-backend-file,id=ivm-nvm{i},share=on,mem-path={f},size={parse_size_mib(n.size)}M",
                     "-device", f"nvdimm,id=ivm-nvdimm{i},memdev=ivm-nvm{i}"]
    if spec.numa:
        if spec.numa > smp:
            raise LabError(f"numa={spec.numa} needs smp >= {spec.numa}")
        per = total // spec.numa
        if per <= 0:
            raise LabError(f"{spec.mem} is too little memory for {spec.numa} nodes")
        cpus = [list(range(smp))[i :: spec.numa] for i in range(spec.numa)]
        for n in range(spec.numa):
            size = per if n < spec.numa - 1 else total - per * (spec.numa - 1)
            argv += ["-object", f"memory-backend-ram,id=m{n},size={size}M"]
            node = f"node,nodeid={n},memdev=m{n}"
            for c in cpus[n]:
                node += f",cpus={c}"
            argv += ["-numa", node]
    argv += list(spec.qemu_args)
    return argv


class Guest:
    """A running QEMU guest. Use :func:`boot_guest` to get one."""

    def __init__(self, spec: GuestSpec, kernel: DebianKernel, workdir: Path, sockdir: Path):
        self.spec = spec
        self.kernel = kernel
        self.workdir = workdir
        self.qmp_socket = sockdir / "qmp.sock"  # for other clients (drgn's set_qemu_qmp)
        self.control_socket = sockdir / "ctl.sock"  # used by this class only
        self.console_log = workdir / "console.log"
        self.state_log = workdir / "state.log"  # the state port (STATE_DEVICE), where there is one
        self.qemu_log = workdir / "qemu.log"
        self.initramfs: Path | None = None
        self.argv: list[str] = []
        self.process: subprocess.Popen | None = None
        self.account: GuestAccount | None = None  # refreshed by hotplug()
        self.boot_seconds: float | None = None
        self.dimms: list[Dimm] = []  # hot-added by hotplug(), in order
        self.nvdimms: list[Dimm] = []  # the spec's NVDIMMs, where QEMU placed them
        self.devdax: list[DevDax] = []  # the guest's account of its device-dax devices

    # -- console -------------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_tail(self, n: int = 30) -> list[str]:
        lines = self.console_text().rstrip("\n").split("\n")
        return lines[-n:] if n > 0 else []

    def _qemu_log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.qemu_log.read_text(errors="replace").strip().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # -- QMP -----------------------------------------------------------------------------------

    def qmp(self, cmd: str, arguments: dict[str, Any] | None = None, /,
            timeout: float = 60.0, **args: Any) -> Any:
        """Run a QMP command over the lab's private monitor; returns its ``return`` value.

        Arguments whose names contain dashes go in ``arguments``; others may be keywords.
        """
        merged = dict(arguments or {})
        merged.update(args)
        return qmp_command(self.control_socket, cmd, merged or None, timeout=timeout)

    def dump(self, path: Path | str, check_vmcoreinfo: bool = True, timeout: float = 900.0) -> Path:
        """dump-guest-memory (ELF, paging=false) to ``path``; returns it once complete.

        With ``check_vmcoreinfo`` the dump must carry the guest's VMCOREINFO note.
        """
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            self.qmp("dump-guest-memory",
                     {"paging": False, "protocol": f"file:{tmp}", "format": "elf"},
                     timeout=timeout)
            # Synchronous unless detach=true, but be safe about a still-running dump.
            deadline = time.monotonic() + timeout
            while True:
                st = self.qmp("query-dump")
                if st.get("status") in ("completed", "none"):
                    break
                if st.get("status") == "failed":
                    raise LabError(f"dump-guest-memory to {path} failed")
                if time.monotonic() > deadline:
                    raise LabError(f"dump-guest-memory to {path} did not complete in {timeout:.0f}s")
                time.sleep(0.5)
            if check_vmcoreinfo and arch_info(self.spec.arch).vmcoreinfo_device and dump_vmcoreinfo(tmp) is None:
                raise LabError(
                    f"dump {path.name} has no VMCOREINFO note (qemu_fw_cfg not loaded in the guest?)"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return path

    # -- memory hotplug ------------------------------------------------------------------------

    def state(self) -> GuestState | None:
        """The guest's last whole state line (with hotplug: maxmem), from its state port,
        or the console where it has none."""
        if self.spec.arch in STATE_DEVICE:
            try:
                text = self.state_log.read_bytes().decode(errors="replace")
            except FileNotFoundError:
                return None
        else:
            text = self.console_text()
        return parse_state(text)

    def hotplug(self, size: str, node: int | None = None, timeout: float | None = None,
                progress: Progress = None) -> None:
        """Hot-add a pc-dimm of ``size`` (QEMU size syntax) on ``node`` and wait for the guest.

        Adds a memory-backend-ram and a pc-dimm through QMP, then waits on the guest's own
        state (its state lines: each memory block's sysfs state) until every memory block
        of the DIMM is in the state the spec's ``hotplug_online`` asks for (``offline`` for
        'offline', ``online`` for the online_* ones, either for ''), at most ``timeout``
        seconds (default: :func:`hotplug_deadline` of the DIMM's blocks). Afterwards
        ``self.account`` is the guest's account printed after the change (or, if /init has
        not printed it within a few seconds more, the earlier one with the state line's
        memory blocks, MemTotal and hugepage counts), and ``self.dimms`` ends with the DIMM
        (recorded as soon as QEMU has it, even if the guest then fails to online it).
        Raises LabError, saying what the guest's sysfs said and with the console tail, at
        the deadline.
        """
        report = reporter(progress)
        if not self.spec.maxmem:
            raise LabError("hotplug needs a GuestSpec with maxmem")
        if self.account is None or not self.account.memory_block_size:
            raise LabError("the guest's account has no memory block size (no memory hotplug?)")
        bs = self.account.memory_block_size
        nbytes = parse_size_mib(size) << 20
        if nbytes % bs:
            # mm/memory_hotplug.c check_hotplug_memory_range(): whole memory blocks only
            raise LabError(f"hotplug size {size} is not a multiple of the guest's memory block size ({bs >> 20}M)")
        mark = len(self.console_text())
        dimm = self._add_memory(nbytes, node)
        dev = dimm.id
        self.dimms.append(dimm)

        blocks = range(dimm.addr // bs, (dimm.end + bs - 1) // bs)
        if self.spec.hotplug_online == "offline":
            want = {"offline"}
        elif self.spec.hotplug_online:
            want = {"online"}
        else:  # the kernel's default policy: either, once every block is there
            want = {"online", "offline"}
        if timeout is None:
            timeout = hotplug_deadline(len(blocks), self.spec.memmap_on_memory)
        names = f"memory{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"memory{blocks[0]}"
        report(f"waiting up to {timeout:.0f}s for the guest's sysfs to show {names} "
               f"{'/'.join(sorted(want))} ({size} at {dimm.addr:#x})")
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            st = self.state()
            if st is not None and all(st.memory_blocks.get(b) in want for b in blocks) and (
                    dimm.device != virtiomem.DEVICE or virtiomem.settled(self)):
                break
            self._alive(f"during hotplug of {dev}")
            if time.monotonic() > deadline:
                seen = (f"its last state line (#{st.seq}) says {st.blocks_text(blocks)}" if st is not None
                        else "it wrote no state line at all"
                             + (f" to {self.state_log.name}" if self.spec.arch in STATE_DEVICE else ""))
                raise LabError(
                    f"guest {self.kernel.release}: {dev} ({size} at {dimm.addr:#x}): {names} not "
                    f"{'/'.join(sorted(want))} after {timeout:.0f}s; {seen}; last console lines:\n"
                    + "\n".join(self.console_tail(30))
                )
            time.sleep(0.2)
        # the full account /init prints after the change, for what the state line lacks
        # (node totals, iomem); a little longer for it, never in place of the state
        until = min(deadline, time.monotonic() + 30)
        while True:
            try:
                acc = parse_account(self.console_text()[mark:])
            except LabError:
                acc = None
            if acc is not None and all(acc.memory_blocks.get(b) in want for b in blocks):
                self.account = acc
                return
            if time.monotonic() > until:
                break
            time.sleep(0.2)
        report(f"note: the guest has not reprinted its account; memory blocks, MemTotal and hugepages "
               f"from its state line #{st.seq}")
        self.account = replace(self.account, memory_blocks=dict(st.memory_blocks), mem_total_kb=st.mem_total_kb,
                               nr_hugepages={kb: n for kb, (n, _) in st.hugepages.items()})

    def _add_memory(self, nbytes: int, node: int | None) -> Dimm:
        """Hot-add ``nbytes`` through QEMU: a new pc-dimm, or more of the virtio-mem device."""
        if arch_info(self.spec.arch).hotplug_device == virtiomem.DEVICE:
            addr, size, node = virtiomem.plug(self, nbytes, node)
            return Dimm(virtiomem.DEVICE_ID, virtiomem.MEMDEV_ID, addr, size, node, device=virtiomem.DEVICE)
        n = len(self.dimms)
        memdev, dev = f"ivm-hp-mem{n}", f"ivm-hp-dimm{n}"
        self.qmp("object-add", {"qom-type": "memory-backend-ram", "id": memdev, "size": nbytes})
        args: dict[str, Any] = {"driver": "pc-dimm", "id": dev, "memdev": memdev}
        if node is not None:
            args["node"] = node
        try:
            self.qmp("device_add", args)
        except LabError:
            with contextlib.suppress(LabError):
                self.qmp("object-del", id=memdev)
            raise
        found = [d.get("data", {}) for d in self.qmp("query-memory-devices")
                 if d.get("data", {}).get("id") == dev]
        if not found:
            raise LabError(f"QEMU does not list {dev} after device_add")
        return Dimm(dev, memdev, int(found[0]["addr"]), int(found[0]["size"]), found[0].get("node", node))

    def remove_request(self, dimm: Dimm) -> None:
        """Ask QEMU to take ``dimm`` back: device_del of a pc-dimm (the guest's ACPI eject
        follows), or the virtio-mem device's requested size lowered by its size."""
        if dimm.device == virtiomem.DEVICE:
            virtiomem.unplug_request(self, dimm)
        else:
            self.qmp("device_del", id=dimm.id)

    def _alive(self, during: str) -> None:
        rc = self.process.poll() if self.process is not None else None
        if rc is not None:
            raise LabError(f"QEMU exited (status {rc}) {during}: {self._qemu_log_tail()}\n"
                           + "\n".join(self.console_tail(30)))

    # -- lifecycle -----------------------------------------------------------------------------

    def _start(self, qemu: str, timeout: float | None, report) -> None:
        info = arch_info(self.spec.arch)
        self.argv = qemu_argv(
            self.spec, info, qemu, self.kernel.boot_image, self.initramfs,
            self.qmp_socket, self.control_socket, self.console_log,
        )
        (self.workdir / "qemu.cmd").write_text(shlex.join(self.argv) + "\n")
        for p in (self.console_log, self.state_log, self.qmp_socket, self.control_socket):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for n, f in zip(self.spec.nvdimms, nvdimm_files(self.spec, self.workdir)):
            with open(f, "wb") as fh:  # sparse, fresh: no info block from an earlier boot
                fh.truncate(parse_size_mib(n.size) << 20)
        if timeout is None:
            timeout = boot_deadline(self.spec)
        report(f"booting {self.kernel.release} ({self.spec.mem}, {self.spec.accel}); waiting up to "
               f"{timeout:.0f}s for its /init to report ready")
        start = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = start + timeout
        while True:
            text = self.console_text()
            if re.search(rf"^{MARK_READY}$", text, re.M):
                break
            rc = self.process.poll()
            if rc is not None:
                raise LabError(
                    f"QEMU exited (status {rc}) before the guest was ready: {self._qemu_log_tail()}\n"
                    + "\n".join(self.console_tail(30))
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"guest {self.kernel.release}: its /init did not report ready within {timeout:.0f}s "
                    f"(--timeout to wait longer); last console lines:\n"
                    + "\n".join(self.console_tail(30))
                )
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - start
        errors = [l for l in text.split("\n") if l.startswith(MARK_ERROR)]
        if errors:
            raise LabError(f"guest {self.kernel.release}: " + "; ".join(errors))
        self.account = parse_account(text)
        if self.spec.nvdimms:
            self.devdax = parse_devdax(text)
            for d in self.qmp("query-memory-devices"):
                data = d.get("data", {})
                if d.get("type") == "nvdimm" and str(data.get("id", "")).startswith("ivm-nvdimm"):
                    self.nvdimms.append(Dimm(data["id"], str(data.get("memdev", "")), int(data["addr"]),
                                             int(data["size"]), data.get("node"), device="nvdimm"))
            self.nvdimms.sort(key=lambda d: int(d.id[len("ivm-nvdimm"):]))
            want = sum(1 for n in self.spec.nvdimms if n.devdax_align is not None and not n.deferred)
            if len(self.devdax) != want:
                raise LabError(f"guest {self.kernel.release}: {len(self.devdax)} device-dax devices set up, "
                               f"{want} asked for; last console lines:\n" + "\n".join(self.console_tail(30)))
        if self.spec.la57 is not None and self.account.la57 != self.spec.la57:
            raise LabError(
                f"guest {self.kernel.release} runs with la57={self.account.la57}, "
                f"asked for la57={self.spec.la57}"
            )
        if self.spec.paging and self.account.mmu != self.spec.paging:
            raise LabError(f"guest {self.kernel.release} runs with mmu {self.account.mmu or '?'}, "
                           f"asked for {self.spec.paging}")
        report(f"guest {self.kernel.release} ready in {self.boot_seconds:.1f}s")

    def close(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(LabError, OSError):
                qmp_command(self.control_socket, "quit", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in (self.qmp_socket, self.control_socket, *nvdimm_files(self.spec, self.workdir)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def boot_guest(
    spec: GuestSpec,
    workdir: Path | str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    progress: Progress = None,
    kernel: DebianKernel | None = None,
) -> Iterator[Guest]:
    """Boot ``spec`` under QEMU; yields a :class:`Guest` once it printed IVM-READY.

    ``workdir`` receives console.log, qemu.log and qemu.cmd (a temporary directory, removed
    afterwards, if not given). QEMU is shut down on exit.
    """
    report = reporter(progress)
    info = arch_info(spec.arch)
    qemu = require_tool(info.qemu, info.qemu_package)
    if kernel is None:
        kernel = fetch_debian_kernel(spec.debian, spec.arch, progress=progress, flavour=spec.flavour)
    _check_nvdimms(spec)
    fw = info.nvdimm_firmware
    if spec.nvdimms and fw is not None and not os.path.exists(fw.path):
        raise LabError(f"NVDIMMs in {spec.arch} guests need the firmware {fw.path} (apt-get install {fw.package})")
    nv_modules = NVDIMM_MODULES if any(n.devdax_align is not None for n in spec.nvdimms) else ()
    if spec.maxmem and info.hotplug_device == virtiomem.DEVICE:
        nv_modules += (virtiomem.MODULE,)
    modules = kernel.ensure_modules(["qemu_fw_cfg", *nv_modules, *spec.extra_modules], progress=progress)
    # the host's busybox serves its own architecture; another one gets Debian's busybox-static
    busybox = fetch_busybox(spec.arch, kernel.suite, progress) if info.name != os.uname().machine else None
    initrd = build_initramfs(modules, devdax_script(spec) + spec.init_extra, busybox=busybox, progress=progress,
                             watch_memory=bool(spec.maxmem), state_device=STATE_DEVICE.get(spec.arch, "/dev/console"))

    own_workdir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="ivm-guest-")) if own_workdir else Path(workdir).absolute()
    wd.mkdir(parents=True, exist_ok=True)
    own_sockdir = len(str(wd / "qmp.sock")) > _SUN_PATH_MAX
    sockdir = Path(tempfile.mkdtemp(prefix="ivm-", dir="/tmp")) if own_sockdir else wd

    guest = Guest(spec, kernel, wd, sockdir)
    guest.initramfs = initrd
    try:
        guest._start(qemu, timeout, report)
        yield guest
    finally:
        guest.close()
        if own_sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)
        if own_workdir:
            shutil.rmtree(wd, ignore_errors=True)
