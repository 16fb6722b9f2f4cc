"""Every input opened with a bound (issue 15): files are looked at with stat() before
anything opens them (drgn's open of a FIFO blocks forever), a QMP socket is probed with
connect and reply timeouts before drgn is handed it, and an output path that is one of
the inputs is refused before anything is written.

Nothing here opens a file that is not known to be safe to open.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Iterable, List, Optional, Tuple

from inspect_vmemmap.errors import AnalysisError

#: seconds a QMP socket gets to accept, greet and answer (INSPECT_VMEMMAP_QMP_TIMEOUT)
QMP_TIMEOUT = 10.0

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: str, where: str, missing: str) -> os.stat_result:
    """``os.stat(path)``, or an AnalysisError ``"{where}: {missing}"`` / the OS's reason."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise AnalysisError(f"{where}: {missing}") from None
    except OSError as e:
        raise AnalysisError(f"{where}: {e.strerror}") from None


def require_regular_file(path: str, what: str, block_ok: bool = False) -> None:
    """Refuse ``path`` (given as ``what``, e.g. ``--core``) unless it is a readable
    regular file (or, with ``block_ok``, a block device holding a dump). /proc/kcore is
    a regular file.

    :raises AnalysisError: one line naming the option, the path and what it is.
    """
    st = _stat(path, f"{what} {path}", "no such file")
    if stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode)):
        if not os.access(path, os.R_OK):
            raise AnalysisError(f"{what} {path}: not readable (permission denied)")
        return
    raise AnalysisError(f"{what} {path}: is {_kind(st.st_mode)}, not a file")


def require_output_path(path: str, what: str, inputs: Iterable[Tuple[Optional[str], str]]) -> None:
    """Refuse an output ``path`` that is one of ``inputs`` (``(path, option)`` pairs) or
    that cannot be written without blocking or clobbering (a FIFO, a socket, a directory).

    :raises AnalysisError: one line.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise AnalysisError(f"{what} {path}: {e.strerror}") from None
    if st is not None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise AnalysisError(f"{what} {path}: is {_kind(st.st_mode)}; give a file to write")
    real = os.path.realpath(path)
    for other, option in inputs:
        if not other:
            continue
        same = real == os.path.realpath(other)
        if not same and st is not None:
            try:
                same = os.path.samefile(path, other)
            except OSError:
                same = False
        if same:
            raise AnalysisError(f"{what} {path} is the {option} input: refusing to overwrite it")


def qmp_timeout() -> float:
    try:
        v = float(os.environ.get("INSPECT_VMEMMAP_QMP_TIMEOUT", QMP_TIMEOUT))
    except ValueError:
        return QMP_TIMEOUT
    return v if 0 < v < 3600 else QMP_TIMEOUT


def probe_qmp(path: str, timeout: Optional[float] = None) -> None:
    """Connect to a QMP socket, read its greeting and negotiate capabilities, each within
    ``timeout`` seconds in all, then hang up (drgn connects afterwards). A socket that
    never accepts, accepts and stays silent, only greets, or answers something that is
    not QMP is refused instead of handed to drgn, which would wait forever.

    :raises AnalysisError: one line saying which step did not answer.
    """
    if timeout is None:
        timeout = qmp_timeout()
    what = f"--qemu {path}"
    st = _stat(path, what, "no such QMP socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise AnalysisError(f"{what}: is {_kind(st.st_mode)}, not a QMP socket")
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except socket.timeout:
            raise AnalysisError(f"{what}: the socket did not accept a connection within {timeout:g} s") from None
        except OSError as e:
            raise AnalysisError(f"{what}: cannot connect ({e.strerror or e})") from None
        buf = bytearray()

        def message(step: str) -> dict:
            while True:
                nl = buf.find(b"\n")
                if nl >= 0:
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        raise AnalysisError(f"{what}: not a QMP socket (it sent {line[:40]!r} {step})") from None
                    if not isinstance(msg, dict):
                        raise AnalysisError(f"{what}: not a QMP socket (it sent {line[:40]!r} {step})")
                    return msg
                if len(buf) > 1 << 20:
                    raise AnalysisError(f"{what}: not a QMP socket (over 1 MiB without a line {step})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AnalysisError(f"{what}: no answer {step} within {timeout:g} s "
                                        "(another client may hold the monitor)")
                s.settimeout(left)
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError as e:
                    raise AnalysisError(f"{what}: connection failed {step} ({e.strerror or e})") from None
                if not chunk:
                    raise AnalysisError(f"{what}: the socket hung up {step}")
                buf.extend(chunk)

        greeting = message("before its greeting")
        if "QMP" not in greeting:
            raise AnalysisError(f"{what}: not a QMP socket (its first message has no QMP greeting)")
        try:
            s.sendall(b'{"execute": "qmp_capabilities"}\n')
        except OSError as e:
            raise AnalysisError(f"{what}: connection failed after the greeting ({e.strerror or e})") from None
        while True:
            reply = message("to qmp_capabilities")
            if "return" in reply:
                return
            if "error" in reply:
                raise AnalysisError(f"{what}: QMP refused qmp_capabilities ({str(reply['error'])[:80]})")
            # an asynchronous event: keep reading until the deadline
    finally:
        s.close()


def require_possible(target):
    """The target, if the layout read from it is one a kernel can have (limits.layout_problem).

    :raises AnalysisError: one line naming the value, e.g. ``VMCOREINFO PAGESIZE=8192``.
    """
    from inspect_vmemmap.limits import layout_problem

    bad = layout_problem(target.layout)
    if bad is not None:
        key, value, why = bad
        raise AnalysisError(f"impossible kernel layout: {key}={value}: {why}")
    _same_release(target)
    return target


def _same_release(target) -> None:
    """VMCOREINFO's OSRELEASE against the release the kernel itself keeps in
    ``init_uts_ns.name.release`` (include/linux/utsname.h: struct new_utsname is sysname,
    nodename, release, ... of __NEW_UTS_LEN + 1 = 65 bytes each: release at 130), read through the
    VMCOREINFO entries kernel/vmcore_info.c writes for it (SYMBOL(init_uts_ns),
    OFFSET(uts_namespace.name)). A note that names another kernel is refused: the era
    rules it would select are not this kernel's.

    :raises AnalysisError: naming both releases.
    """
    from inspect_vmemmap.memory import FaultError

    info = getattr(target, "vmcoreinfo", None)
    if info is None:
        return
    said = info.get("OSRELEASE")
    uts = info.symbol("init_uts_ns")
    if not said or uts is None:
        return
    try:
        raw = target.memory.read(uts + (info.offset("uts_namespace.name") or 0) + 2 * 65, 65)
    except (FaultError, ValueError, OverflowError):
        return
    release = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if release and release != said:
        raise AnalysisError(f"VMCOREINFO OSRELEASE={said} is not this kernel: its init_uts_ns says {release}")


def check_target_inputs(core: Optional[str] = None, qemu: Optional[str] = None, vmlinux: Optional[str] = None,
                        vmcoreinfo: Optional[str] = None, **_) -> None:
    """The CLI's target options, each looked at before drgn opens it."""
    if core and qemu:
        raise AnalysisError("--core and --qemu are two different targets: give one")
    if core:
        require_regular_file(core, "--core", block_ok=True)
    if vmlinux:
        require_regular_file(vmlinux, "--vmlinux")
    if vmcoreinfo:
        require_regular_file(vmcoreinfo, "--vmcoreinfo")
    if qemu:
        probe_qmp(qemu)


