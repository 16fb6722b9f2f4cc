"""A Debian userland of another architecture, for running the tool inside a foreign guest.

``boot --in-guest`` on an x86_64 host runs the host's own Python in an x86_64 guest over a
read-only 9p root (:mod:`.inguest`). An arm64 or riscv64 guest cannot run that
interpreter, so the lab builds it a root of its own architecture from Debian packages:
python3, python3-drgn, python3-rich, python3-click (what ``check`` needs), bpftrace (what
``watch`` needs) and dash (``/bin/sh`` for the chroot), with their dependencies.

The packages are resolved and downloaded with the lab's private apt state of that suite
and architecture (:class:`.debian._Apt`, its lists shared with the kernel fetches) against
an empty dpkg status, so every dependency comes along, and unpacked with
``dpkg-deb --fsys-tarfile`` (no maintainer scripts run: none is needed to import Python
modules or run bpftrace). Nothing of it is executed on the host.

The root is built once, under ``<cache>/userland/<suite>-<deb arch>/``: in a temporary
directory next to it, renamed into place when complete, with ``userland.json`` (its
packages and versions, ``complete``) as the stamp. The guest mounts it read-only and the
project's source tree over a second 9p export at :data:`PROJECT_MOUNT`, and a third,
writable one for the byte code its Python compiles (:meth:`Userland.pycache_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .arch import arch_info
from .cache import Progress, atomic_write_text, cache_lock, cache_root, human_size, reporter, require_tool
from .errors import LabError

#: the Debian suite the userland comes from (trixie: python3 3.13, python3-drgn 0.0.31)
SUITE = "trixie"
#: what the guest runs, with their dependencies
PACKAGES = ("python3", "python3-drgn", "python3-rich", "python3-click", "bpftrace", "dash")
#: the interpreter, inside the userland
PYTHON = "/usr/bin/python3"
#: where the guest mounts the project's source tree inside the userland (on PYTHONPATH)
PROJECT_MOUNT = "/opt/inspect-vmemmap"
#: directories the guest mounts proc, sysfs, devtmpfs and its scratch tmpfs on
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run", PROJECT_MOUNT.lstrip("/"))
#: the merged /usr of Debian since bookworm (packages still ship some files under /bin, /lib)
USR_MERGE = ("bin", "sbin", "lib")
STAMP = "userland.json"
FORMAT = 1  # bump to rebuild every cached userland


@dataclass(frozen=True)
class Userland:
    root: Path  # on the host
    arch: str  # our name, e.g. "riscv64"
    suite: str
    python: str = PYTHON  # inside the root
    project_mount: str = PROJECT_MOUNT  # inside the root
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    def pycache_dir(self) -> Path:
        """Where the guest's Python keeps the byte code it compiles (PYTHONPYCACHEPREFIX),
        beside the read-only root: kept across boots, keyed by each source's path and mtime."""
        d = self.root.parent / f"{self.root.name}.pycache"
        d.mkdir(exist_ok=True)
        return d

    @property
    def packages(self) -> dict[str, str]:
        """{package: version} of everything unpacked into it."""
        return dict(self.meta.get("packages", {}))


def userland_dir(arch: str, suite: str = SUITE) -> Path:
    return cache_root() / "userland" / f"{suite}-{arch_info(arch).deb_arch}"


