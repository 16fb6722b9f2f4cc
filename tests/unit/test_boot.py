"""Pure pieces of `boot` (inspect_vmemmap/lab/boot.py, inguest.py): no QEMU."""

from __future__ import annotations

import socket
import threading

import pytest

from inspect_vmemmap.lab import LabError
from inspect_vmemmap.lab import inguest
from inspect_vmemmap.lab.boot import BootError, BootOptions, guest_spec, image_arch, image_release
from inspect_vmemmap.lab.guest import kernel_cmdline
from inspect_vmemmap.lab.arch import arch_info


def _bzimage(tmp_path, version: bytes):
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x300).to_bytes(2, "little")  # string at 0x200 + 0x300
    head[0x500:0x500 + len(version)] = version
    p = tmp_path / "bzImage"
    p.write_bytes(bytes(head))
    return p


def test_image_arch_and_release(tmp_path):
    img = _bzimage(tmp_path, b"6.19.0-rc1-vmemmap+ (dev@box) #3 SMP\0")
    assert image_arch(img.read_bytes()) == "x86_64"
    assert image_release(img, None) == "6.19.0-rc1-vmemmap+"
    arm = bytearray(0x100)
    arm[0x38:0x3C] = b"ARM\x64"
    assert image_arch(bytes(arm)) == "aarch64"
    assert image_arch(b"\x7fELF" + b"\0" * 0x300) is None
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\0" * 100 + b"Linux version 6.20.0-x (gcc) #1\0")
    raw = tmp_path / "Image"
    raw.write_bytes(bytes(arm))
    assert image_release(raw, vmlinux) == "6.20.0-x"


def test_guest_spec_memory_and_cmdline():
    spec = guest_spec(BootOptions(debian="6.12", hugepages=4, hvo=True), "x86_64")
    assert spec.mem == "1G" and spec.hugepages == 4 and spec.hvo
    # 1G pages get free GiBs beside the one the kernel boots in
    spec = guest_spec(BootOptions(debian="7.2", hugepages_1g=2, cmdline="loglevel=7"), "x86_64")
    assert spec.mem == "4G"
    line = kernel_cmdline(spec, arch_info("x86_64"))
    assert line.endswith("hugepagesz=1G hugepages=2 loglevel=7")
    with pytest.raises(BootError, match="at least --mem 3G"):
        guest_spec(BootOptions(debian="7.2", mem="2G", hugepages_1g=1), "x86_64")
    spec = guest_spec(BootOptions(debian="6.12", hotplug=("1G", "512M"), memmap_on_memory=True), "x86_64")
    assert (spec.maxmem, spec.slots, spec.memmap_on_memory) == ("2560M", 2, True)
    with pytest.raises(BootError, match="x86_64"):
        guest_spec(BootOptions(debian="6.12", la57=True), "aarch64")


def test_in_guest_hooks():
    assert inguest.modules_for("x86_64", {"virtio_pci": 1, "9p": 1}) == ["virtio_pci", "9pnet_virtio", "9p"]
    assert inguest.modules_for("x86_64", {}) == ["9pnet_virtio", "9p"]
    args = " ".join(inguest.qemu_args("x86_64", "/tmp/x/req.sock"))
    assert "path=/,security_model=none,readonly=on" in args and "mount_tag=hostroot" in args
    assert "isa-serial,chardev=ivmreq" in args
    script = inguest.init_script("x86_64", "/venv/bin/python", "/src")
    assert "mount -t 9p -o ro,trans=virtio" in script
    for fs in ("proc", "sysfs", "devtmpfs", "tmpfs"):
        assert f"mount -t {fs} " in script
    assert "chroot /host /venv/bin/python -m inspect_vmemmap check" in script
    assert "PYTHONPATH=/src" in script and "/dev/ttyS1" in script


def _fake_guest(server: socket.socket, answer) -> threading.Thread:
    def run():
        conn, _ = server.accept()
        with conn:
            req = b""
            while not req.endswith(b"\n"):
                req += conn.recv(100)
            cmd, nonce, *args = req.decode().split()
            conn.sendall(answer(nonce, args).encode())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_channel_round_trip(tmp_path):
    path = tmp_path / "req.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer(nonce, args):
        assert args == ["--json", "--no-debuginfo"]
        # kernel-message-like noise and an earlier run's answer around the real one
        return (f"[ 12.3] noise\r\n{inguest.MARK_END} deadbeef 0\n\n{inguest.MARK_BEGIN} {nonce}\n"
                f'{{"a": 1}}\n\n{inguest.MARK_STDERR} {nonce}\nwarn\n\n{inguest.MARK_END} {nonce} 1\n')

    t = _fake_guest(server, answer)
    ch = inguest.Channel(path)
    res = ch.run_check(["--json", "--no-debuginfo"], timeout=10)
    ch.close()
    t.join(5)
    assert (res.status, res.stdout, res.stderr) == (1, '{"a": 1}\n', "warn\n")
    with pytest.raises(LabError, match="unsupported"):
        inguest.Channel(path).run_check(["; rm -rf /"], timeout=1)
    server.close()


def test_channel_timeout(tmp_path):
    path = tmp_path / "req.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    ch = inguest.Channel(path)
    with pytest.raises(LabError, match="did not answer within 1s"):
        ch.run_check([], timeout=1)
    ch.close()
    server.close()


def test_boot_prints_the_check_report(tmp_path, monkeypatch):
    """`boot` checked from the host prints `check`'s text report for the same target, then
    the guest's own account: here on the 6.12 device-dax fixture, whose report has the
    ZONE_DEVICE dedup and memmap-on-the-memory lines (a QMP target stands in for a dump)."""
    import io
    import lzma
    import shutil
    from pathlib import Path

    from click.testing import CliRunner
    from rich.console import Console

    from inspect_vmemmap import cli, source
    from inspect_vmemmap.lab import boot

    core = tmp_path / "core"
    fixture = Path(__file__).resolve().parent.parent.parent / "fixtures" / "6.12-devdax.core.xz"
    with lzma.open(fixture) as f, open(core, "wb") as out:
        shutil.copyfileobj(f, out)
    checked = CliRunner().invoke(cli.cli, ["check", "--core", str(core), "--no-debuginfo"])
    assert checked.exit_code == 0, checked.output

    open_target = source.open_target
    monkeypatch.setattr(source, "open_target", lambda **kw: open_target(core=str(core), no_debuginfo=True))
    monkeypatch.setattr(boot, "account_line", lambda guest: "the guest's own account")

    class Guest:
        qmp_socket = tmp_path / "qmp"

        def qmp(self, command: str) -> None:
            pass

    out = io.StringIO()
    status = boot._check_outside(BootOptions(debian="6.12", no_debuginfo=True), Guest(), None, lambda msg: None,
                                 lambda: Console(file=out, width=1000, no_color=True))
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines == checked.output.splitlines() + ["the guest's own account"]
    assert any(line.startswith("ZONE_DEVICE: 98 compound pages") for line in lines)
    assert any(line.startswith("memmap on the memory itself: 0 memory blocks") for line in lines)