# -- `model LAYOUT`: the layout JSON against its schema -----------------------------------------

#: the largest layout file `model` reads (a 4 TiB machine's is a few MB)
MAX_LAYOUT_BYTES = 64 << 20
#: JSON nesting a layout has (a device map's altmap is the deepest: 4 levels)
MAX_DEPTH = 8

_U64 = (1 << 64) - 1


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number a layout can hold")


def _depth(v, limit: int) -> int:
    """Nesting depth of a parsed JSON value, iteratively (a deep document must not
    exhaust the interpreter's stack here either)."""
    deepest = 0
    todo = [(v, 1)]
    while todo:
        x, d = todo.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        if isinstance(x, dict):
            todo.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            todo.extend((y, d + 1) for y in x)
    return deepest


class _Shape:
    """Checks a parsed layout against the shape Inputs.to_json writes; the first
    mismatch is one line naming where (``ram[3][1]``) and what was found."""

    def __init__(self) -> None:
        self.path: List[str] = []

    def fail(self, what: str, v) -> None:
        where = "".join(self.path) or "the document"
        shown = json.dumps(v)[:60] if not isinstance(v, float) else repr(v)
        raise ValueError(f"{where.lstrip('.')}: {what}, not {shown}")

    def at(self, key):
        self.path.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.path.pop()
        return False

    def uint(self, v, hexstr: bool = False, limit: int = _U64) -> int:
        if isinstance(v, str) and hexstr:
            try:
                v2 = int(v, 0)
            except ValueError:
                self.fail("a hex number", v)
            v = v2
        if type(v) is not int:
            self.fail("a non-negative integer" + (" or hex string" if hexstr else ""), v)
        if not 0 <= v <= limit:
            self.fail(f"an integer from 0 to {limit:#x}", v)
        return v

    def opt_uint(self, v, limit: int = _U64):
        return None if v is None else self.uint(v, limit=limit)

    def lst(self, v, n: Optional[int] = None) -> list:
        if not isinstance(v, list):
            self.fail("a list", v)
        if n is not None and len(v) != n:
            self.fail(f"a list of {n}", v)
        return v

    def obj(self, v) -> dict:
        if not isinstance(v, dict):
            self.fail("an object", v)
        return v

    def ranges(self, v, limit: int) -> None:
        for i, r in enumerate(self.lst(v)):
            with self.at(i):
                a, b = self.lst(r, 2)
                with self.at(0):
                    a = self.uint(a, hexstr=True, limit=limit)
                with self.at(1):
                    b = self.uint(b, hexstr=True, limit=limit)
                if b < a:
                    self.fail("a range whose end is not below its start", r)

    def tuples(self, v, n: int, limit: int = _U64) -> None:
        for i, r in enumerate(self.lst(v)):
            with self.at(i):
                for j, x in enumerate(self.lst(r, n)):
                    with self.at(j):
                        self.uint(x, limit=limit)


