"""Output: one JSON schema for every command, and rich text for people."""

from __future__ import annotations

import json
import sys
from typing import Iterable, List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from inspect_vmemmap.facts import Assumption
from inspect_vmemmap.findings import Finding, summarize
from inspect_vmemmap.layout import KernelLayout
from inspect_vmemmap.sections import SectionTable
from inspect_vmemmap.tables import Column, human_size, plural, print_table
from inspect_vmemmap.vmemmap import VmemmapMap, size_label

SCHEMA = "inspect-vmemmap/1"


def sections_json(table: SectionTable) -> dict:
    layout = table.layout
    full = (1 << layout.subsections_per_section) - 1
    out = dict(table.counts())
    lst = []
    for s in table:
        d = {"nr": s.nr, "start_pfn": s.start_pfn(layout), "flags": s.flag_names(), "state": s.letters(),
             "section_mem_map": hex(s.section_mem_map), "coded_mem_map": hex(s.coded_mem_map),
             "mem_map": hex(s.mem_map(layout)) if s.valid else None, "nid": s.nid, "addr": hex(s.addr)}
        if s.unknown_flags:
            d["unknown_flags"] = hex(s.unknown_flags)
        if s.subsection_map is not None and (s.subsection_map & full) != full:
            d["subsection_map"] = hex(s.subsection_map & full)
        lst.append(d)
    out["list"] = lst
    return out


def document(target: dict, findings: List[Finding], **parts) -> dict:
    doc = {"schema": SCHEMA, "target": target}
    doc.update(parts)
    doc["findings"] = [f.to_json() for f in sorted(findings, key=_finding_order)]
    doc["summary"] = summarize(findings)
    return doc


def _finding_order(f: Finding):
    return ({"error": 0, "warning": 1, "info": 2}[f.severity], f.kind, f.pfn_start if f.pfn_start is not None else -1)


def print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=2))


# -- text ------------------------------------------------------------------------


