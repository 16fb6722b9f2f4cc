"""Pure pieces of the lab: no network, no QEMU."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from inspect_vmemmap.lab import LabError, parse_account
from inspect_vmemmap.lab.arch import ARCHES
from inspect_vmemmap.lab.debian import _depends, deb_filename, resolve_packages
from inspect_vmemmap.lab.guest import GuestSpec, kernel_cmdline, parse_size_mib, qemu_argv
from inspect_vmemmap.lab.initramfs import Cpio, make_init
from inspect_vmemmap.lab.modules import (
    build_modules_dep,
    module_depends,
    module_name,
    parse_modules_dep,
    resolve_modules,
    uncompressed_path,
)
from inspect_vmemmap.lab.sources import sources_list, uris_from_deb822, uris_from_one_line

MIRROR = "http://mirror.example/debian"
SECURITY = "http://mirror.example/debian-security"

DEB822 = f"""\
Types: deb
# a comment
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_sources_from_deb822():
    assert uris_from_deb822(DEB822, "bookworm") == [MIRROR]
    # Unknown codename: fall back to the stanza serving a main suite, never -security.
    assert uris_from_deb822(DEB822, None) == [MIRROR]
    assert uris_from_deb822(DEB822.replace("Types: deb\n# a comment", "Types: deb-src", 1), "bookworm") == []


def test_sources_from_one_line():
    text = f"""\
deb {SECURITY} bookworm-security main
deb [arch=amd64 signed-by=/x.gpg] {MIRROR} bookworm main contrib
# deb http://other.example/debian bookworm main
deb-src {MIRROR} bookworm main
"""
    assert uris_from_one_line(text, "bookworm") == [MIRROR]


def test_sources_list_line():
    assert sources_list([MIRROR], "sid") == (
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} sid main\n"
    )


def test_package_resolution():
    meta = {"Package": "linux-image-amd64",
            "Depends": "linux-image-6.1.0-50-amd64 (= 6.1.176-1)"}
    assert _depends(meta) == {"linux-image-6.1.0-50-amd64": "6.1.176-1"}
    old = {"Package": "linux-image-6.1.0-50-amd64",
           "Depends": "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"}
    assert resolve_packages(old, "amd64") == {
        "image": "linux-image-6.1.0-50-amd64", "modules": "linux-image-6.1.0-50-amd64"}
    new = {"Package": "linux-image-7.2.13+deb14-amd64",
           "Depends": "linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), "
                      "linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)"}
    assert resolve_packages(new, "amd64") == {
        "image": "linux-binary-7.2.13+deb14-amd64", "modules": "linux-modules-7.2.13+deb14-amd64"}
    assert deb_filename("p", "1:2.0-1", "amd64") == "p_1%3a2.0-1_amd64.deb"


MODULES_DEP = """\
kernel/drivers/firmware/qemu_fw_cfg.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/fs/fscache/fscache.ko.xz kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz
kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/some-thing.ko:
"""


def test_module_names():
    assert module_name("kernel/net/9p/9pnet_virtio.ko.xz") == "9pnet_virtio"
    assert module_name("kernel/drivers/some-thing.ko") == "some_thing"
    assert uncompressed_path("kernel/a/b.ko.zst") == "kernel/a/b.ko"


def test_resolve_modules_order():
    deps = parse_modules_dep(MODULES_DEP)
    order = resolve_modules(["qemu_fw_cfg", "9p", "9pnet_virtio", "some-thing"], deps)
    names = [module_name(p) for p in order]
    assert names[0] == "qemu_fw_cfg"
    assert len(names) == len(set(names)) == 9
    for before, after in [("netfs", "fscache"), ("fscache", "9p"), ("9pnet", "9p"),
                          ("9pnet", "9pnet_virtio"), ("virtio", "9pnet_virtio"),
                          ("virtio_ring", "9pnet_virtio")]:
        assert names.index(before) < names.index(after)


def test_resolve_modules_builtin_and_missing():
    deps = parse_modules_dep(MODULES_DEP)
    assert resolve_modules(["virtio_pci"], deps, builtin=["kernel/drivers/virtio/virtio_pci.ko"]) == []
    with pytest.raises(LabError, match="virtio_pci"):
        resolve_modules(["virtio_pci"], deps)