def check_layout_document(d) -> None:
    """:raises ValueError: where ``d`` (a parsed `check --save-layout` file) is not shaped
    as a layout: wrong types, NaN or floats, nulls where a value must be, negative or
    out-of-range numbers, ranges past MAX_PHYSMEM_BITS, orders past it."""
    sh = _Shape()
    sh.obj(d)
    with sh.at("layout"):
        lay = sh.obj(d.get("layout"))
        with sh.at("max_physmem_bits"):
            bits = sh.uint(lay.get("max_physmem_bits"), limit=64)
        with sh.at("page_size"):
            page = sh.uint(lay.get("page_size"), limit=1 << 20)
        for k, v in lay.items():
            if k in ("arch", "kernel_release", "type_source"):
                if not isinstance(v, str):
                    with sh.at(k):
                        sh.fail("a string", v)
            elif k == "section_flags":
                with sh.at(k):
                    for name, bit in sh.obj(v).items():
                        with sh.at(name):
                            sh.uint(bit, limit=63)
            elif k == "notes":
                with sh.at(k):
                    sh.obj(v)
            elif k in ("sparsemem_extreme", "lpa2"):
                if not isinstance(v, bool):
                    with sh.at(k):
                        sh.fail("true or false", v)
            else:
                with sh.at(k):
                    sh.uint(v, hexstr=True)
    limit = 1 << bits
    pfn_limit = limit // max(page, 1)
    for key in ("ram", "boot_ram", "nomap"):
        if key == "boot_ram" and d.get(key) is None:
            continue
        with sh.at(key):
            sh.ranges(d.get(key, []), limit)
    for key, n in (("nodes", 3), ("offline_blocks", 2), ("zones", 4)):
        with sh.at(key):
            sh.tuples(d.get(key, []), n, limit=max(pfn_limit, 1 << 16))
    with sh.at("folios"):
        for i, f in enumerate(sh.lst(d.get("folios", []))):
            with sh.at(i):
                sh.obj(f)
                unknown = set(f) - {"head_pfn", "order", "optimized", "nid", "zone"}
                if unknown:
                    sh.fail("a folio (head_pfn, order, optimized, nid, zone)", sorted(unknown))
                with sh.at("head_pfn"):
                    sh.uint(f.get("head_pfn"), limit=pfn_limit)
                with sh.at("order"):
                    sh.uint(f.get("order"), limit=max(bits - 12, 0))
                with sh.at("optimized"):
                    if not isinstance(f.get("optimized"), bool):
                        sh.fail("true or false", f.get("optimized"))
                for k in ("nid", "zone"):
                    with sh.at(k):
                        sh.opt_uint(f.get(k), limit=1 << 16)
    with sh.at("hvo_shared_tails"):
        if not isinstance(d.get("hvo_shared_tails", False), bool):
            sh.fail("true or false", d.get("hvo_shared_tails"))
    with sh.at("page_flags"):
        pf = d.get("page_flags")
        if pf is not None:
            for k, v in sh.obj(pf).items():
                with sh.at(k):
                    sh.uint(v, limit=64)
    with sh.at("device_maps"):
        dm = d.get("device_maps")
        if dm is not None:
            for i, m in enumerate(sh.lst(dm)):
                with sh.at(i):
                    sh.obj(m)
                    with sh.at("ranges"):
                        sh.ranges(m.get("ranges", []), limit)
                    with sh.at("vmemmap_shift"):
                        sh.uint(m.get("vmemmap_shift", 0), limit=max(bits - 13, 0))
                    with sh.at("altmap"):
                        _altmap(sh, m.get("altmap"), pfn_limit, optional=True)
                    with sh.at("type"):
                        if m.get("type") is not None and not isinstance(m.get("type"), str):
                            sh.fail("a string", m.get("type"))
    with sh.at("hosted_blocks"):
        hb = d.get("hosted_blocks")
        if hb is not None:
            for i, b in enumerate(sh.lst(hb)):
                with sh.at(i):
                    sh.obj(b)
                    for k in ("start_pfn", "end_pfn", "recorded_pages"):
                        with sh.at(k):
                            sh.uint(b.get(k), limit=pfn_limit)
                    with sh.at("altmap"):
                        _altmap(sh, b.get("altmap"), pfn_limit, optional=False)
    with sh.at("memmap_on_memory"):
        if d.get("memmap_on_memory") not in (None, "off", "enable", "force"):
            sh.fail('null, "off", "enable" or "force"', d.get("memmap_on_memory"))
    with sh.at("pageblock_order"):
        sh.opt_uint(d.get("pageblock_order"), limit=max(bits - 12, 0))