def reader_went_away() -> None:
    """stdout's reader closed the pipe (``check | head -1``): it read what it wanted, so
    exit 0 ("done"), not 1 ("errors found"); nothing more is written there."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(0)


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits 1
        self.quiet = True
        reader_went_away()


def stdout_console() -> Console:
    """Rich console on stdout: as wide as the terminal; piped, lines are never wrapped
    (tables take the width their contents need)."""
    if sys.stdout.isatty():
        return _StdoutConsole()
    return _StdoutConsole(width=1000, no_color=True)


def target_line(console: Console, target: dict, layout: KernelLayout) -> None:
    console.print(
        f"[bold]{target['kernel_release']}[/] {target['arch']} ({target['source']}), "
        f"{target['pgtable_levels']}-level paging, {layout.page_size // 1024}K pages, "
        f"vmemmap at [cyan]{target['vmemmap_base']}[/], struct page {target['struct_page_size']} B, "
        f"sections of {size_label(1 << layout.section_size_bits)}, types from {target['type_source']}"
        + (f", read {target['reads']} times to confirm errors" if target.get("reads", 1) > 1 else "")
    )


def print_sections(console: Console, table: SectionTable) -> None:
    layout = table.layout
    full = (1 << layout.subsections_per_section) - 1
    columns = [Column(col, just) for col, just in (
        ("NR", "right"), ("SECTION", "left"), ("CODED_MEM_MAP", "left"), ("MEM_MAP", "left"), ("STATE", "left"),
        ("PFN", "right"), ("NODE", "right"), ("SUBSECTIONS", "left"))]
    rows = []
    for s in table:
        sub = ""
        if s.subsection_map is not None and (s.subsection_map & full) != full:
            sub = f"{bin(s.subsection_map & full).count('1')}/{layout.subsections_per_section} {s.subsection_map & full:#x}"
        rows.append([str(s.nr), f"{s.addr:016x}", f"{s.coded_mem_map:016x}",
                     f"{s.mem_map(layout):016x}" if s.valid else "-", s.letters() or "-",
                     str(s.start_pfn(layout)), "-" if s.nid is None else str(s.nid), sub])
    print_table(console, columns, rows)
    c = table.counts()
    console.print(f"{len(table)} sections: {c['present']} present, {c['has_mem_map']} with mem_map, "
                  f"{c['online']} online, {c['early']} early, {c['zone_device']} zone-device "
                  "[dim](STATE: P present, M mem_map, O online, E early, D zone-device taint)[/]")


def print_map(console: Console, vm: VmemmapMap) -> None:
    # FLAGS and LEVEL may go when the terminal is narrow (in --json: attrs, level); addresses never
    columns = [Column(col, just, optional=col in ("FLAGS", "LEVEL")) for col, just in (
        ("START", "left"), ("END", "left"), ("SIZE", "right"), ("PERM", "left"), ("FLAGS", "left"), ("LEVEL", "left"),
        ("PHYS", "left"), ("NODE", "right"), ("HOLDS", "left"), ("SECTIONS", "left"))]
    rows = []
    for r in vm.ranges:
        phys = f"{r.phys_start:#x}"
        if r.count > 1 and r.stride == 0:
            phys += f" (x{r.count})"
        secs = "" if r.first_section is None else (str(r.first_section) if r.first_section == r.last_section
                                                   else f"{r.first_section}-{r.last_section}")
        perm = Text("RW") if r.writable else Text("ro", style="yellow")
        rows.append([f"{r.start:#018x}", f"{r.end:#018x}", size_label(r.end - r.start), perm,
                     " ".join(a for a in r.attrs), r.level, phys, "-" if r.nid is None else str(r.nid),
                     r.holds, secs])
    # folded: the physical backing under the virtual start
    print_table(console, columns, rows, fold_order=("START", "END", "SIZE", "PERM", "HOLDS",
                                                    "PHYS", "SECTIONS", "NODE", "LEVEL", "FLAGS"))
    leaves = ", ".join(f"{n} x {k}" for k, n in vm.leaves.items() if n)
    console.print(f"leaves: {leaves or 'none'}; {plural(vm.split_pmds, 'split PMD')}; {vm.readonly_ptes} read-only; "
                  f"{size_label(vm.bytes_mapped) if vm.bytes_mapped else '0'} mapped")


def print_findings(console: Console, findings: Iterable[Finding]) -> None:
    findings = sorted(findings, key=_finding_order)
    if not findings:
        return
    console.print()
    for f in findings:
        style = {"error": "bold red", "warning": "yellow", "info": "blue"}[f.severity]
        console.print(Text.assemble((f"{f.severity.upper():7} ", style), (f"{f.kind:20} ", "bold"), f.message))


def print_pfn(console: Console, info: dict) -> None:
    state = f"state {info['state']}" if info["state"] else "not present"
    node = f"node {info['nid']}" if info["nid"] is not None else "in no node's span (a hole)"
    console.print(f"pfn [bold]{info['pfn']}[/] (phys {info['phys']}): section {info['section']} "
                  f"({escape(state)}), subsection {info['subsection']}, "
                  f"{'valid' if info['valid'] else 'not valid (pfn_valid() is false)'}, {node}")
    if "mem_map" in info:
        console.print(f"  coded mem_map {info['coded_mem_map']}, mem_map {info['mem_map']}")
    console.print(f"  struct page at [cyan]{info['struct_page']}[/]")
    for s in info["walk"]:
        tail = {"table": f"-> table {s.get('next', '')}", "leaf": "leaf", "none": "not present",
                "bad": f"malformed: {s.get('reason', '')}", "unreadable": "table not readable"}[s["kind"]]
        console.print(f"    {s['level']:>4}[{s['index']:3}] @ {s['table_phys']} = {s['entry']}  {tail}")
    b = info.get("backing")
    if b:
        where = f"node {b['nid']}" if b["nid"] is not None else "in no node's span"
        console.print(f"  backed by a {b['size']} page at {b['phys']} ({'RW' if b['writable'] else 'ro'} "
                      f"{' '.join(b['attrs'])}, {b['level']}), {where}; "
                      f"the struct page is at phys {info['struct_page_phys']}")


def print_check_report(console: Console, analysis, doc: dict, findings: List[Finding], result,
                       notes: List[str]) -> None:
    """The text report of ``check``, and of ``boot``, which checks a guest the same way:
    what :func:`inspect_vmemmap.commands.confirmed_check` returned, for people."""
    print_check(console, doc["target"], analysis.t.layout, analysis.sections, analysis.vmemmap(), result.hvo,
                findings, notes, analysis.nodes, device_dedup=result.device_dedup, self_hosted=result.self_hosted)


def print_check(console: Console, target: dict, layout: KernelLayout, sections: SectionTable, vm: VmemmapMap,
                hvo: dict, findings: List[Finding], notes: List[Assumption], nodes, device_dedup: Optional[dict] = None,
                self_hosted: Optional[dict] = None) -> None:
    s = summarize(findings)
    target_line(console, target, layout)
    if s["errors"]:
        console.print(f"[bold red]INCONSISTENT[/]: {plural(s['errors'], 'error')}, {plural(s['warnings'], 'warning')}")
    elif s["warnings"]:
        console.print(f"[bold yellow]consistent, with {plural(s['warnings'], 'warning')}[/]")
    else:
        console.print("[bold green]consistent[/]: the vmemmap is what the kernel's rules say it should be")
    if target.get("dump", {}).get("truncated"):
        console.print("[bold yellow]INCOMPLETE[/]: the dump is truncated; what it lacks was not checked")
    if target.get("dump"):
        console.print(dump_line(target["dump"], findings, notes), highlight=False)
    c = sections.counts()
    console.print(f"sections: {c['present']} present, {c['online']} online, {c['early']} early, {c['zone_device']} zone-device")
    # backing per node and page size
    per: dict = {}
    for r in vm.ranges:
        key = (r.nid, size_label(r.page_size))
        per[key] = per.get(key, 0) + (r.end - r.start)
    t = Table(box=None, header_style="bold", pad_edge=False)
    t.add_column("NODE", justify="right")
    labels = [k for k in vm.leaves]
    for k in labels:
        t.add_column(f"ON {k}", justify="right")
    t.add_column("TOTAL", justify="right")
    for nid in sorted({k[0] for k in per}, key=lambda n: -1 if n is None else n):
        row = [per.get((nid, k), 0) for k in labels]
        t.add_row("-" if nid is None else str(nid), *[human_size(v) for v in row], human_size(sum(row)))
    console.print(t)
    console.print(f"{plural(vm.split_pmds, 'split PMD')}, {plural(vm.readonly_ptes, 'read-only leaf', 'read-only leaves')}; "
                  f"HVO: {plural(hvo['optimized_folios'], 'optimized folio')}, {plural(hvo['remapped_ptes'], 'remapped PTE')}, "
                  f"{human_size(hvo['freed_bytes'])} freed")
    if device_dedup and device_dedup["compound_pages"]:
        console.print(f"ZONE_DEVICE: {plural(device_dedup['compound_pages'], 'compound page')} with deduplicated tail "
                      f"vmemmap, {plural(device_dedup['remapped_ptes'], 'shared PTE')}, {human_size(device_dedup['saved_bytes'])} saved")
    if self_hosted and (self_hosted["memory_blocks"] or self_hosted["device_maps"]):
        console.print(f"memmap on the memory itself: {plural(self_hosted['memory_blocks'], 'memory block')} (memmap_on_memory), "
                      f"{plural(self_hosted['device_maps'], 'device page map')} (altmap), {human_size(self_hosted['bytes'])}")
    print_node_pictures(console, layout, sections, vm, findings, nodes)
    for n in notes:
        console.print(f"[dim]assumed: {n}[/]")
    by_kind: dict = {}
    for f in findings:
        by_kind.setdefault(f.kind, []).append(f)
    for kind in sorted(by_kind, key=lambda k: _finding_order(by_kind[k][0])):
        fs = by_kind[kind]
        console.print(f"\n[bold]{kind}[/] ({len(fs)})")
        print_findings(console, fs)


def dump_line(dump: dict, findings: List[Finding], notes: List[Assumption]) -> str:
    """One line on what a dump left out and what that kept the check from doing."""
    what = dump["format"] + (f" ({dump['compression']})" if dump.get("compression") else "")
    if dump.get("filter"):
        what += f", filtered by {dump['filter']}"
    elif dump.get("dump_level") is not None:
        what += f", dump level {dump['dump_level']} (nothing excluded)"
    if dump.get("excluded_pages"):
        of = f" of {dump['ram_pages']}" if dump.get("ram_pages") else ""
        what += f": {dump['excluded_pages']}{of} pages left out"
    if dump.get("incomplete"):
        what += "; the dump is INCOMPLETE (makedumpfile did not finish)"
    if dump.get("truncated"):
        from inspect_vmemmap.truncation import describe

        what += "; " + describe(dump)
    n = sum(1 for f in findings if f.extra.get("excluded_by"))
    m = sum(1 for x in notes if x.excluded_by)
    if not dump.get("excluded_pages"):
        tail = ""
    elif n or m:
        tail = (f"; the check could not read what it needed there: {n} unreadable finding(s)"
                + (f", {m} input(s) assumed" if m else ""))
    else:
        tail = "; the check read every page it needed"
    return f"dump: {what}{tail}"


def print_model(console: Console, inputs, pred) -> None:
    lay = inputs.layout
    console.print(f"[bold]{lay.kernel_release or 'layout'}[/] {lay.arch}: {len(pred.sections)} sections should be present")
    for sp in sorted(pred.sections.values(), key=lambda s: s.nr):
        runs = ", ".join(f"{a}-{b - 1}" for a, b in sp.valid)
        console.print(f"  section {sp.nr:6}  {'+'.join(sp.flag_names()):35} node {sp.nid if sp.nid is not None else '-'}  valid pfns {runs}")
    total = sum(b - a for a, b in pred.required)
    console.print(f"vmemmap that must be mapped: {size_label(total) if total else '0'} in {len(pred.required)} range(s)")
    for a, b in pred.required:
        console.print(f"  {a:#018x}-{b:#018x}  {size_label(b - a)}")
    if pred.hvo:
        console.print(f"HVO: {len(pred.hvo)} optimized folios; each keeps 1 writable vmemmap page and maps "
                      f"the rest read-only onto {'its first page' if pred.hvo[0].tail_target == 'head' else 'the zone shared tail page'}")
    for d in pred.device:
        ranges = ", ".join(f"{a:#x}-{b - 1:#x}" for a, b in d.map.ranges)
        what = {True: f"{d.compound_pages} compound pages, {d.shared_ptes} tail vmemmap pages mapping their "
                      f"compound page's second one", False: "no dedup",
                None: f"{d.compound_pages} compound pages whose tails may or may not be deduplicated"}[d.dedup]
        where = f"; memmap on the device: {size_label(sum(h.end - h.start for h in d.hosted))}" if d.hosted else ""
        console.print(f"ZONE_DEVICE {d.map.type or ''} {ranges}: vmemmap_shift {d.map.vmemmap_shift}, {what} ({d.why}){where}")
    for b in pred.blocks:
        console.print(f"memmap_on_memory block pfn {b.block.start_pfn}-{b.block.end_pfn - 1}: memmap on its first "
                      f"{b.used_pages} pages, {b.reserved_pages if b.reserved_pages is not None else '?'} reserved "
                      f"(the kernel records {b.block.recorded_pages})")


def print_node_pictures(console: Console, layout: KernelLayout, sections: SectionTable, vm: VmemmapMap,
                        findings: List[Finding], nodes, width: int = 64) -> None:
    """One character per section of each node's physical address space: ``#`` memmap on
    PMD blocks, ``+`` on base pages, ``%`` both, ``?`` present but unmapped, ``.`` no
    section; green early, cyan hot-added, dim offline, red where a finding points."""
    sizes: dict = {}
    for r in vm.ranges:
        if r.first_section is None or r.holds == "unused":
            continue
        for nr in range(r.first_section, r.last_section + 1):
            sizes.setdefault(nr, set()).add(r.page_size)
    bad = {f.section for f in findings if f.severity == "error" and f.section is not None}
    pps = layout.pages_per_section
    spans: dict = {}
    for nid, s, e in nodes.spans:
        a, b = spans.get(nid, (s, e))
        spans[nid] = (min(a, s), max(b, e))
    for nid in sorted(spans):
        s, e = spans[nid]
        first, last = s // pps, (e - 1) // pps
        colours = "; green early, cyan hot-added, red error" if console.color_system else ""  # not on a pipe
        console.print(f"node {nid}: sections {first}-{last}  [dim](# PMD blocks, + base pages, % both, ? unmapped, . none"
                      f"{colours})[/]")
        # a row per `width` sections, as many as fit the terminal beside the address
        width = min(width, max(8, (console.width - 17) // 8 * 8))
        for row in range(first, last + 1, width):
            text = Text(f"  {(row * pps) << layout.page_shift:#014x} ")
            run, run_style = [], None  # characters of one style appended together
            for nr in range(row, min(row + width, last + 1)):
                sec = sections.get(nr)
                if sec is None or not sec.present:
                    ch, style = ".", "dim"
                else:
                    sz = sizes.get(nr, set())
                    ch = "?" if not sz else "#" if sz == {1 << (2 * layout.page_shift - 3)} else "+" if max(sz) == layout.page_size else "%"
                    style = "bold red" if nr in bad else "green" if sec.early else "cyan" if "ONLINE" in sec.flags else "dim"
                if style != run_style and run:
                    text.append("".join(run), style=run_style)
                    run = []
                run.append(ch)
                run_style = style
            if run:
                text.append("".join(run), style=run_style)
            console.print(text)
