"""Kernel modules: names, decompression, ``.modinfo`` parsing and ``modules.dep`` handling.

Debian's kernel packages do not ship ``modules.dep`` (``depmod`` runs at install time), so the
lab writes its own from the ``depends=`` field of each module's ``.modinfo`` section, in the
same format as depmod's (``path: dep-path dep-path ...``, paths relative to the modules
directory).
"""

from __future__ import annotations

import gzip
import lzma
import re
import struct
import subprocess
from typing import Iterable, Mapping

from .cache import require_tool
from .errors import LabError

_KO_RE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def is_module_path(path: str) -> bool:
    return _KO_RE.search(path) is not None


def module_name(path: str) -> str:
    """``kernel/net/9p/9pnet_virtio.ko.xz`` -> ``9pnet_virtio`` (dashes become underscores)."""
    base = path.rsplit("/", 1)[-1]
    base = _KO_RE.sub("", base)
    return base.replace("-", "_")


def normalize_name(name: str) -> str:
    return name.strip().replace("-", "_")


def uncompressed_path(path: str) -> str:
    """``kernel/x/y.ko.xz`` -> ``kernel/x/y.ko``."""
    return _KO_RE.sub(".ko", path)


def decompress_module(data: bytes, path: str) -> bytes:
    """Return the plain ELF bytes of a module file named ``path`` (.ko, .ko.xz, .ko.zst, .ko.gz)."""
    if path.endswith(".ko"):
        return data
    if path.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.endswith(".ko.zst"):
        zstd = require_tool("zstd", "zstd")
        proc = subprocess.run([zstd, "-dc", "-q"], input=data, capture_output=True)
        if proc.returncode != 0:
            raise LabError(f"zstd failed on {path}: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    raise LabError(f"not a kernel module: {path}")


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    if data[:4] != b"\x7fELF":
        raise LabError("not an ELF file")
    ei_class, ei_data = data[4], data[5]
    end = "<" if ei_data == 1 else ">"
    if ei_class == 2:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        shdr = end + "IIQQQQIIQQ"
    elif ei_class == 1:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        shdr = end + "IIIIIIIIII"
    else:
        raise LabError("bad ELF class")

    def section(i: int) -> tuple[int, int, int]:
        f = struct.unpack_from(shdr, data, shoff + i * shentsize)
        return f[0], f[4], f[5]  # name offset, file offset, size

    _, str_off, str_size = section(shstrndx)
    strtab = data[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, off, size = section(i)
        name = strtab[name_off : strtab.index(b"\0", name_off)].decode()
        if name == wanted:
            return data[off : off + size]
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section of an (uncompressed) module: key -> list of values."""
    sec = _elf_section(data, ".modinfo")
    info: dict[str, list[str]] = {}
    if sec is None:
        return info
    for item in sec.split(b"\0"):
        if b"=" not in item:
            continue
        key, _, value = item.partition(b"=")
        info.setdefault(key.decode(errors="replace"), []).append(value.decode(errors="replace"))
    return info


def module_depends(data: bytes) -> list[str]:
    """Direct dependencies (module names) of an uncompressed module."""
    values = modinfo(data).get("depends", [])
    deps: list[str] = []
    for v in values:
        deps.extend(normalize_name(d) for d in v.split(",") if d.strip())
    return deps


# --- modules.dep -------------------------------------------------------------------------------

ModulesDep = dict[str, tuple[str, list[str]]]  # name -> (path, [dependency paths])


def parse_modules_dep(text: str) -> ModulesDep:
    """Parse depmod's ``modules.dep``: ``path: dep dep ...`` -> {name: (path, [dep paths])}."""
    result: ModulesDep = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, rest = line.partition(":")
        path = path.strip()
        result[module_name(path)] = (path, rest.split())
    return result


def build_modules_dep(direct: Mapping[str, tuple[str, list[str]]]) -> str:
    """Format ``modules.dep`` text from {name: (path, [direct dependency names])}.

    Like depmod, each line lists the full transitive closure, ordered so that loading the
    listed modules from last to first works. Unknown dependency names are dropped (they are
    built into the kernel or missing from the package).
    """
    lines = []
    for name in sorted(direct, key=lambda n: direct[n][0]):
        path, _ = direct[name]
        order = _toposort([name], lambda n: [d for d in direct[n][1] if d in direct])
        deps = [direct[n][0] for n in reversed(order) if n != name]
        lines.append(f"{path}:" + "".join(" " + d for d in deps))
    return "\n".join(lines) + "\n"


def _toposort(roots: Iterable[str], children) -> list[str]:
    """Post-order DFS: dependencies before dependents. Cycles raise LabError."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: str, chain: tuple[str, ...]) -> None:
        s = state.get(n)
        if s == 2:
            return
        if s == 1:
            raise LabError("module dependency cycle: " + " -> ".join(chain + (n,)))
        state[n] = 1
        for c in children(n):
            visit(c, chain + (n,))
        state[n] = 2
        order.append(n)

    for r in roots:
        visit(r, ())
    return order


def resolve_modules(
    names: Iterable[str], deps: ModulesDep, builtin: Iterable[str] = ()
) -> list[str]:
    """Module paths to insmod, in load order, for ``names`` and all their dependencies.

    Names listed in ``builtin`` (from ``modules.builtin``) are skipped; any other unknown
    name raises LabError.
    """
    builtin_set = {module_name(b) for b in builtin}
    wanted: list[str] = []
    for n in names:
        n = normalize_name(n)
        if n in deps:
            wanted.append(n)
        elif n not in builtin_set:
            raise LabError(f"kernel module {n} not found (not in modules.dep nor modules.builtin)")

    def children(n: str) -> list[str]:
        # Each listed dependency's own entry is consulted, so this works both for depmod's
        # transitive lists and for lists of direct dependencies only.
        return [module_name(p) for p in reversed(deps[n][1]) if module_name(p) in deps]

    return [deps[n][0] for n in _toposort(wanted, children)]


def parse_modules_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}
