"""Per-architecture facts: Debian names, QEMU binary and machine options.

Only x86_64 is implemented; the table is where aarch64 will go.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LabError


@dataclass(frozen=True)
class ArchInfo:
    name: str  # our name, e.g. "x86_64"
    deb_arch: str  # Debian architecture, e.g. "amd64"
    flavour: str  # Debian kernel flavour, e.g. "amd64" (linux-image-<flavour>)
    qemu: str  # QEMU system emulator binary
    qemu_package: str  # Debian package providing it
    console: str  # kernel console device for the first serial port
    machine_args: tuple[str, ...] = ()

    def cpu_arg(self, la57: bool | None) -> str:
        if self.name == "x86_64":
            return "max,la57=off" if la57 is False else "max"
        return "max"


ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo(
        name="x86_64",
        deb_arch="amd64",
        flavour="amd64",
        qemu="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        console="ttyS0",
    ),
    # "aarch64": ArchInfo("aarch64", "arm64", "arm64", "qemu-system-aarch64",
    #                     "qemu-system-arm", "ttyAMA0", ("-machine", "virt")),
}


def arch_info(arch: str) -> ArchInfo:
    try:
        return ARCHES[arch]
    except KeyError:
        raise LabError(f"unsupported arch {arch!r} (supported: {', '.join(ARCHES)})") from None
