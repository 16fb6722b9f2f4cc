"""What a run can reuse from an earlier run on the same kernel build (issue 18).

Without DWARF, opening a kernel costs more than checking it: drgn's kallsyms loader
decodes every kernel symbol to find the two that bound the kernel's BTF, and the BTF
(megabytes of it, read from kernel memory) is parsed to answer a few dozen questions
(``sizeof("struct page")``, ``offsetof("struct zone", "zone_start_pfn")``...). Both are
facts of the kernel *build*: the same build ID has the same BTF and the same symbols,
moved as one by KASLR. So the answers a run gave are written, keyed by the build ID
VMCOREINFO carries (``BUILD-ID=``, v5.13+: kernel/vmcore_info.c, crash_core.c before it,
VMCOREINFO_BUILD_ID()), to ``${XDG_CACHE_HOME:-~/.cache}/inspect-vmemmap/kernels/``
(``$INSPECT_VMEMMAP_CACHE/kernels`` where that is set), and a later run answers from them:
:class:`RecordedTypes` and :class:`RecordedSymbols` answer what the record holds and
load the real thing (the caller's ``load``) on the first question it lacks, recording
that answer too. Symbols are kept relative to ``_stext`` (VMCOREINFO's SYMBOL(_stext),
which carries the boot's KASLR offset), never as absolute addresses.

A record is used only when its build ID, kernel release and format match; anything
else (unreadable, corrupt, another kernel's, another format) is ignored without a word
and replaced by this run's. Records are written only from a running kernel (live or a
QEMU guest), whose BTF and kallsyms are what the kernel itself runs with; a crash dump
reads them but never writes one, so a damaged dump cannot teach the cache wrong answers
for its build. A kernel without BTF is not recorded as such (a dump may only have lost it). ``INSPECT_VMEMMAP_NO_CACHE`` (any non-empty value) turns the
cache off. Nothing here imports drgn.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

FORMAT = 1
_BUILD_ID = re.compile(r"^[0-9a-f]{8,128}$")


def cache_dir() -> Optional[Path]:
    """Where records live, or None when the cache is off."""
    if os.environ.get("INSPECT_VMEMMAP_NO_CACHE"):
        return None
    env = os.environ.get("INSPECT_VMEMMAP_CACHE")
    if env:
        return Path(env).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "inspect-vmemmap" / "kernels"


class _Missing(Exception):
    """The record has no answer for this question."""


class KernelRecord:
    """The reusable answers for one kernel build: type questions and symbol offsets.

    Plain data with one side effect, :meth:`save`, which the opener calls when the run ends.
    """

    def __init__(self, build_id: str, release: str, path: Optional[Path], types: Optional[dict] = None,
                 symbols: Optional[dict] = None) -> None:
        self.build_id = build_id
        self.release = release
        self.path = path
        #: question key -> ["ok", value] or ["KeyError", message]
        self.types: Dict[str, list] = dict(types or {})
        #: symbol name -> offset from _stext, or None (the kernel has no such symbol)
        self.symbols: Dict[str, Optional[int]] = dict(symbols or {})
        #: whether the kernel has type information (BTF); None: not known (never recorded False)
        self.has_types: Optional[bool] = None
        self.dirty = False
        #: whether :meth:`save` writes (a running kernel's record; see the module's doc)
        self.writable = True

    @classmethod
    def open(cls, build_id: Optional[str], release: str) -> Optional["KernelRecord"]:
        """The record for ``build_id`` (an empty one when there is none or it is unusable),
        or None when the cache is off or the kernel has no build ID."""
        if not build_id or not _BUILD_ID.match(build_id.lower()):
            return None
        d = cache_dir()
        if d is None:
            return None
        path = d / f"{build_id.lower()}.json"
        rec = cls(build_id.lower(), release, path)
        try:
            doc = json.loads(path.read_text())
            if (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("build_id") == rec.build_id
                    and doc.get("release") == release and isinstance(doc.get("types"), dict)
                    and isinstance(doc.get("symbols"), dict)
                    and all(_valid_answer(v) for v in doc["types"].values())
                    and all(v is None or isinstance(v, int) for v in doc["symbols"].values())
                    and doc.get("has_types") is True):
                rec.types, rec.symbols, rec.has_types = doc["types"], doc["symbols"], doc["has_types"]
        except (OSError, ValueError, UnicodeDecodeError, TypeError, AttributeError):
            pass  # none yet, or not ours: this run writes a new one
        return rec

    def save(self) -> None:
        """Write the record where it belongs (atomically) if this run added to it; a cache
        that cannot be written is no error."""
        if not self.dirty or not self.writable or self.path is None or not self.has_types:
            return
        doc = {"format": FORMAT, "build_id": self.build_id, "release": self.release,
               "has_types": bool(self.has_types), "types": self.types, "symbols": self.symbols}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".rec-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


def _valid_answer(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and v[0] in ("ok", "KeyError")


def _key(method: str, args: tuple, kwargs: dict) -> str:
    return json.dumps([method, list(args), sorted(kwargs.items())])


class RecordedTypes:
    """The :class:`inspect_vmemmap.memory.Types` interface answered from a record, the real
    type information (``load()``: a Btf, or None where the kernel has none) loaded on the
    first question the record does not hold. Other attributes go to the real thing."""

    source = "btf"
    _METHODS = ("sizeof", "offsetof", "member_size", "has_member", "enum_value", "enumerators")

    def __init__(self, record: KernelRecord, load: Callable[[], object], real=None) -> None:
        self._record = record
        self._load = load
        self._real = real
        self._loaded = real is not None

    def real(self):
        """The real type information (loaded now if it was not), or None."""
        if not self._loaded:
            self._real = self._load()
            self._loaded = True
        return self._real

    def _ask(self, method: str, *args, **kwargs):
        key = _key(method, args, kwargs)
        hit = self._record.types.get(key)
        if hit is None:
            real = self.real()
            if real is None:
                raise KeyError(args[0] if args else method)
            try:
                value = getattr(real, method)(*args, **kwargs)
                hit = ["ok", value]
            except KeyError as e:
                if type(e) is not KeyError:  # a damaged type (btf.DamagedType): not a fact to keep
                    raise
                hit = ["KeyError", str(e.args[0]) if e.args else ""]
            try:
                json.dumps(hit)
            except (TypeError, ValueError):
                return value
            self._record.types[key] = hit
            self._record.dirty = True
        if hit[0] == "KeyError":
            raise KeyError(hit[1])
        return hit[1]

    def sizeof(self, name):
        return self._ask("sizeof", name)

    def offsetof(self, name, member):
        return self._ask("offsetof", name, member)

    def member_size(self, name, member):
        return self._ask("member_size", name, member)

    def has_member(self, name, member):
        return self._ask("has_member", name, member)

    def enum_value(self, name):
        return self._ask("enum_value", name)

    def enumerators(self, enum_name=None, *, containing=None):
        return dict(self._ask("enumerators", enum_name, containing=containing))

    def __getattr__(self, name):
        real = self.real()
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)


def recorded_types(record: KernelRecord, load: Callable[[], object]):
    """The kernel's type information through ``record``: a :class:`RecordedTypes`, or None
    where the kernel has none. Where the record holds none yet, ``load()`` runs now."""
    if not record.has_types:
        real = load()
        if real is None:
            return None
        record.has_types = record.dirty = True
        return RecordedTypes(record, load, real)
    return RecordedTypes(record, load)


class SymbolsUnavailable(Exception):
    """The real symbol lookup cannot say (kallsyms did not load): nothing to record."""


class RecordedSymbols:
    """Symbol addresses answered from a record (offsets from this boot's ``_stext``),
    ``lookup(name)`` (the real symbol lookup, which may load kallsyms, and raises
    :class:`SymbolsUnavailable` when it cannot say) on a miss."""

    def __init__(self, record: KernelRecord, stext: int, lookup: Callable[[str], Optional[int]]) -> None:
        self._record = record
        self._stext = stext
        self._lookup = lookup

    def __call__(self, name: str) -> Optional[int]:
        syms = self._record.symbols
        if name in syms:
            off = syms[name]
            return None if off is None else self._stext + off
        try:
            addr = self._lookup(name)
        except SymbolsUnavailable:
            return None
        syms[name] = None if addr is None else addr - self._stext
        self._record.dirty = True
        return addr