def test_build_modules_dep_roundtrip():
    direct = {
        "a": ("kernel/a.ko", ["b"]),
        "b": ("kernel/b.ko", ["c", "builtin_thing"]),
        "c": ("kernel/c.ko", []),
    }
    text = build_modules_dep(direct)
    assert "kernel/a.ko: kernel/b.ko kernel/c.ko\n" in text
    deps = parse_modules_dep(text)
    assert resolve_modules(["a"], deps) == ["kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]


def test_build_modules_dep_cycle():
    with pytest.raises(LabError, match="cycle"):
        build_modules_dep({"a": ("a.ko", ["b"]), "b": ("b.ko", ["a"])})


def _tiny_elf_with_modinfo(modinfo: bytes) -> bytes:
    """An ELF64 relocatable with sections: null, .modinfo, .shstrtab."""
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + shstrtab
    shoff = 64 + len(body)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def sh(name, off, size):
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)

    shdrs = sh(0, 0, 0) + sh(1, 64, len(modinfo)) + sh(10, 64 + len(modinfo), len(shstrtab))
    return ehdr + body + shdrs


def test_module_depends_from_modinfo():
    elf = _tiny_elf_with_modinfo(b"license=GPL\0depends=9pnet,virtio-ring\0name=x\0")
    assert module_depends(elf) == ["9pnet", "virtio_ring"]
    assert module_depends(_tiny_elf_with_modinfo(b"depends=\0")) == []


CONSOLE = """\
[    1.234] Run /init as init process
IVM-ACCOUNT-BEGIN\r
@@ uname-r
6.1.0-50-amd64
@@ cmdline
console=ttyS0 panic=-1 hugepages=16 hugetlb_free_vmemmap=on
@@ meminfo
MemTotal:         982184 kB
MemFree:          900000 kB
HugePages_Total:      16
HugePages_Free:       15
Hugepagesize:       2048 kB
@@ cpuinfo-flags
flags\t\t: fpu vme de pse la57 rdpid
@@ nodes
node0
node1
@@ node-meminfo node0
Node 0 MemTotal:         491520 kB
Node 0 MemFree:          400000 kB
@@ node-meminfo node1
Node 1 MemTotal:         490664 kB
@@ node-memory-blocks node0
memory0
memory1
@@ node-memory-blocks node1
memory7
@@ memory-block-size
8000000
@@ memory-blocks
memory0 online
memory1 online
memory7 offline
@@ iomem
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-3ffdffff : System RAM
100000000-17fffffff : PCI Bus 0000:00
@@ hugepages
hugepages-1048576kB 0
hugepages-2048kB 16
IVM-ACCOUNT-END
IVM-READY
"""


def test_parse_account():
    a = parse_account(CONSOLE)
    assert a.release == "6.1.0-50-amd64"
    assert a.cmdline.endswith("hugetlb_free_vmemmap=on")
    assert (a.mem_total_kb, a.hugepages_total, a.hugepages_free, a.hugepage_size_kb) == (982184, 16, 15, 2048)
    assert a.nodes == [0, 1]
    assert a.node_mem_total_kb == {0: 491520, 1: 490664}
    assert a.memory_block_size == 128 << 20
    assert a.memory_blocks == {0: "online", 1: "online", 7: "offline"}
    assert a.node_memory_blocks == {0: [0, 1], 1: [7]}
    assert a.iomem[1] == (0x1000, 0x9FBFF, "System RAM")
    assert a.iomem_ranges("System RAM") == [(0x1000, 0x9FBFF), (0x100000, 0x3FFDFFFF)]
    assert a.iomem[-1] == (0x100000000, 0x17FFFFFFF, "PCI Bus 0000:00")
    assert a.nr_hugepages == {1048576: 0, 2048: 16}
    assert a.la57 is True


def test_parse_account_missing():
    with pytest.raises(LabError):
        parse_account("no markers here\n")


