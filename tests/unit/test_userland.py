"""The foreign-architecture userland for in-guest runs (inspect_vmemmap/lab/userland.py)
and how inguest.py uses it: no QEMU, no apt."""

from __future__ import annotations

import json
from pathlib import Path

from inspect_vmemmap.lab import inguest, userland
from inspect_vmemmap.lab.guest import GuestSpec


def _fake(root: Path, **meta) -> Path:
    d = root / "userland" / "trixie-riscv64"
    (d / "usr" / "bin").mkdir(parents=True)
    (d / "usr" / "bin" / "python3").write_text("")
    m = {"format": userland.FORMAT, "complete": True, "requested": list(userland.PACKAGES),
         "packages": {"python3": "3.13.5-1", "python3-drgn": "0.0.31-1"}}
    m.update(meta)
    (d / userland.STAMP).write_text(json.dumps(m))
    return d


def test_cached_userland_needs_its_complete_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECT_VMEMMAP_CACHE", str(tmp_path))
    assert userland.cached_userland("riscv64") is None
    d = _fake(tmp_path)
    u = userland.cached_userland("riscv64")
    assert u.root == d and u.python == "/usr/bin/python3" and u.packages["python3-drgn"] == "0.0.31-1"
    assert userland.userland_dir("aarch64") == tmp_path / "userland" / "trixie-arm64"
    for i, bad in enumerate(({"complete": False}, {"format": userland.FORMAT + 1}, {"requested": ["python3"]})):
        monkeypatch.setenv("INSPECT_VMEMMAP_CACHE", str(tmp_path / str(i)))
        _fake(tmp_path / str(i), **bad)
        assert userland.cached_userland("riscv64") is None, bad
    monkeypatch.setenv("INSPECT_VMEMMAP_CACHE", str(tmp_path / "nopython"))
    (_fake(tmp_path / "nopython") / "usr" / "bin" / "python3").unlink()
    assert userland.cached_userland("riscv64") is None


def test_a_foreign_guest_mounts_its_userland_and_the_project(tmp_path):
    u = userland.Userland(tmp_path / "trixie-riscv64", "riscv64", "trixie")
    args = " ".join(inguest.qemu_args("riscv64", "/tmp/x/req.sock", userland=u))
    assert f"id=ivmroot,path={tmp_path}/trixie-riscv64,security_model=none,readonly=on" in args
    assert f"id=ivmpyc,path={tmp_path}/trixie-riscv64.pycache,security_model=none,multidevs" in args
    assert f"id=ivmproj,path={inguest.project_root()},security_model=none,readonly=on" in args
    assert f"mount_tag={inguest.PROJECT_TAG}" in args and "virtconsole,chardev=ivmreq" in args
    script = inguest.init_script("riscv64", userland=u)
    assert f"{inguest.PROJECT_TAG} /host/opt/inspect-vmemmap" in script
    assert "chroot /host /usr/bin/python3 -m inspect_vmemmap check" in script
    assert "PYTHONPATH=/opt/inspect-vmemmap" in script and "PYTHONPYCACHEPREFIX=/tmp/pycache" in script
    assert "/dev/hvc0" in script and "mount -t tmpfs -o mode=1777 tmpfs /host/tmp" in script
    assert f"{inguest.PYCACHE_TAG} /host/tmp/pycache" in script
    # the host's own root: one export, no project mount, no byte code written
    native = inguest.init_script("x86_64", "/venv/bin/python", Path("/src"))
    assert inguest.PROJECT_TAG not in native and "PYTHONDONTWRITEBYTECODE=1" in native
    assert inguest.PROJECT_TAG not in " ".join(inguest.qemu_args("x86_64", "/tmp/x/req.sock"))


def test_with_in_guest_adds_to_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("INSPECT_VMEMMAP_CACHE", str(tmp_path))
    _fake(tmp_path)

    class Kernel:
        def modules_dep(self):
            return {"virtio_pci": 1}

    spec = GuestSpec(debian="6.12", arch="riscv64", init_extra="echo hi\n", qemu_args=("-foo",))
    s = inguest.with_in_guest(spec, Kernel(), tmp_path / "req.sock")
    assert s.extra_modules == ("virtio_pci", "9pnet_virtio", "9p")
    assert s.init_extra.startswith("echo hi\n") and "chroot /host /usr/bin/python3" in s.init_extra
    assert s.qemu_args[0] == "-foo" and any("trixie-riscv64" in a for a in s.qemu_args)
