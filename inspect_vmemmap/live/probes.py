"""The kernel functions that change the vmemmap, and the bpftrace program that watches them.

Each :class:`ProbePoint` is one kind of change with the functions that make it, best
first; the first one this kernel can trace is attached (fentry/fexit through BTF:
bpftrace's ``kfunc``/``kretfunc``), the others are listed as not attached with the reason.
Which functions exist is read from the kernel itself (its BTF ``FUNC`` records and
ftrace's ``available_filter_functions``, else ``/proc/kallsyms``), never from its version.

The functions (confirmed in linux-source 6.12 and 7.2; 6.1 in the Debian guest's BTF):

- mm/hugetlb_vmemmap.c, in 6.12 and 7.2 (since the batched pool changes): every folio is
  remapped by the static ``__hugetlb_vmemmap_optimize_folio``
  / ``__hugetlb_vmemmap_restore_folio``, called once per folio by the batch functions
  ``hugetlb_vmemmap_optimize_folios`` / ``hugetlb_vmemmap_restore_folios`` and by the
  single-folio ``hugetlb_vmemmap_optimize_folio`` / ``hugetlb_vmemmap_restore_folio``;
  before the folio conversion (6.1) ``hugetlb_vmemmap_optimize(h, head)`` /
  ``hugetlb_vmemmap_restore(h, head)``. The innermost per-folio function is probed, so each
  folio is one event however it was reached; the batch functions only mark that a change
  is still going on (the batch flushes the TLB and frees the old vmemmap pages after the
  last folio).
- mm/memory_hotplug.c: ``add_memory_resource`` (a hot-add: ``__add_pages`` ->
  mm/sparse.c ``sparse_add_section`` per section -> ``__populate_section_memmap`` ->
  arch ``vmemmap_populate``; then, with memhp_default_state=online, ``online_pages`` per
  block), ``__remove_pages`` (-> ``sparse_remove_section`` -> ``vmemmap_free``),
  ``online_pages``, ``offline_pages``; mm/mm_init.c ``memmap_init_zone_device``
  (ZONE_DEVICE memmap, after ``pagemap_range``'s ``__add_pages``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: a change made inside another watched change of the same task is a part of it (a
#: section added by a hot-add), except for "event" probes, which are always their own
#: event (each folio of a batch); "context" probes are never events, only in flight
ROLES = ("event", "top", "context")


@dataclass(frozen=True)
class ProbePoint:
    kind: str  # the event kind (CONTRACT.md "Live changes")
    role: str  # one of ROLES
    functions: Tuple[str, ...]  # best first


PROBE_POINTS: Tuple[ProbePoint, ...] = (
    ProbePoint("hvo-optimize", "event", ("__hugetlb_vmemmap_optimize_folio", "hugetlb_vmemmap_optimize_folio",
                                         "hugetlb_vmemmap_optimize")),
    ProbePoint("hvo-restore", "event", ("__hugetlb_vmemmap_restore_folio", "hugetlb_vmemmap_restore_folio",
                                        "hugetlb_vmemmap_restore")),
    ProbePoint("hvo-optimize-batch", "context", ("hugetlb_vmemmap_optimize_folios",)),
    ProbePoint("hvo-restore-batch", "context", ("hugetlb_vmemmap_restore_folios",)),
    ProbePoint("section-add", "top", ("add_memory_resource",)),
    ProbePoint("section-add", "top", ("__add_pages",)),
    ProbePoint("section-add", "top", ("sparse_add_section",)),
    ProbePoint("section-add", "top", ("__populate_section_memmap",)),
    ProbePoint("section-add", "top", ("vmemmap_populate",)),
    ProbePoint("section-remove", "top", ("__remove_pages",)),
    ProbePoint("section-remove", "top", ("sparse_remove_section",)),
    ProbePoint("section-remove", "top", ("vmemmap_free",)),
    ProbePoint("online", "top", ("online_pages",)),
    ProbePoint("offline", "top", ("offline_pages",)),
    ProbePoint("device-memmap", "top", ("memmap_init_zone_device",)),
)

#: parameter name -> (field, member read through it or None, its struct); names as the
#: kernel's prototypes have them (BTF FUNC_PROTO), so a changed parameter order needs nothing here
PARAMS: Dict[str, Tuple[Tuple[str, Optional[str], Optional[str]], ...]] = {
    "pfn": (("pfn", None, None),),
    "start_pfn": (("pfn", None, None),),
    "nr_pages": (("nr_pages", None, None),),
    "nid": (("nid", None, None),),
    "node": (("nid", None, None),),
    "start": (("vstart", None, None),),
    "end": (("vend", None, None),),
    "res": (("res_start", "start", "resource"), ("res_end", "end", "resource")),
    "folio": (("page", None, None),),
    "head": (("page", None, None),),
    "h": (("order", "order", "hstate"),),
}
#: x86_64 and arm64 pass the first six (eight) arguments in registers: what kprobes read
KPROBE_MAX_ARGS = 6


def expression(mechanism: str, index: int, name: str, member: Optional[str], struct: Optional[str]) -> str:
    """The bpftrace expression for a parameter (or a member through it): fentry names it
    (``args->res->start``, typed by BTF); a kprobe takes its register (``arg1``) and casts."""
    if mechanism == "kfunc":
        return f"(int64)args->{name}" + (f"->{member}" if member else "")
    if member:
        return f"(int64)((struct {struct} *)arg{index})->{member}"
    return f"(int64)arg{index}"


@dataclass(frozen=True)
class Probe:
    """One attached function."""

    id: int
    point: ProbePoint
    function: str
    fields: Tuple[Tuple[str, str], ...]  # (field, expression), printed in this order
    returns: bool  # has a return value
    mechanism: str = "kfunc"  # 'kfunc' (fentry/fexit through BTF) or 'kprobe' (kprobe/kretprobe)
    #: words read at the return, printed after the return value (:func:`with_restore_capture`)
    captures: Tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.point.kind

    @property
    def role(self) -> str:
        return self.point.role


@dataclass(frozen=True)
class Absent:
    function: str
    why: str


def select(signature, traceable, kprobe_ok=lambda fn: False,
           points: Sequence[ProbePoint] = PROBE_POINTS) -> Tuple[List[Probe], List[Absent]]:
    """The probes this kernel can have.

    ``signature(name)``: ``(parameter names, returns a value)`` from the kernel's BTF, or
    None; ``traceable(name)``: whether fentry can attach (ftrace lists it; None: unknown);
    ``kprobe_ok(name)``: whether a kprobe can (a text symbol, not on the kprobe blacklist),
    for what ftrace cannot trace (6.1 keeps sparse_add_section and the vmemmap_* functions
    in .meminit.text, which ftrace does not patch).
    """
    probes: List[Probe] = []
    absent: List[Absent] = []
    for point in points:
        chosen: Optional[str] = None
        for fn in point.functions:
            if chosen is not None:
                absent.append(Absent(fn, f"{chosen} is probed instead (it is called for each change)"))
                continue
            sig = signature(fn)
            if sig is None:
                absent.append(Absent(fn, "not in this kernel's BTF (inlined, renamed or absent)"))
                continue
            params, returns = sig
            mech = "kfunc" if traceable(fn) is not False else "kprobe" if kprobe_ok(fn) else None
            if mech is None:
                absent.append(Absent(fn, "neither fentry (not in available_filter_functions) nor a kprobe can attach"))
                continue
            fields = tuple((field, expression(mech, i, p, member, struct))
                           for i, p in enumerate(params) for field, member, struct in PARAMS.get(p, ())
                           if mech == "kfunc" or i < KPROBE_MAX_ARGS)
            probes.append(Probe(len(probes), point, fn, fields, returns, mech))
            chosen = fn
    return probes, absent


#: vmemmap pages after the head's whose first two struct pages a restore's return captures
CAPTURED_PAGES = 7


def with_restore_capture(probes: Sequence[Probe], page_size: int, struct_page_size: int) -> List[Probe]:
    """``probes`` with each ``hvo-restore`` probe that sees its folio at the return (fexit:
    ``args``) capturing, there, ``page->flags`` of the first struct page of each of the
    :data:`CAPTURED_PAGES` vmemmap pages after the head's, and the next struct page's
    ``compound_head`` (check.heads). The free that follows a restore clears every tail's
    flags (mm/page_alloc.c free_pages_prepare()), so only the return sees what the restore
    wrote."""
    out = []
    for p in probes:
        if p.kind != "hvo-restore" or p.mechanism != "kfunc" or "page" not in dict(p.fields):
            out.append(p)
            continue
        expr = dict(p.fields)["page"]  # (int64)args->folio
        caps = []
        for k in range(1, CAPTURED_PAGES + 1):
            caps.append(f"*(int64 *)({expr} + {k * page_size})")
            caps.append(f"*(int64 *)({expr} + {k * page_size + struct_page_size + 8})")
        out.append(replace(p, captures=tuple(caps)))
    return out


READY = "IVM-WATCH-READY"


def program(probes: Iterable[Probe]) -> str:
    """The bpftrace program: for each probe an entry line
    ``E <id> <nsecs> <tid> <pid> <field>... <comm>`` and a return line
    ``R <id> <nsecs> <tid> <retval>``; and ``IVM-WATCH-READY`` once attached (BEGIN runs
    after every probe is attached)."""
    out = [f'BEGIN {{ printf("{READY}\\n"); }}']
    for p in probes:
        fmt = " ".join(["E", str(p.id), "%llu", "%d", "%d"] + ["%lld"] * len(p.fields) + ["%s"])
        vals = ", ".join(["nsecs", "tid", "pid"] + [e for _, e in p.fields] + ["comm"])
        enter, leave = ("kfunc:vmlinux", "kretfunc:vmlinux") if p.mechanism == "kfunc" else ("kprobe", "kretprobe")
        out.append(f'{enter}:{p.function} {{ printf("{fmt}\\n", {vals}); }}')
        ret = "(int64)retval" if p.returns else "(int64)0"
        caps = "".join(" %lld" for _ in p.captures)
        vals = "".join(f", {c}" for c in p.captures)
        out.append(f'{leave}:{p.function} {{ printf("R {p.id} %llu %d %lld{caps}\\n", nsecs, tid, {ret}{vals}); }}')
    return "\n".join(out) + "\n"


def probes_json(probes: Sequence[Probe], absent: Sequence[Absent]) -> List[dict]:
    return ([{"function": p.function, "kind": p.kind, "attached": True, "mechanism": p.mechanism} for p in probes]
            + [{"function": a.function, "attached": False, "why": a.why} for a in absent])