def test_qemu_argv_numa_and_la57():
    spec = GuestSpec(debian="6.12", mem="1G", numa=2, la57=False, hugepages=4, hvo=True)
    info = ARCHES["x86_64"]
    argv = qemu_argv(spec, info, "qemu", "vmlinuz", "initrd", "q.sock", "c.sock", "con.log")
    assert argv[argv.index("-cpu") + 1] == "max,la57=off"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "memory-backend-ram,id=m0,size=512M" in argv
    assert "node,nodeid=1,memdev=m1,cpus=1" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert kernel_cmdline(spec, info) == "console=ttyS0 panic=-1 hugepages=4 hugetlb_free_vmemmap=on"
    assert parse_size_mib("1.5G") == 1536
    with pytest.raises(LabError):
        parse_size_mib("lots")


def test_init_script_and_cpio():
    init = make_init(["/lib/modules/00-qemu_fw_cfg.ko"], init_extra="mount -t 9p x /mnt")
    assert init.startswith("#!/bin/busybox sh\n")
    assert init.index("insmod /lib/modules/00-qemu_fw_cfg.ko") < init.index("mount -t 9p")
    assert init.index("mount -t 9p") < init.index("IVM-ACCOUNT-BEGIN") < init.index("IVM-READY")
    c = Cpio()
    c.file("bin/busybox", b"\x7fELF", 0o755)
    c.symlink("bin/sh", "busybox")
    data = c.getvalue()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and len(data) % 512 == 0


def test_nvdimms_become_device_dax():
    from inspect_vmemmap.lab.guest import Nvdimm, devdax_script, parse_devdax

    spec = GuestSpec(debian="6.12", mem="1G", maxmem="8G", slots=4,
                     nvdimms=(Nvdimm("2G", devdax_align="1G"), Nvdimm("192M", location="dev"),
                              Nvdimm("64M", devdax_align=None)))
    argv = qemu_argv(spec, ARCHES["x86_64"], "qemu", "vmlinuz", "initrd", "q.sock", "c.sock", "/w/console.log")
    assert argv[argv.index("nvdimm=on") - 1] == "-machine"
    assert "memory-backend-file,id=ivm-nvm0,share=on,mem-path=/w/nvdimm0.img,size=2048M" in argv
    assert "nvdimm,id=ivm-nvdimm1,memdev=ivm-nvm1" in argv and "nvdimm,id=ivm-nvdimm2,memdev=ivm-nvm2" in argv
    assert argv[argv.index("-m") + 1] == "1024M,slots=4,maxmem=8192M"
    # sysfs: the region's dax seed gets uuid, align (bytes) and mode (ram: memmap in RAM,
    # pmem: on the device), claims the raw namespace and is bound to dax_pmem; the third
    # NVDIMM stays a raw namespace
    script = devdax_script(spec)
    assert "-f1) 1073741824 ram\n" in script and "-f2) 2097152 pmem\n" in script
    assert "-f3)" not in script and "sort -n" in script  # regions matched to NVDIMMs by address
    assert "/sys/bus/nd/drivers/dax_pmem/bind" in script
    assert devdax_script(GuestSpec()) == ""
    console = ("[    1.0] noise\nIVM-DEVDAX region0 0x100000000 2147483648 dax0.0 1073741824 ram 0x140000000 "
               "1073741824\nIVM-DEVDAX broken\n")
    d, = parse_devdax(console)
    assert (d.region, d.namespace_start, d.namespace_size, d.device) == ("region0", 4 << 30, 2 << 30, "dax0.0")
    assert (d.align, d.mode, d.data_start, d.data_size) == (1 << 30, "ram", 5 << 30, 1 << 30)
    for bad, why in ((dict(maxmem=None, slots=0), "maxmem"), (dict(maxmem="2G"), "less than"),
                     (dict(arch="riscv64"), "not in riscv64 guests"), (dict(nvdimms=(Nvdimm(devdax_align="4M"),)), "devdax_align"),
                     (dict(nvdimms=(Nvdimm(location="disk"),)), "location")):
        with pytest.raises(LabError, match=why):
            qemu_argv(replace(spec, **bad), ARCHES["x86_64"], "qemu", "k", "i", "q", "c", "/w/c.log")
