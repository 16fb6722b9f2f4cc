"""The lab's ``--then`` steps without a guest: what boot asks of the guest for them, how a
step the kernel did not fully do is said, and that watch opens the running kernel again
after memory hotplug (a /proc/kcore opened before it has no segment for the new memory)."""

from __future__ import annotations

from types import SimpleNamespace

from inspect_vmemmap.lab.boot import BootOptions, guest_spec
from inspect_vmemmap.lab.guest import kernel_cmdline
from inspect_vmemmap.lab.arch import arch_info
from inspect_vmemmap.lab.watching import Step, memmap_in_ram, ospm_said, shortfall
from inspect_vmemmap.live.events import Tracker
from inspect_vmemmap.live.probes import select
from inspect_vmemmap.live.watch import Watcher
from tests.unit.test_watch import K612, E, R


def test_unplug_onlines_to_zone_movable_and_mom_with_a_then_hotplug():
    spec = guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, memmap_on_memory=True,
                                  then=("hotplug=1G", "unplug")), "x86_64")
    assert (spec.maxmem, spec.slots, spec.hotplug_online, spec.memmap_on_memory) == ("2G", 1, "online_movable", True)
    line = kernel_cmdline(spec, arch_info("x86_64"))
    assert "memhp_default_state=online_movable" in line and "memory_hotplug.memmap_on_memory=1" in line
    # without an unplug step the kernel's own online policy of the lab stays
    spec = guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, then=("hotplug=1G",)), "x86_64")
    assert spec.hotplug_online == "online"


def test_a_devdax_step_boots_with_a_raw_nvdimm_of_its_size():
    from inspect_vmemmap.lab.guest import Nvdimm, devdax_script
    from inspect_vmemmap.lab.inguest import init_script

    spec = guest_spec(BootOptions(debian="6.12", mem="1G", in_guest=True, watch=True,
                                  then=("hotplug=1G", "devdax=512M", "unplug")), "x86_64")
    # a slot and room in the hotplug area for the DIMM and the NVDIMM
    assert (spec.maxmem, spec.slots) == ("2560M", 2)
    assert spec.nvdimms == (Nvdimm("512M", devdax_align="2M", deferred=True),)
    # /init defines ivm_devdax and the regions but makes no device of a deferred NVDIMM; the
    # request line's devdax does, for the step
    script = devdax_script(spec)
    assert "ivm_devdax() {" in script and "ivm_regions=" in script
    assert not [l for l in script.splitlines() if l.startswith("ivm_devdax ")]
    boot_made = devdax_script(guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True), "x86_64"))
    assert boot_made == ""
    assert "      devdax)" in init_script("x86_64")


def test_an_arm64_nvdimm_boots_through_edk2_with_acpi():
    from pathlib import Path

    from inspect_vmemmap.lab.guest import qemu_argv

    info = arch_info("aarch64")
    spec = guest_spec(BootOptions(debian="6.12", mem="1G", in_guest=True, watch=True, arch="aarch64",
                                  then=("hotplug=1G", "devdax=512M")), "aarch64")
    assert len(spec.nvdimms) == 1 and spec.maxmem == "2560M"
    argv = qemu_argv(spec, info, "qemu-system-aarch64", Path("Image"), Path("initrd"), Path("q"), Path("c"),
                     Path("/tmp/x/console.log"))
    assert argv[argv.index("-bios") + 1] == "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd" and "nvdimm=on" in argv
    assert "acpi=force" in kernel_cmdline(spec, info).split()
    # the virtio-mem region is what maxmem leaves beside the NVDIMM: the hot-add's 1G
    assert any(a.startswith("memory-backend-ram") and f"size={1 << 30}" in a for a in argv), argv
    # without an NVDIMM the arm64 guest boots as before: no firmware, its device tree
    plain = guest_spec(BootOptions(debian="6.12", mem="1G", in_guest=True, watch=True, arch="aarch64",
                                   then=("hotplug=1G",)), "aarch64")
    argv = qemu_argv(plain, info, "qemu-system-aarch64", Path("Image"), Path("initrd"), Path("q"), Path("c"),
                     Path("/tmp/x/console.log"))
    assert "-bios" not in argv and "acpi=force" not in kernel_cmdline(plain, info)


