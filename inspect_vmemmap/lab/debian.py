"""Fetching Debian kernels (vmlinuz, debug vmlinux, a few modules) into the lab cache.

A private apt state per suite (``<cache>/apt/<suite>``) resolves ``linux-image-<flavour>`` to
the current kernel release and downloads the packages into ``<cache>/dl``. Only what the lab
needs is extracted into ``<cache>/kernels/<release>``; the big ``-dbg`` package is deleted once
its vmlinux is out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import modules as kmod
from .arch import arch_info
from .cache import (
    Progress,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    cache_lock,
    cache_root,
    human_size,
    reporter,
    require_tool,
)
from .errors import LabError
from .sources import DEBIAN_KEYRING, host_debian_uris, sources_list

# Kernel series -> Debian suite carrying it.
SERIES: dict[str, str] = {"6.1": "bookworm", "6.12": "trixie", "7.2": "sid"}

APT_LISTS_MAX_AGE = 24 * 3600

# Modules always extracted (with their dependencies) so most boots need no further extraction.
DEFAULT_MODULES = ("qemu_fw_cfg", "9p", "9pnet_virtio")
# Extra names kept during the first pass because they are likely dependencies of the above.
_LIKELY_DEPS = {"9pnet", "netfs", "fscache", "virtio", "virtio_ring", "cachefiles"}


@dataclass(frozen=True)
class DebianKernel:
    release: str  # e.g. "6.1.0-50-amd64" (uname -r)
    version: str  # Debian package version, e.g. "6.1.176-1"
    suite: str  # e.g. "bookworm"
    arch: str  # our arch name, e.g. "x86_64"
    vmlinuz: Path
    vmlinux: Path  # with DWARF debug info
    modules_dir: Path  # holds modules.dep and decompressed .ko files at their package paths
    series: str = ""  # e.g. "6.1"
    meta: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def dir(self) -> Path:
        return self.vmlinuz.parent

    @property
    def boot_image(self) -> Path:
        """The file QEMU's ``-kernel`` boots: ``vmlinuz``, or the ``Image`` unpacked from it
        when it is an EFI zboot image (arm64), which QEMU cannot load directly."""
        image = self.dir / "Image"
        return image if image.exists() else self.vmlinuz

    def modules_dep(self) -> kmod.ModulesDep:
        return kmod.parse_modules_dep((self.modules_dir / "modules.dep").read_text())

    def builtin_modules(self) -> set[str]:
        f = self.modules_dir / "modules.builtin"
        return kmod.parse_modules_builtin(f.read_text()) if f.exists() else set()

    def resolve_modules(self, names: Iterable[str]) -> list[str]:
        """Package-relative paths (as in modules.dep) to load, dependencies first."""
        return kmod.resolve_modules(names, self.modules_dep(), self.builtin_modules())

    def module_file(self, dep_path: str) -> Path:
        """Cached decompressed file for a modules.dep path (may not exist yet)."""
        return self.modules_dir / kmod.uncompressed_path(dep_path)

    def ensure_modules(self, names: Iterable[str], progress: Progress = None) -> list[Path]:
        """Decompressed module files for ``names`` plus dependencies, in load order.

        Extracts from the cached package (downloading it again if it was removed) if needed.
        """
        paths = self.resolve_modules(names)
        missing = [p for p in paths if not self.module_file(p).exists()]
        if missing:
            with cache_lock():
                missing = [p for p in paths if not self.module_file(p).exists()]
                if missing:
                    _extract_modules(self, set(missing), reporter(progress))
        return [self.module_file(p) for p in paths]


# --- private apt ----------------------------------------------------------------------------


class _Apt:
    def __init__(self, root: Path, suite: str, deb_arch: str, report):
        # one state per suite and architecture (amd64 keeps the plain suite name)
        self.dir = root / "apt" / (suite if deb_arch == "amd64" else f"{suite}-{deb_arch}")
        self.suite = suite
        self.deb_arch = deb_arch
        self.report = report
        self.apt_get = require_tool("apt-get", "apt")
        self.apt_cache = require_tool("apt-cache", "apt")

    def opts(self) -> list[str]:
        d = self.dir
        o = {
            "Dir::State::Lists": f"{d}/lists",
            "Dir::Cache": f"{d}",
            "Dir::Etc::SourceList": f"{d}/etc/sources.list",
            "Dir::Etc::SourceParts": "/nonexistent",
            "Dir::Etc::Preferences": "/nonexistent",
            "Dir::Etc::PreferencesParts": "/nonexistent",
            "Dir::State::status": f"{d}/status",
            "APT::Architecture": self.deb_arch,
            "APT::Architectures::": self.deb_arch,
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
        }
        if os.geteuid() == 0:
            # The cache is usually under a home directory the _apt user cannot enter.
            o["APT::Sandbox::User"] = "root"
        args: list[str] = ["-q"]
        for k, v in o.items():
            args += ["-o", f"{k}={v}"]
        return args

    def _run(self, argv: list[str], cwd: Path | None = None) -> str:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            raise LabError(f"{' '.join(argv[:1] + argv[-2:])} failed: {' | '.join(err[-3:])}")
        return proc.stdout

    def ensure_lists(self) -> None:
        stamp = self.dir / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < APT_LISTS_MAX_AGE:
            return
        if not Path(DEBIAN_KEYRING).exists():
            raise LabError(f"{DEBIAN_KEYRING} not found: apt-get install debian-archive-keyring")
        (self.dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.dir / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.dir / "etc").mkdir(parents=True, exist_ok=True)
        status = self.dir / "status"
        if not status.exists():
            status.write_text("")
        atomic_write_text(self.dir / "etc" / "sources.list", sources_list(host_debian_uris(), self.suite))
        self.report(f"updating package lists for {self.suite}")
        self._run([self.apt_get, *self.opts(), "update"])
        stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    def show(self, pkg: str) -> dict[str, str]:
        out = self._run([self.apt_cache, *self.opts(), "show", "--no-all-versions", pkg])
        fields: dict[str, str] = {}
        for line in out.splitlines():
            if not line.strip():
                break  # first stanza only
            if line[0] in " \t":
                continue
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
        if "Package" not in fields:
            raise LabError(f"package {pkg} not found in {self.suite}")
        return fields

    def download(self, pkg: str, version: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest_dir))
        try:
            self._run([self.apt_get, *self.opts(), "download", f"{pkg}={version}"], cwd=tmp)
            debs = list(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise LabError(f"apt-get download {pkg} produced {len(debs)} files")
            final = dest_dir / deb_filename(pkg, version, self.deb_arch)
            os.replace(debs[0], final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def deb_filename(pkg: str, version: str, deb_arch: str) -> str:
    return f"{pkg}_{version.replace(':', '%3a')}_{deb_arch}.deb"


_DEP_RE = re.compile(r"^\s*(\S+)\s*\(=\s*([^)]+)\)")


def _depends(fields: dict[str, str]) -> dict[str, str | None]:
    """Depends field -> {package: exact version or None} (first alternative of each)."""
    out: dict[str, str | None] = {}
    for item in fields.get("Depends", "").split(","):
        alt = item.split("|")[0].strip()
        if not alt:
            continue
        m = _DEP_RE.match(alt)
        if m:
            out[m.group(1)] = m.group(2).strip()
        else:
            out[alt.split()[0]] = None
    return out


def resolve_packages(image_fields: dict[str, str], flavour: str) -> dict[str, str]:
    """Given ``apt-cache show linux-image-<release>`` fields, name the packages holding the
    kernel image and the modules: {"image": pkg, "modules": pkg}.

    Older suites put both in linux-image-<release>; sid's linux-image-<release> is a meta
    package depending on linux-binary-<release> (vmlinuz) and linux-modules-<release>.
    """
    pkg = image_fields["Package"]
    release = pkg[len("linux-image-"):]
    deps = _depends(image_fields)
    binary = f"linux-binary-{release}"
    mods = f"linux-modules-{release}"
    return {
        "image": binary if binary in deps else pkg,
        "modules": mods if mods in deps else pkg,
    }


# --- cache layout ----------------------------------------------------------------------------


def _series_pointer(root: Path, arch: str, series: str, flavour: str = "") -> Path:
    info = arch_info(arch)
    name = series if not flavour or flavour == info.flavour else f"{series}+{flavour}"
    return root / "kernels" / "by-series" / arch / name


def _load_cached(root: Path, arch: str, series: str, flavour: str = "") -> DebianKernel | None:
    ptr = _series_pointer(root, arch, series, flavour)
    if not ptr.exists():
        return None
    release = ptr.read_text().strip()
    return _kernel_from_dir(root / "kernels" / release)


def _kernel_from_dir(kdir: Path) -> DebianKernel | None:
    meta_file = kdir / "kernel.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    k = _make_kernel(kdir, meta)
    if not (meta.get("complete") and k.vmlinuz.exists() and k.vmlinux.exists()
            and (k.modules_dir / "modules.dep").exists()):
        return None
    return k


def _make_kernel(kdir: Path, meta: dict) -> DebianKernel:
    return DebianKernel(
        release=meta["release"],
        version=meta["version"],
        suite=meta["suite"],
        arch=meta["arch"],
        vmlinuz=kdir / "vmlinuz",
        vmlinux=kdir / "vmlinux",
        modules_dir=kdir / "modules",
        series=meta.get("series", ""),
        meta=meta,
    )


def _save_meta(kdir: Path, meta: dict) -> None:
    atomic_write_text(kdir / "kernel.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


# --- fetching --------------------------------------------------------------------------------


def fetch_debian_kernel(
    debian: str, arch: str = "x86_64", progress: Progress = None, refresh: bool = False,
    flavour: str = "",
) -> DebianKernel:
    """Make sure the current Debian kernel of series ``debian`` ('6.1', '6.12', '7.2') is in
    the cache and return it.

    ``flavour``: the Debian kernel flavour (``linux-image-<flavour>``, e.g. ``arm64-16k``);
    empty for the architecture's default one.

    Once a kernel for the series is cached, no network access happens unless ``refresh``.
    """
    report = reporter(progress)
    info = arch_info(arch)
    if debian not in SERIES:
        raise LabError(f"unknown Debian kernel series {debian!r} (known: {', '.join(SERIES)})")
    flavour = flavour or info.flavour
    if info.flavours and flavour not in info.flavours:
        raise LabError(f"unknown {arch} kernel flavour {flavour!r} (known: {', '.join(info.flavours)})")
    suite = SERIES[debian]
    root = cache_root()

    if not refresh:
        cached = _load_cached(root, arch, debian, flavour)
        if cached is not None:
            return cached
    with cache_lock():
        if not refresh:
            cached = _load_cached(root, arch, debian, flavour)
            if cached is not None:
                return cached
        return _fetch(debian, suite, arch, info, root, report, flavour)


def _fetch(debian: str, suite: str, arch: str, info, root: Path, report, flavour: str = "") -> DebianKernel:
    require_tool("dpkg-deb", "dpkg")
    flavour = flavour or info.flavour
    apt = _Apt(root, suite, info.deb_arch, report)
    apt.ensure_lists()
    meta_pkg = apt.show(f"linux-image-{flavour}")
    candidates = [p for p in _depends(meta_pkg) if p.startswith("linux-image-")]
    if not candidates:
        raise LabError(f"linux-image-{flavour} in {suite} depends on no linux-image-*")
    image_fields = apt.show(candidates[0])
    image_pkg = image_fields["Package"]
    release = image_pkg[len("linux-image-"):]
    version = image_fields["Version"]
    if not (release.startswith(debian + ".") or release.startswith(debian + "-")):
        raise LabError(f"{suite} now carries kernel {release}, not {debian}.x; update lab.debian.SERIES")

    kdir = root / "kernels" / release
    existing = _kernel_from_dir(kdir)
    if existing is not None and existing.version == version:
        _point(root, arch, debian, release, flavour)
        return existing

    pkgs = resolve_packages(image_fields, flavour)
    dbg_pkg = f"{image_pkg}-dbg"
    dl = root / "dl"
    meta: dict = {}
    if (kdir / "kernel.json").exists():
        meta = json.loads((kdir / "kernel.json").read_text())
        if meta.get("version") != version:  # same release, new package version: start over
            report(f"replacing cached {release} {meta.get('version')} with {version}")
            shutil.rmtree(kdir)
            meta = {}
    meta.update(
        release=release, version=version, suite=suite, arch=arch, series=debian,
        deb_arch=info.deb_arch, flavour=flavour, image_package=pkgs["image"], modules_package=pkgs["modules"],
        dbg_package=dbg_pkg,
    )
    kdir.mkdir(parents=True, exist_ok=True)

    def get_deb(pkg: str) -> Path:
        path = dl / deb_filename(pkg, version, info.deb_arch)
        if path.exists():
            return path
        size = apt.show(f"{pkg}={version}").get("Size")
        report(f"fetching {pkg} ({human_size(int(size)) if size else '?'})")
        return apt.download(pkg, version, dl)

    # vmlinuz + modules.dep (+ default modules)
    if not ((kdir / "vmlinuz").exists() and (kdir / "modules" / "modules.dep").exists()):
        image_deb = get_deb(pkgs["image"])
        mods_deb = image_deb if pkgs["modules"] == pkgs["image"] else get_deb(pkgs["modules"])
        _extract_image(image_deb, mods_deb, release, kdir, meta, report)
        _save_meta(kdir, meta)
    if _unpack_zboot(kdir, meta, report):
        _save_meta(kdir, meta)

    # debug vmlinux (the -dbg package is deleted afterwards)
    leftover = dl / deb_filename(dbg_pkg, version, info.deb_arch)
    if meta.get("vmlinux_done") and (kdir / "vmlinux").exists():
        if leftover.exists():  # interrupted right before the removal
            leftover.unlink()
    else:
        dbg_deb = get_deb(dbg_pkg)
        _extract_vmlinux(dbg_deb, release, kdir, meta, report)
        meta["vmlinux_done"] = True
        _save_meta(kdir, meta)
        report(f"removing {dbg_deb.name}")
        dbg_deb.unlink()

    meta["complete"] = True
    _save_meta(kdir, meta)
    kernel = _make_kernel(kdir, meta)
    paths = kernel.resolve_modules(DEFAULT_MODULES)
    missing = {p for p in paths if not kernel.module_file(p).exists()}
    if missing:
        _extract_modules(kernel, missing, report)
    _point(root, arch, debian, release, flavour)
    return kernel


def _point(root: Path, arch: str, series: str, release: str, flavour: str = "") -> None:
    atomic_write_text(_series_pointer(root, arch, series, flavour), release + "\n")


# --- EFI zboot ------------------------------------------------------------------------------


def parse_zboot_header(head: bytes) -> tuple[int, int, str] | None:
    """The EFI zboot header (drivers/firmware/efi/libstub/zboot-header.S): ``MZ``, the image
    type ``zimg`` at offset 4, the payload offset and size (little-endian u32) at 8 and 12,
    and the compression type (``gzip``, ``zstd``, ...; NUL-terminated) at 24.

    :return: ``(payload offset, payload size, compression type)``, or None if ``head`` is not
        a zboot image.
    """
    if len(head) < 0x38 or head[:2] != b"MZ" or head[4:8] != b"zimg":
        return None
    off = int.from_bytes(head[8:12], "little")
    size = int.from_bytes(head[12:16], "little")
    comp = head[24:0x38].split(b"\0", 1)[0].decode("ascii", "replace")
    return off, size, comp


def unpack_zboot(data: bytes) -> bytes | None:
    """The kernel Image inside an EFI zboot vmlinuz (None if ``data`` is not one).

    Makefile.zboot compresses with ``gzip`` or ``zstd22_with_size`` (zstd followed by a
    4-byte size that the header's payload size leaves out).
    """
    hdr = parse_zboot_header(data[:0x40])
    if hdr is None:
        return None
    off, size, comp = hdr
    payload = data[off:off + size]
    if len(payload) != size:
        raise LabError(f"EFI zboot payload ({off:#x}+{size:#x}) runs past the end of the file")
    if comp == "gzip":
        import zlib

        return zlib.decompressobj(wbits=31).decompress(payload)
    if comp == "zstd":
        zstd = require_tool("zstd", "zstd")
        proc = subprocess.run([zstd, "-dc"], input=payload, capture_output=True)
        if proc.returncode != 0:
            raise LabError(f"zstd could not unpack the EFI zboot payload: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    raise LabError(f"EFI zboot image compressed with {comp!r}: not supported (gzip, zstd)")


def _unpack_zboot(kdir: Path, meta: dict, report) -> bool:
    """Unpack ``kdir/vmlinuz`` into ``kdir/Image`` when it is an EFI zboot image (QEMU's
    ``-kernel`` takes a raw or gzipped arm64 Image, not a zboot PE).

    :return: whether it unpacked something.
    """
    vmlinuz = kdir / "vmlinuz"
    image = kdir / "Image"
    if image.exists() or not vmlinuz.exists():
        return False
    with open(vmlinuz, "rb") as f:
        hdr = parse_zboot_header(f.read(0x40))
    if hdr is None:
        return False
    data = unpack_zboot(vmlinuz.read_bytes())
    # arm64 Image header (Documentation/arch/arm64/booting.rst): "ARM\x64" at offset 56
    if data is None or data[56:60] != b"ARM\x64":
        raise LabError(f"{vmlinuz}: the EFI zboot payload is not an arm64 Image")
    report(f"unpacking the EFI zboot vmlinuz into Image ({human_size(len(data))})")
    atomic_write_bytes(image, data)
    meta["zboot"] = {"payload_offset": hdr[0], "payload_size": hdr[1], "compression": hdr[2]}
    return True


# --- busybox for the guest ---------------------------------------------------------------------


def fetch_busybox(arch: str, suite: str = "trixie", progress: Progress = None) -> Path:
    """A static busybox for ``arch`` (Debian's ``busybox-static``, fetched with the lab's private
    apt for that architecture), cached as ``<cache>/busybox/<deb_arch>/busybox``."""
    report = reporter(progress)
    info = arch_info(arch)
    root = cache_root()
    out = root / "busybox" / info.deb_arch / "busybox"
    if out.exists():
        return out
    require_tool("dpkg-deb", "dpkg")
    with cache_lock():
        if out.exists():
            return out
        apt = _Apt(root, suite, info.deb_arch, report)
        apt.ensure_lists()
        fields = apt.show("busybox-static")
        version = fields["Version"]
        deb = root / "dl" / deb_filename("busybox-static", version, info.deb_arch)
        if not deb.exists():
            report(f"fetching busybox-static {version} for {info.deb_arch}")
            deb = apt.download("busybox-static", version, root / "dl")
        with _deb_tar(deb) as tf:
            for m in tf:
                if m.isfile() and _member_path(m.name) in ("bin/busybox", "usr/bin/busybox"):
                    with atomic_path(out, 0o755) as tmp:
                        with tf.extractfile(m) as src, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    break
        if not out.exists():
            raise LabError(f"no busybox binary in {deb.name}")
        atomic_write_text(out.with_name("version"), version + "\n")
    return out


# --- extraction ------------------------------------------------------------------------------


@contextlib.contextmanager
def _deb_tar(deb: Path):
    """Stream the data tarball of ``deb`` (tarfile in ``r|`` mode)."""
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    proc = subprocess.Popen(
        [dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    finished = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            yield tf
        finished = True
    finally:
        if not finished or proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        rc = proc.wait()
        if finished and rc not in (0, -9):
            raise LabError(f"dpkg-deb --fsys-tarfile {deb.name} failed: {err}")


def _member_path(name: str) -> str:
    return name[2:] if name.startswith("./") else name.lstrip("/")


def _modules_prefix_re(release: str) -> re.Pattern:
    return re.compile(r"^(?:usr/)?lib/modules/" + re.escape(release) + r"/(.*)$")


def _vmlinuz_re(release: str) -> re.Pattern:
    r = re.escape(release)
    # riscv64 packages name the (uncompressed, EFI-stub) Image boot/vmlinux-<release>
    return re.compile(rf"^(?:boot/vmlinu[xz]-{r}|(?:usr/)?lib/modules/{r}/vmlinuz)$")


def _extract_image(image_deb: Path, mods_deb: Path, release: str, kdir: Path, meta: dict, report) -> None:
    """One pass over each package: vmlinuz, modules.builtin/order, modules.dep from .modinfo."""
    mdir = kdir / "modules"
    mdir.mkdir(parents=True, exist_ok=True)
    mod_re = _modules_prefix_re(release)
    vmlinuz_re = _vmlinuz_re(release)
    keep = set(DEFAULT_MODULES) | _LIKELY_DEPS
    direct: dict[str, tuple[str, list[str]]] = {}

    for deb in dict.fromkeys([image_deb, mods_deb]):
        report(f"extracting vmlinuz and module info from {deb.name}")
        with _deb_tar(deb) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                path = _member_path(m.name)
                if vmlinuz_re.match(path):
                    with atomic_path(kdir / "vmlinuz") as tmp:
                        with tf.extractfile(m) as src, open(tmp, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    meta["vmlinuz_path"] = f"{deb.name}:{path}"
                    continue
                mm = mod_re.match(path)
                if not mm:
                    continue
                rel = mm.group(1)
                if rel in ("modules.builtin", "modules.order"):
                    atomic_write_bytes(mdir / rel, tf.extractfile(m).read())
                    meta["modules_root"] = path[: -len(rel)].rstrip("/")
                elif kmod.is_module_path(rel):
                    meta["modules_root"] = path[: -len(rel)].rstrip("/")
                    plain = kmod.decompress_module(tf.extractfile(m).read(), rel)
                    name = kmod.module_name(rel)
                    direct[name] = (rel, kmod.module_depends(plain))
                    if name in keep:
                        atomic_write_bytes(mdir / kmod.uncompressed_path(rel), plain)

    if not (kdir / "vmlinuz").exists():
        raise LabError(f"no vmlinuz for {release} in {image_deb.name}")
    if not direct:
        raise LabError(f"no kernel modules for {release} in {mods_deb.name}")
    meta["modules_deb"] = mods_deb.name
    meta["module_count"] = len(direct)
    atomic_write_text(mdir / "modules.dep", kmod.build_modules_dep(direct))


def _extract_modules(kernel: DebianKernel, wanted: set[str], report) -> None:
    """Extract (and decompress) the modules at package-relative ``wanted`` paths."""
    meta = kernel.meta
    deb = cache_root() / "dl" / meta.get("modules_deb", "")
    if not deb.is_file():
        # The package was removed from the cache: fetch it again.
        info = arch_info(kernel.arch)
        apt = _Apt(cache_root(), kernel.suite, info.deb_arch, report)
        apt.ensure_lists()
        pkg = meta["modules_package"]
        report(f"fetching {pkg} again for modules {', '.join(sorted(kmod.module_name(w) for w in wanted))}")
        deb = apt.download(pkg, kernel.version, cache_root() / "dl")
    report(f"extracting {len(wanted)} module(s) from {deb.name}")
    mod_re = _modules_prefix_re(kernel.release)
    todo = set(wanted)
    with _deb_tar(deb) as tf:
        for m in tf:
            if not m.isfile():
                continue
            mm = mod_re.match(_member_path(m.name))
            if mm and mm.group(1) in todo:
                rel = mm.group(1)
                plain = kmod.decompress_module(tf.extractfile(m).read(), rel)
                atomic_write_bytes(kernel.module_file(rel), plain)
                todo.discard(rel)
                if not todo:
                    break
    if todo:
        raise LabError(f"modules not found in {deb.name}: {', '.join(sorted(todo))}")


def _dbg_vmlinux_candidates(deb: Path, release: str) -> dict[str, str | None]:
    """vmlinux paths in the -dbg package, from its md5sums control file: {path: md5}."""
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    proc = subprocess.run([dpkg_deb, "-I", str(deb), "md5sums"], capture_output=True, text=True)
    found: dict[str, str | None] = {}
    if proc.returncode == 0:
        for line in proc.stdout.splitlines():
            md5, _, path = line.strip().partition("  ")
            base = path.rsplit("/", 1)[-1]
            if path.startswith("usr/lib/debug/") and base in ("vmlinux", f"vmlinux-{release}"):
                found[path] = md5
    return found


def _extract_vmlinux(deb: Path, release: str, kdir: Path, meta: dict, report) -> None:
    candidates = _dbg_vmlinux_candidates(deb, release)
    r = re.escape(release)
    pattern = re.compile(
        rf"^usr/lib/debug/(?:boot/vmlinux-{r}|(?:usr/)?lib/modules/{r}/vmlinux|vmlinux-{r})$"
    )
    report(f"extracting vmlinux from {deb.name} ({human_size(deb.stat().st_size)})")
    with _deb_tar(deb) as tf:
        for m in tf:
            path = _member_path(m.name)
            if not m.isfile() or not (path in candidates or pattern.match(path)):
                continue
            md5 = hashlib.md5()
            with atomic_path(kdir / "vmlinux") as tmp:
                with tf.extractfile(m) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        md5.update(chunk)
                        dst.write(chunk)
                want = candidates.get(path)
                if want and md5.hexdigest() != want:
                    raise LabError(f"vmlinux from {deb.name} fails its md5sum")
            meta["vmlinux_path"] = f"{deb.name}:{path}"
            report(f"extracted {path} ({human_size(m.size)})")
            return
    raise LabError(f"no vmlinux for {release} in {deb.name}")
