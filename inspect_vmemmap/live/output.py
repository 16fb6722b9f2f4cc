"""watch's output: JSON lines (CONTRACT.md "Live changes") or one text line per event."""

from __future__ import annotations

import json
from typing import Callable


def json_emitter(target_json: dict, schema: str) -> Callable[[dict, str], None]:
    def emit(obj: dict, what: str) -> None:
        if what == "start":
            obj = {"schema": schema, "target": target_json, **obj}
        print(json.dumps(obj), flush=True)

    return emit


def text_emitter(console, target_json: dict, layout) -> Callable[[dict, str], None]:
    from rich.text import Text

    from inspect_vmemmap import report

    def emit(obj: dict, what: str) -> None:
        if what == "start":
            report.target_line(console, target_json, layout)
            probes = obj["watch"]["probes"]
            on = [p["function"] for p in probes if p["attached"]]
            off = [p for p in probes if not p["attached"]]
            console.print(f"probes: {', '.join(on)}", highlight=False)
            for p in off:
                console.print(f"  not attached: {p['function']}: {p['why']}", highlight=False)
        elif what == "event":
            ev, chk = obj["event"], obj["check"]
            where = ""
            if "pfn_start" in ev:
                s0, s1 = ev["sections"]
                where = (f"pfn {ev['pfn_start']:#x}-{ev['pfn_end']:#x} node {ev['nid']} "
                         f"section{'s' if s1 != s0 else ''} {s0}{f'-{s1}' if s1 != s0 else ''}")
            if "order" in ev:
                where += f" order {ev['order']}"
            if ev["kind"] == "periodic":
                where = f"full check ({ev['reason']})"
            extra = ""
            if ev.get("parts"):
                extra = " (" + ", ".join(f"{n} {fn}" for fn, n in ev["parts"].items()) + ")"
            mom = chk.get("after", {}).get("memmap_on_memory_blocks")
            if mom:
                extra += f"; memmap on memory: {mom} block{'s' if mom != 1 else ''}, {chk['after']['memmap_on_memory_pages']} pages"
            if chk["errors"]:
                verdict = (f"{chk['errors']} error{'s' if chk['errors'] != 1 else ''}", "bold red")
            elif chk["warnings"]:
                verdict = (f"{chk['warnings']} warning{'s' if chk['warnings'] != 1 else ''}", "yellow")
            else:
                verdict = ("clean", "green")
            console.print(Text.assemble(f"{ev['t']:10.3f}  {ev['kind']:14} ", where,
                                        f"  {ev['task']}" if "task" in ev else "", extra, "  ", verdict))
            for f in chk["findings"]:
                style = {"error": "bold red", "warning": "yellow", "info": "blue"}[f["severity"]]
                console.print(Text.assemble("            ", (f"{f['severity'].upper():7} ", style),
                                            (f"{f['kind']:20} ", "bold"), f["message"]))
        elif what == "end":
            e = obj["end"]
            kinds = ", ".join(f"{n} {k}" for k, n in e["by_kind"].items()) or "no changes"
            console.print(f"{e['events']} events ({kinds}) in {e['seconds']:.1f}s; {e['errors']} errors; "
                          f"{e['lost']} lost", highlight=False)

    return emit