def test_a_devdax_step_is_refused_where_the_lab_has_no_nvdimm():
    import pytest

    from inspect_vmemmap.lab.boot import BootError

    with pytest.raises(BootError, match="no NVDIMM in riscv64 guests"):
        guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, then=("devdax=512M",)), "riscv64")
    with pytest.raises(BootError, match="2M alignment"):
        guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, then=("devdax=3M",)), "x86_64")


def test_a_run_time_1g_page_gets_a_free_gib_by_default():
    # one GiB the kernel boots in, one for the page, one above 4G (ZONE_NORMAL); the in-guest
    # headroom rounds it up to a fourth
    spec = guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, then=("hugepages-1g=1", "hugepages-1g=0")),
                      "x86_64")
    assert spec.mem == "4G" and "hugetlb_cma" not in kernel_cmdline(spec, arch_info("x86_64"))
    # and the kernel image out of that GiB: at 16M, not where KASLR would put it
    assert "nokaslr" in kernel_cmdline(spec, arch_info("x86_64")).split()
    spec = guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, cmdline="kaslr",
                                  then=("hugepages-1g=1",)), "x86_64")
    assert "nokaslr" not in kernel_cmdline(spec, arch_info("x86_64")).split()  # the user's choice stays
    spec = guest_spec(BootOptions(debian="6.12", in_guest=True, watch=True, then=("hugepages=8",)), "x86_64")
    assert "nokaslr" not in kernel_cmdline(spec, arch_info("x86_64")).split()
    # an explicit --mem is the user's: the kernel says what it could do
    spec = guest_spec(BootOptions(debian="6.12", mem="1G", in_guest=True, watch=True, then=("hugepages-1g=1",)),
                      "x86_64")
    assert spec.mem == "1G"


def test_shortfall_in_words():
    assert shortfall(Step("hugepages-1g", "1"), 1 << 20, 0, 1, 0, "") == ""
    said = shortfall(Step("hugepages-1g", "1"), 1 << 20, 0, 0, 0, "")
    assert "allocated 0 of the 1 1G pages" in said and "1G-aligned GiB" in said and said.endswith("the pool has 0")
    assert "no 1G hugepage pool" in shortfall(Step("hugepages-1g", "1"), 1 << 20, None, None, 1, "sh: can't create")
    assert "allocated 3 of the 8 2M pages" in shortfall(Step("hugepages", "12"), 2048, 4, 7, 0, "")
    assert shortfall(Step("hugepages", "0"), 2048, 4, 1, 0, "") == "the kernel freed the pool to 1, not 0 (pages in use stay)"
    assert "refused the write (sh: write error: Invalid argument)" in shortfall(
        Step("hugepages", "3"), 2048, 4, 4, 1, "sh: write error: Invalid argument")


def test_a_memmap_on_memory_dimm_with_its_memmap_in_ram_is_said_from_memtotal():
    g = 1 << 30
    # hosted: MemTotal grew by the DIMM less its 8 blocks' 2M of struct pages each
    assert memmap_in_ram(True, g, 4026348, 4026348 + (g >> 10) - 8 * 2048) == ""
    said = memmap_in_ram(True, g, 4026348, 4026348 + (g >> 10))
    assert said.startswith("the kernel put the DIMM's memmap in RAM, not on the DIMM (MemTotal grew by all of its 1048576 kB")
    assert "mhp_supports_memmap_on_memory()" in said
    # not asked for, or no account before: nothing to say
    assert memmap_in_ram(False, g, 4026348, 4026348 + (g >> 10)) == ""
    assert memmap_in_ram(True, g, None, 4026348) == ""


def test_a_stuck_unplug_says_what_the_guests_ospm_answered():
    def guest(reply):
        def qmp(cmd):
            assert cmd == "query-acpi-ospm-status"
            return reply
        return SimpleNamespace(qmp=qmp)

    d = "ivm-hp-dimm0"
    assert "never answered" in ospm_said(guest([]), d)
    assert "never answered" in ospm_said(guest([{"device": d, "slot": "0", "slot-type": "DIMM", "source": 0, "status": 0}]), d)
    said = ospm_said(guest([{"device": d, "slot": "0", "slot-type": "DIMM", "source": 3, "status": 0x82}]), d)
    assert "source 0x3, status 0x82 (device busy)" in said


