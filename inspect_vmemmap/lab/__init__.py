"""The lab: real Debian kernels booted under QEMU, for tests that need crash dumps.

    kernel = fetch_debian_kernel("6.12")
    with boot_guest(GuestSpec(debian="6.1", mem="1G", hugepages=16, hvo=True, la57=True),
                    workdir=tmp_path) as guest:
        guest.account.hugepages_total
        core = guest.dump(tmp_path / "6.1.core")

Memory hotplug: a spec with ``maxmem`` (``slots``, ``hotplug_online``, ``memmap_on_memory``)
boots a guest that can take pc-dimms; ``guest.hotplug("1G", node=None)`` adds one and
returns once the guest has onlined it (``guest.dimms[-1]`` is where QEMU put it,
``guest.account`` the guest's account afterwards).

NVDIMMs: ``GuestSpec(maxmem=..., nvdimms=(Nvdimm("2G", devdax_align="1G"),))`` boots with
emulated NVDIMMs that /init turns into device-dax devices through sysfs (``location="dev"``
puts their memmap on the device); ``guest.nvdimms`` is where QEMU put them,
``guest.devdax`` the guest's own account of the dax devices.

Everything fails with :class:`LabError`. Artifacts are cached under
``$INSPECT_VMEMMAP_CACHE`` (default ``${XDG_CACHE_HOME:-~/.cache}/inspect-vmemmap``).
"""

from .account import GuestAccount, parse_account
from .arch import ARCHES, ArchInfo
from .cache import cache_root
from .debian import SERIES, DebianKernel, fetch_debian_kernel
from .errors import LabError
from .guest import DevDax, Dimm, Guest, GuestSpec, Nvdimm, boot_guest, kvm_usable
from .initramfs import build_initramfs
from .qmp import dump_vmcoreinfo, qmp_command

__all__ = [
    "ARCHES",
    "ArchInfo",
    "DebianKernel",
    "DevDax",
    "Dimm",
    "Guest",
    "GuestAccount",
    "GuestSpec",
    "LabError",
    "Nvdimm",
    "SERIES",
    "boot_guest",
    "build_initramfs",
    "cache_root",
    "dump_vmcoreinfo",
    "fetch_debian_kernel",
    "kvm_usable",
    "parse_account",
    "qmp_command",
]