def _altmap(sh: _Shape, a, pfn_limit: int, optional: bool) -> None:
    if a is None and optional:
        return
    sh.obj(a)
    for k in ("base_pfn", "reserve", "free"):
        with sh.at(k):
            sh.uint(a.get(k), limit=pfn_limit)


def load_layout(path: str, reader=None):
    """Read a layout written by `check --save-layout` for `model`: a regular file, of
    bounded size and nesting, no NaN or Infinity; ``reader(path)`` (userfiles.read_layout:
    what the file is if not a layout) builds the Inputs; then the document is checked
    against the shape :func:`check_layout_document` gives, the layout against what a
    kernel can have (limits.layout_problem), and the sections against what the model
    predicts (limits.MAX_SECTIONS).

    :return: :class:`inspect_vmemmap.facts.Inputs`.
    :raises AnalysisError: one line naming the file, where and what (and whatever
        ``reader`` raises).
    """
    from inspect_vmemmap.facts import Inputs
    from inspect_vmemmap.limits import MAX_SECTIONS, layout_problem, ram_sections

    require_regular_file(path, "LAYOUT")
    if os.stat(path).st_size > MAX_LAYOUT_BYTES:
        raise AnalysisError(f"{path}: over {MAX_LAYOUT_BYTES >> 20} MiB, not a layout description")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LAYOUT_BYTES + 1)
    except OSError as e:
        raise AnalysisError(f"{path}: {e.strerror}") from None
    doc = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # the reader says what it is
    if text is not None:
        # json's decoder recurses per nesting level: bound the nesting before it parses
        depth = nest = 0
        for ch in text:
            if ch in "[{":
                nest += 1
                if nest > depth:
                    depth = nest
                    if depth > MAX_DEPTH:
                        raise AnalysisError(f"{path}: not a layout description (nested deeper than {MAX_DEPTH} levels)")
            elif ch in "]}":
                nest -= 1
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except ValueError as e:
            if "is not a number a layout can hold" in str(e):
                raise AnalysisError(f"{path}: not a layout description ({e})") from None
            doc = None  # not JSON: the reader says so
    if reader is not None:
        try:
            inputs = reader(path)
        except ValueError as e:
            # where the reader can only say "a field has the wrong type", the shape check
            # names the field
            if isinstance(doc, dict) and "wrong type or value" in str(e) or "lacks its" in str(e):
                try:
                    check_layout_document(doc)
                except (ValueError, KeyError, TypeError, AttributeError) as mine:
                    raise AnalysisError(f"{path}: not a layout description ({mine})") from None
            raise
    else:
        if not isinstance(doc, dict):
            raise AnalysisError(f"{path}: not a layout description (not a JSON object)")
        inputs = None
    try:
        if isinstance(doc, dict):
            check_layout_document(doc)
        if inputs is None:
            inputs = Inputs.from_json(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AnalysisError(f"{path}: not a layout description ({e})") from None
    bad = layout_problem(inputs.layout)
    if bad is not None:
        key, value, why = bad
        raise AnalysisError(f"{path}: layout {key} = {value!r}: {why}")
    n = ram_sections(inputs.layout, inputs.ram + [r for m in inputs.device_maps or () for r in m.ranges])
    if n > MAX_SECTIONS:
        raise AnalysisError(f"{path}: its RAM and device ranges span {n} sections; the model predicts at most "
                            f"{MAX_SECTIONS}")
    return inputs
