"""Per-architecture facts: Debian names, QEMU binary and machine options.

x86_64 (pc, ``-cpu max``), aarch64 (``-M virt -cpu max,pauth-impdef=on``, TCG; Debian's 4K ``arm64``
and 16K ``arm64-16k`` flavours) and riscv64 (``-M virt -cpu rv64``, OpenSBI from QEMU's
default ``-bios``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LabError


@dataclass(frozen=True)
class AcpiFirmware:
    """The firmware that gives a guest's kernel QEMU's ACPI tables where the machine
    otherwise boots with a device tree, and the kernel parameter that makes it use them."""

    path: str  # the -bios image
    package: str  # the Debian package that ships it
    cmdline: str  # what the kernel needs to take ACPI over the device tree


@dataclass(frozen=True)
class ArchInfo:
    name: str  # our name, e.g. "x86_64"
    deb_arch: str  # Debian architecture, e.g. "amd64"
    flavour: str  # Debian kernel flavour, e.g. "amd64" (linux-image-<flavour>)
    qemu: str  # QEMU system emulator binary
    qemu_package: str  # Debian package providing it
    console: str  # kernel console device for the first serial port
    machine_args: tuple[str, ...] = ()
    flavours: tuple[str, ...] = ()  # every Debian flavour the lab boots (the first is the default)
    #: QEMU takes ``-device vmcoreinfo`` (so dump-guest-memory writes a VMCOREINFO note)
    vmcoreinfo_device: bool = True
    #: paging modes a guest can be asked for by name (riscv64: the kernel's own choice
    #: first), as /proc/cpuinfo's "mmu" line names them
    paging_modes: tuple[str, ...] = ()
    #: how the lab hot-adds memory: "pc-dimm" (ACPI), or "virtio-mem" where the kernel has no
    #: ACPI memory hotplug (lab/virtiomem.py says why)
    hotplug_device: str = "pc-dimm"
    #: NVDIMMs in this lab's guests of the architecture: QEMU describes them in ACPI (NFIT)
    #: only, which x86_64's pc always has
    nvdimms: bool = True
    #: where the machine boots with a device tree (arm64 virt), the firmware that brings
    #: ACPI for a guest with NVDIMMs
    nvdimm_firmware: AcpiFirmware | None = None

    def paging_cmdline(self, mode: str) -> str:
        """Kernel parameters that make the guest run in paging ``mode``."""
        if mode not in self.paging_modes:
            raise LabError(f"{self.name} guests have no paging mode {mode!r}"
                           + (f" (known: {', '.join(self.paging_modes)})" if self.paging_modes else ""))
        if self.name == "riscv64":
            # arch/riscv/mm/init.c set_satp_mode(): Sv57 if the hart takes it, else Sv48,
            # else Sv39; "no5lvl" and "no4lvl" cap it (__pi_set_satp_mode_from_cmdline)
            return {"sv57": "", "sv48": "no5lvl", "sv39": "no4lvl"}[mode]
        return ""

    def cpu_arg(self, la57: bool | None, lpa2: bool | None = None) -> str:
        if self.name == "x86_64":
            return "max,la57=off" if la57 is False else "max"
        if self.name == "aarch64":
            # QEMU's TCG max CPU has FEAT_LPA2 (52-bit VA and PA with 4K/16K pages) since
            # 7.0; lpa2=off (target/arm/cpu64.c arm_cpu_lpa2_finalize) leaves a 48-bit CPU.
            # pauth-impdef=on: pointer authentication with QEMU's own hash instead of the
            # architected QARMA5, which TCG computes slowly and Debian's kernels run at every
            # signed return (CONFIG_ARM64_PTR_AUTH_KERNEL); nothing the tool reads depends on it.
            cpu = "max,pauth-impdef=on"
            return cpu + ",lpa2=off" if lpa2 is False else cpu
        if self.name == "riscv64":
            # QEMU 7.2's rv64 CPU has no satp-mode properties (sv39=, sv48=, sv57= came in
            # 8.0) and offers Sv57; the kernel's no5lvl/no4lvl pick a smaller mode.
            return "rv64"
        return "max"


ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo(
        name="x86_64",
        deb_arch="amd64",
        flavour="amd64",
        qemu="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        console="ttyS0",
        flavours=("amd64",),
    ),
    "aarch64": ArchInfo(
        name="aarch64",
        deb_arch="arm64",
        flavour="arm64",
        qemu="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        console="ttyAMA0",
        # virt: PL011 console, fw_cfg over MMIO (-device vmcoreinfo works), RAM from 1 GiB
        machine_args=("-machine", "virt"),
        flavours=("arm64", "arm64-16k"),
        # Debian's arm64 kernels have no CONFIG_ACPI_HOTPLUG_MEMORY: a pc-dimm is never seen
        hotplug_device="virtio-mem",
        # virt's ACPI tables (hw/arm/virt-acpi-build.c, NFIT with nvdimm=on) reach the kernel
        # through UEFI; with a device tree as well, arm64 takes ACPI only when told
        # (arch/arm64/kernel/acpi.c acpi_boot_table_init(): acpi=force)
        nvdimm_firmware=AcpiFirmware("/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", "qemu-efi-aarch64", "acpi=force"),
    ),
    "riscv64": ArchInfo(
        name="riscv64",
        deb_arch="riscv64",
        flavour="riscv64",
        qemu="qemu-system-riscv64",
        qemu_package="qemu-system-misc",
        console="ttyS0",
        # virt: NS16550 console, fw_cfg over MMIO (created after the devices, so
        # -device vmcoreinfo is refused), RAM from 2 GiB; OpenSBI is QEMU's default -bios
        machine_args=("-machine", "virt"),
        flavours=("riscv64",),
        vmcoreinfo_device=False,
        paging_modes=("sv57", "sv48", "sv39"),
        nvdimms=False,  # QEMU 7.2's riscv virt has no nvdimm=on
    ),
}


def arch_info(arch: str) -> ArchInfo:
    try:
        return ARCHES[arch]
    except KeyError:
        raise LabError(f"unsupported arch {arch!r} (supported: {', '.join(ARCHES)})") from None