def _load(d: Path, arch: str, suite: str) -> Userland | None:
    try:
        meta = json.loads((d / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not (meta.get("complete") and meta.get("format") == FORMAT
            and set(PACKAGES) <= set(meta.get("requested", ()))
            and (d / PYTHON.lstrip("/")).exists()):
        return None
    return Userland(d, arch, suite, meta=meta)


def cached_userland(arch: str, suite: str = SUITE) -> Userland | None:
    """The complete userland for ``arch`` if it is in the cache, else None (no network)."""
    return _load(userland_dir(arch, suite), arch, suite)


def ensure_userland(arch: str, suite: str = SUITE, progress: Progress = None) -> Userland:
    """The userland of ``arch`` from the cache, built first if it is not there (downloads
    about 80 MB of packages; some 400 MB unpacked)."""
    report = reporter(progress)
    found = cached_userland(arch, suite)
    if found is not None:
        return found
    with cache_lock("userland-lock"):
        found = cached_userland(arch, suite)
        if found is not None:
            return found
        return _build(arch, suite, report)


def _build(arch: str, suite: str, report) -> Userland:
    from .debian import _Apt

    info = arch_info(arch)
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    tar = require_tool("tar", "tar")
    final = userland_dir(arch, suite)
    final.parent.mkdir(parents=True, exist_ok=True)
    apt = _Apt(cache_root(), suite, info.deb_arch, report)
    apt.ensure_lists()
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        dl = work / "debs"
        (dl / "partial").mkdir(parents=True)
        status = work / "status"
        status.write_text("")  # nothing installed: apt resolves every dependency
        opts = apt.opts() + ["-o", f"Dir::State::status={status}", "-o", f"Dir::Cache::archives={dl}",
                             "-o", "Debug::NoLocking=1"]
        report(f"building a {suite} {info.deb_arch} userland for in-guest runs ({', '.join(PACKAGES)})")
        t0 = time.monotonic()
        apt._run([apt.apt_get, *opts, "install", "-y", "--download-only", "--no-install-recommends", *PACKAGES])
        debs = sorted(dl.glob("*.deb"))
        if not debs:
            raise LabError(f"apt-get downloaded no packages for the {suite} {info.deb_arch} userland")
        report(f"unpacking {len(debs)} packages ({human_size(sum(d.stat().st_size for d in debs))})")
        root = work / "root"
        root.mkdir()
        (root / "usr").mkdir()
        for d in USR_MERGE:
            (root / "usr" / d).mkdir()
            (root / d).symlink_to(f"usr/{d}")
        packages: dict[str, str] = {}
        for deb in debs:
            _unpack(dpkg_deb, tar, deb, root)
            name, version = _name_version(dpkg_deb, deb)
            packages[name] = version
        for d in MOUNT_POINTS:
            (root / d).mkdir(parents=True, exist_ok=True)
        sh = root / "usr" / "bin" / "sh"
        if not (sh.exists() or sh.is_symlink()):
            sh.symlink_to("dash")  # what dash's maintainer script would set up
        if not (root / PYTHON.lstrip("/")).exists():
            raise LabError(f"the {suite} {info.deb_arch} userland has no {PYTHON}")
        meta = {"format": FORMAT, "suite": suite, "arch": arch, "deb_arch": info.deb_arch,
                "requested": list(PACKAGES), "packages": packages, "complete": True,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(root / STAMP, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.exists():  # an incomplete or outdated one: out of the way first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "root")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(root, final)
        report(f"userland ready in {time.monotonic() - t0:.0f}s: {final}")
        return Userland(final, arch, suite, meta=meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unpack(dpkg_deb: str, tar: str, deb: Path, root: Path) -> None:
    """Unpack the data of ``deb`` into ``root``, following the usr-merge symlinks there."""
    fsys = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    untar = subprocess.run([tar, "-x", "-C", str(root), "--keep-directory-symlink", "--no-same-owner"],
                           stdin=fsys.stdout, capture_output=True, text=True)
    fsys.stdout.close()
    err = fsys.stderr.read().decode(errors="replace").strip()
    fsys.stderr.close()
    if fsys.wait() != 0 or untar.returncode != 0:
        why = err or untar.stderr.strip()
        raise LabError(f"cannot unpack {deb.name}: {why.splitlines()[-1] if why else 'failed'}")


def _name_version(dpkg_deb: str, deb: Path) -> tuple[str, str]:
    out = subprocess.run([dpkg_deb, "-f", str(deb), "Package", "Version"], capture_output=True, text=True)
    fields = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    if out.returncode != 0 or "Package" not in fields:
        raise LabError(f"cannot read the control fields of {deb.name}")
    return fields["Package"], fields.get("Version", "")