def test_watch_opens_the_kernel_again_after_a_hotplug_event():
    probes, _ = select(K612.get, lambda fn: True)
    by = {p.function: p for p in probes}
    amr, onl, one = by["add_memory_resource"], by["online_pages"], by["__hugetlb_vmemmap_optimize_folio"]
    feed = [[E(one, 1, 3, 9, 0xffe7526a00000000), R(one, 2, 3)],
            [E(amr, 10, 7, 0, 1 << 32, (5 << 30) - 1), E(onl, 11, 7, 1 << 20, 32768), R(onl, 12, 7), R(amr, 13, 7)]]

    class Bt:
        def lines(self, timeout):
            return feed.pop(0) if feed else []

    opened = []
    first = SimpleNamespace(layout=None, name="first")
    w = Watcher(first, emit=lambda obj, what: None, reopen=lambda: opened.append(1) or SimpleNamespace(name="again"))
    w.bt, w.tracker, w.pending = Bt(), Tracker(probes), []
    w.pump()  # an HVO remap: the open kernel still sees all of its memory
    assert not w.stale and len(w.pending) == 1
    w.pump()  # a hot-add: read through a fresh open from now on
    assert w.stale and [c.probe.function for c in w.pending] == ["__hugetlb_vmemmap_optimize_folio", "add_memory_resource"]
    import inspect_vmemmap.commands as commands

    class NoAnalysis(Exception):
        pass

    def analysis(t):
        assert t.name == "again"
        raise NoAnalysis

    real = commands.Analysis
    commands.Analysis = analysis
    try:
        try:
            w.read()
        except NoAnalysis:
            pass
    finally:
        commands.Analysis = real
    assert opened == [1] and w.t.name == "again" and not w.stale


def test_a_devdax_step_says_the_guests_account_or_the_kernels_refusal():
    from inspect_vmemmap.lab.guest import Dimm, Nvdimm
    from inspect_vmemmap.lab.inguest import InGuestResult
    from inspect_vmemmap.lab.watching import devdax

    account = "IVM-ACCOUNT-BEGIN\nIVM-ACCOUNT-END\n"
    spec = SimpleNamespace(nvdimms=(Nvdimm("512M", devdax_align="2M", deferred=True),))
    nv = Dimm("ivm-nvdimm0", "/objects/ivm-nvm0", 4 << 30, 512 << 20, 0, device="nvdimm")

    def guest():
        return SimpleNamespace(spec=spec, nvdimms=[nv], devdax=[], account=None)

    class Chan:
        def __init__(self, res):
            self.res, self.asked = res, []

        def devdax(self, index, align, mode, timeout, alive):
            self.asked.append((index, align, mode))
            return self.res

    # the guest's IVM-DEVDAX line (sysfs numbers), as guest.devdax_script prints it
    line = "IVM-DEVDAX region0 0x100000000 536870912 dax0.0 2097152 ram 0x100200000 534773760\n"
    g, chan = guest(), Chan(InGuestResult(0, line + account, "", 0.5))
    out = devdax(g, chan, 0, 60, None)
    assert chan.asked == [(0, 2 << 20, "ram")] and len(g.devdax) == 1
    assert out == {"nvdimm": {"id": "ivm-nvdimm0", "addr": "0x100000000", "size": 512 << 20, "node": 0, "device": "nvdimm"},
                   "devdax": {"device": "dax0.0", "region": "region0", "align": 2 << 20, "mode": "ram",
                              "namespace_start": "0x100000000", "namespace_size": 512 << 20,
                              "data_start": "0x100200000", "data_size": 534773760}}
    # the kernel refused a write: its words (ivm_devdax's fail line), and no device
    g = guest()
    err = "devdax: align 2097152 of /sys/bus/nd/devices/dax0.0, supported: 4096 (dmesg: ...)\n"
    out = devdax(g, Chan(InGuestResult(1, account, err, 0.5)), 0, 60, None)
    assert out["short"].startswith("the guest did not make it device-dax: align 2097152") and not g.devdax
