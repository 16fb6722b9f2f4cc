"""watch's pure parts: choosing probes by what the kernel has, the bpftrace program,
pairing bpftrace's lines into changes, the ranges they touch, the lab's steps."""

from __future__ import annotations

import json
import os

import pytest

from inspect_vmemmap.findings import Finding
from inspect_vmemmap.lab.watching import Step, document, hotplug_sizes, parse_step
from inspect_vmemmap.live.events import HOLD_FEEDS, Tracker
from inspect_vmemmap.live.probes import PROBE_POINTS, READY, program, probes_json, select
from inspect_vmemmap.live.watch import call_range, touches

#: the functions and prototypes of Debian 6.12 (its BTF), as the probes need them
K612 = {
    "__hugetlb_vmemmap_optimize_folio": (["h", "folio", "vmemmap_pages", "flags"], True),
    "__hugetlb_vmemmap_restore_folio": (["h", "folio", "flags"], True),
    "hugetlb_vmemmap_optimize_folio": (["h", "folio"], False),
    "hugetlb_vmemmap_restore_folio": (["h", "folio"], True),
    "hugetlb_vmemmap_optimize_folios": (["h", "folio_list"], False),
    "hugetlb_vmemmap_restore_folios": (["h", "folio_list", "non_hvo_folios"], True),
    "add_memory_resource": (["nid", "res", "mhp_flags"], True),
    "__add_pages": (["nid", "pfn", "nr_pages", "params"], True),
    "sparse_add_section": (["nid", "start_pfn", "nr_pages", "altmap", "pgmap"], True),
    "__populate_section_memmap": (["pfn", "nr_pages", "nid", "altmap", "pgmap"], True),
    "vmemmap_populate": (["start", "end", "node", "altmap"], True),
    "__remove_pages": (["pfn", "nr_pages", "altmap", "pgmap"], False),
    "sparse_remove_section": (["pfn", "nr_pages", "altmap", "pgmap"], False),
    "vmemmap_free": (["start", "end", "altmap"], False),
    "online_pages": (["pfn", "nr_pages", "zone", "group"], True),
    "offline_pages": (["start_pfn", "nr_pages", "zone", "group"], True),
    "memmap_init_zone_device": (["zone", "start_pfn", "nr_pages", "pgmap"], False),
}
#: 6.1: hugetlb_vmemmap_optimize(h, head) before the folio conversion
K61 = {k: v for k, v in K612.items() if "hugetlb" not in k}
K61.update({"hugetlb_vmemmap_optimize": (["h", "head"], False), "hugetlb_vmemmap_restore": (["h", "head"], True)})


def choose(kernel, traceable=lambda fn: True):
    return select(kernel.get, traceable)


def test_the_innermost_per_folio_function_is_chosen_and_the_rest_listed():
    probes, absent = choose(K612)
    by = {p.function: p for p in probes}
    assert by["__hugetlb_vmemmap_optimize_folio"].kind == "hvo-optimize"
    assert "hugetlb_vmemmap_optimize_folio" not in by and "hugetlb_vmemmap_optimize" not in by
    assert dict(by["__hugetlb_vmemmap_optimize_folio"].fields).keys() == {"order", "page"}
    assert dict(by["add_memory_resource"].fields).keys() == {"nid", "res_start", "res_end"}
    assert dict(by["offline_pages"].fields).keys() == {"pfn", "nr_pages"}
    assert not by["vmemmap_free"].returns
    gone = {a.function: a.why for a in absent}
    assert "instead" in gone["hugetlb_vmemmap_optimize"]
    doc = probes_json(probes, absent)
    assert all(("why" in p) != p["attached"] for p in doc)


def test_6_1_falls_back_to_the_page_functions():
    probes, absent = choose(K61)
    by = {p.function: p for p in probes}
    assert by["hugetlb_vmemmap_optimize"].kind == "hvo-optimize"
    assert dict(by["hugetlb_vmemmap_restore"].fields)["page"] == "(int64)args->head"
    gone = {a.function: a.why for a in absent}
    assert "BTF" in gone["__hugetlb_vmemmap_optimize_folio"] and "BTF" in gone["hugetlb_vmemmap_optimize_folios"]


def test_a_function_ftrace_cannot_trace_is_absent():
    probes, absent = choose(K612, lambda fn: fn != "online_pages")
    assert "online_pages" not in {p.function for p in probes}
    assert any(a.function == "online_pages" and "available_filter_functions" in a.why for a in absent)


def test_program():
    probes, _ = choose(K612)
    text = program(probes)
    assert READY in text.splitlines()[0]
    for p in probes:
        assert f"kfunc:vmlinux:{p.function} " in text and f"kretfunc:vmlinux:{p.function} " in text
    assert "args->res->start" in text and "args->h->order" in text
    # a void function has no retval to print
    line = next(l for l in text.splitlines() if l.startswith("kretfunc:vmlinux:vmemmap_free "))
    assert "retval" not in line


@pytest.fixture
def k612():
    probes, _ = choose(K612)
    return {p.function: p for p in probes}, Tracker(probes)


def E(p, ns, tid, *vals, comm="sh"):
    return " ".join(map(str, ["E", p.id, ns, tid, 100 + tid, *vals, comm]))


def R(p, ns, tid, ret=0):
    return f"R {p.id} {ns} {tid} {ret}"


def test_a_hot_add_is_one_change_with_its_parts(k612):
    by, tr = k612
    amr, add, sas, onl = by["add_memory_resource"], by["__add_pages"], by["sparse_add_section"], by["online_pages"]
    lines = [E(amr, 10, 7, 0, 1 << 32, (5 << 30) - 1, comm="kworker/u4:0"), E(add, 11, 7, 0, 1 << 20, 1 << 18)]
    for i in range(8):
        lines += [E(sas, 12 + 2 * i, 7, 0, (1 << 20) + i * 32768, 32768), R(sas, 13 + 2 * i, 7)]
    lines += [R(add, 40, 7), E(onl, 41, 7, 1 << 20, 32768), R(onl, 42, 7)]
    # bpftrace's CPUs print out of order: the return of the whole came out first
    done = tr.feed([R(amr, 50, 7)] + lines)
    assert len(done) == 1 and done[0].probe is amr
    parts = [c.probe.function for c in done[0].parts]
    assert parts.count("sparse_add_section") == 8 and parts.count("online_pages") == 1
    assert done[0].comm == "kworker/u4:0" and not tr.in_flight()


def test_each_folio_of_a_batch_is_its_own_change(k612):
    by, tr = k612
    batch, one = by["hugetlb_vmemmap_optimize_folios"], by["__hugetlb_vmemmap_optimize_folio"]
    lines = [E(batch, 1, 3, 9)]
    for i in range(3):
        lines += [E(one, 2 + 2 * i, 3, 9, 0xffe7526a00000000 + i * 512 * 64), R(one, 3 + 2 * i, 3)]
    assert [c.fields["order"] for c in tr.feed(lines)] == [9, 9, 9]
    assert [c.probe for c in tr.in_flight()] == [batch]  # the batch has not returned yet
    assert tr.feed([R(batch, 20, 3)]) == [] and not tr.in_flight()


def test_lost_and_unpaired_are_counted(k612):
    by, tr = k612
    tr.feed(["Lost 12 events", R(by["online_pages"], 5, 1), "Attaching 31 probes...", "garbage line"])
    assert tr.lost == 12 and tr.unpaired == 0  # its entry may still come, from another CPU
    for _ in range(HOLD_FEEDS):
        tr.feed([])
    assert tr.unpaired == 1 and not tr.held


def test_a_return_read_before_its_entry_is_paired_when_the_entry_comes(k612):
    by, tr = k612
    one = by["__hugetlb_vmemmap_optimize_folio"]
    # the stream was cut between two CPUs' buffers: the task migrated, its return came first
    assert tr.feed([R(one, 30, 3)]) == []
    done = tr.feed([E(one, 20, 3, 9, 0xffe7526a00000000)])
    assert [(c.start_ns, c.end_ns) for c in done] == [(20, 30)] and tr.unpaired == 0 and not tr.held


def test_bpftrace_stopping_ends_the_wait(k612):
    by, tr = k612
    tr.feed([R(by["online_pages"], 5, 1)], final=True)
    assert tr.unpaired == 1 and not tr.held


def test_events_are_rechecked_once_their_batch_returned_not_when_all_is_quiet(k612):
    from inspect_vmemmap.live.watch import Watcher

    by, tr = k612
    opt, rest = by["hugetlb_vmemmap_optimize_folios"], by["hugetlb_vmemmap_restore_folios"]
    one = by["__hugetlb_vmemmap_optimize_folio"]
    w = Watcher.__new__(Watcher)
    w.tracker, w.pending = tr, []
    assert not w.due()
    w.pending += tr.feed([E(opt, 1, 3, 9), E(one, 2, 3, 9, 0xffe7526a00000000), R(one, 3, 3)])
    assert len(w.pending) == 1 and not w.due()  # its batch frees the old vmemmap pages after its last folio
    tr.feed([R(opt, 4, 3)])
    assert w.due()
    # a loop's next batch, begun after: it does not hold them back (what it touches is a race)
    tr.feed([E(rest, 5, 3, 9)])
    assert tr.in_flight() and w.due()


class Lay:
    vmemmap_base = 0xffe7526a00000000
    struct_page_size = 64
    page_shift = 12
    pfn_section_shift = 15

    def page_to_pfn(self, a):
        return (a - self.vmemmap_base) // 64

    def pfn_to_page(self, p):
        return self.vmemmap_base + p * 64


def test_ranges(k612):
    by, tr = k612
    lay = Lay()
    (c,) = tr.feed([E(by["__hugetlb_vmemmap_optimize_folio"], 1, 1, 9, lay.pfn_to_page(88576)),
                    R(by["__hugetlb_vmemmap_optimize_folio"], 2, 1)])
    assert call_range(c, lay) == (88576, 88576 + 511)
    (c,) = tr.feed([E(by["add_memory_resource"], 3, 1, 0, 1 << 32, (5 << 30) - 1), R(by["add_memory_resource"], 4, 1)])
    assert call_range(c, lay) == (1 << 20, (5 << 18) - 1)
    (c,) = tr.feed([E(by["vmemmap_free"], 5, 1, lay.pfn_to_page(32768), lay.pfn_to_page(65536)),
                    R(by["vmemmap_free"], 6, 1)])
    assert call_range(c, lay) == (32768, 65535)
    rng = (88576, 89087)
    assert touches(Finding("hvo-inconsistent", None, "x", pfn_start=89000, pfn_end=89100), rng, lay)
    assert not touches(Finding("hvo-inconsistent", None, "x", pfn_start=89088), rng, lay)
    assert touches(Finding("bad-entry", None, "x", vaddr=lay.pfn_to_page(88600)), rng, lay)
    assert touches(Finding("section-flags", None, "x", section=2), rng, lay)
    assert not touches(Finding("section-flags", None, "x", section=3), rng, lay)


def test_steps():
    assert parse_step("hugepages=12") == Step("hugepages", "12")
    assert parse_step("hugepages-1g=1") == Step("hugepages-1g", "1")
    assert parse_step("hotplug=1g") == Step("hotplug", "1G")
    assert str(parse_step("unplug")) == "unplug"
    with pytest.raises(ValueError):
        parse_step("hugepages=lots")
    assert hotplug_sizes([parse_step("hotplug=1G"), parse_step("unplug"), parse_step("hotplug=512M")]) == ["1G", "512M"]
    assert parse_step("devdax=512m") == Step("devdax", "512M") and str(parse_step("devdax=1G")) == "devdax=1G"
    assert hotplug_sizes([parse_step("devdax=1G")]) == []


def test_document_folds_each_check_into_its_event():
    lines = [{"schema": "inspect-vmemmap/1", "target": {"source": "live"}, "watch": {"probes": []}},
             {"event": {"seq": 0, "kind": "periodic"}, "check": {"errors": 0, "warnings": 0, "findings": []}},
             {"event": {"seq": 1, "kind": "hvo-optimize"},
              "check": {"errors": 1, "warnings": 0, "findings": [{"kind": "hvo-inconsistent", "severity": "error"}]}},
             {"end": {"events": 1}}]
    doc = document("\n".join(json.dumps(l) for l in lines), [])
    assert [e["kind"] for e in doc["watch"]["events"]] == ["periodic", "hvo-optimize"]
    assert doc["watch"]["events"][1]["check"]["errors"] == 1 and doc["summary"]["errors"] == 1
    assert doc["watch"]["end"] == {"events": 1}


def test_every_probe_point_has_a_kind_of_the_contract():
    kinds = {"hvo-optimize", "hvo-restore", "section-add", "section-remove", "online", "offline", "device-memmap"}
    assert {p.kind for p in PROBE_POINTS if p.role != "context"} <= kinds


# --- bad input and a machine without eBPF: one line, exit 2 ---------------------------------

from tests.cli import one_line, run  # noqa: E402


def test_watch_needs_the_running_kernel(tmp_path):
    one_line(run("watch", "--qemu", str(tmp_path / "qmp.sock")), "running kernel")
    one_line(run("watch", "--core", str(tmp_path / "vmcore")), "running kernel")


def test_watch_without_bpftrace(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no bpftrace on it
    p = run("watch", env=env)
    one_line(p, "bpftrace" if os.geteuid() == 0 else "root")


def test_bpftrace_that_cannot_attach_is_one_line(tmp_path, monkeypatch):
    from inspect_vmemmap.live.bpftrace import Bpftrace, WatchError

    fake = tmp_path / "bpftrace"
    fake.write_text("#!/bin/sh\necho 'Attaching 3 probes...' >&2\n"
                    "echo 'ERROR: Could not load program: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    bt = Bpftrace("BEGIN {}", str(fake))
    with pytest.raises(WatchError, match="^bpftrace: ERROR: Could not load program: Operation not permitted$"):
        bt.wait_ready(30)


def test_what_ftrace_cannot_patch_gets_a_kprobe():
    # 6.1 keeps sparse_add_section in .meminit.text: not in available_filter_functions
    probes, absent = select(K61.get, lambda fn: fn != "sparse_add_section", lambda fn: fn == "sparse_add_section")
    (p,) = [p for p in probes if p.function == "sparse_add_section"]
    assert p.mechanism == "kprobe" and dict(p.fields) == {"nid": "(int64)arg0", "pfn": "(int64)arg1",
                                                          "nr_pages": "(int64)arg2"}
    text = program(probes)
    assert "kprobe:sparse_add_section " in text and "kretprobe:sparse_add_section " in text
    (h,) = [p for p in probes if p.function == "hugetlb_vmemmap_optimize"]
    assert h.mechanism == "kfunc"
    kp = select(K61.get, lambda fn: False, lambda fn: True)[0]
    assert dict(next(p for p in kp if p.function == "hugetlb_vmemmap_optimize").fields)["order"] == \
        "(int64)((struct hstate *)arg0)->order"


def test_changes_during_a_read_and_the_races_they_name(k612):
    from types import SimpleNamespace

    from inspect_vmemmap.live.racecheck import Probing, race

    by, tr = k612
    lay = Lay()
    batch, one = by["hugetlb_vmemmap_optimize_folios"], by["__hugetlb_vmemmap_optimize_folio"]
    onl = by["online_pages"]
    lines = [E(onl, 5, 2, 1 << 20, 32768), R(onl, 6, 2),  # before the read
             E(batch, 100, 3, 9),  # under way during the read [100, 200]: splits every folio's PMD first
             E(one, 250, 3, 9, lay.pfn_to_page(4096)), R(one, 260, 3), R(batch, 270, 3),
             E(onl, 150, 4, 2 << 20, 32768), R(onl, 160, 4)]

    class Bt:
        def lines(self, timeout):
            out, lines[:] = list(lines), []
            return out

    p = Probing.__new__(Probing)
    p.t, p.tracker, p.bt = SimpleNamespace(layout=lay), tr, Bt()
    got = {(c.probe.function, rng) for c, rng in p.changes_during(100, 200)}
    assert got == {("__hugetlb_vmemmap_optimize_folio", (4096, 4607)), ("online_pages", (2 << 20, (2 << 20) + 32767))}
    c = next(c for c in tr.seen if c.probe is one)
    f = race(Finding("hvo-inconsistent", None, "tails writable", pfn_start=4096, pfn_end=4607), c, (4096, 4607))
    j = f.to_json()
    assert j["kind"] == "race" and j["severity"] == "warning" and j["was"] == "hvo-inconsistent"
    assert j["event"] == {"kind": "hvo-optimize", "function": "__hugetlb_vmemmap_optimize_folio", "task": "sh/103",
                          "pfn_start": 4096, "pfn_end": 4607}


def test_a_probe_the_kernel_refuses_is_listed_absent_and_the_rest_attached(tmp_path):
    from inspect_vmemmap.live.bpftrace import attach

    fake = tmp_path / "bpftrace"
    fake.write_text("#!/bin/sh\n"
                    "case \"$4\" in *kretprobe:sparse_add_section*)\n"
                    "  echo \"ERROR: Error attaching probe: 'kretprobe:sparse_add_section'\" >&2; exit 1;; esac\n"
                    f"echo {READY}\nexec sleep 30\n")
    fake.chmod(0o755)
    probes, absent = select(K61.get, lambda fn: fn != "sparse_add_section", lambda fn: True)
    bt, got, gone = attach(probes, absent, 30, str(fake))
    try:
        assert "sparse_add_section" not in {p.function for p in got}
        assert [p.id for p in got] == list(range(len(got)))
        (why,) = [a.why for a in gone if a.function == "sparse_add_section"]
        assert "refused" in why and "kretprobe:sparse_add_section" in why
    finally:
        bt.stop()


def test_traceable_functions_are_the_names_of_available_filter_functions(tmp_path, monkeypatch):
    """ftrace's list as the kernel prints it (kernel/trace/ftrace.c t_show(): the name, and
    for a module's function its module in brackets); kallsyms is read only for a function
    fentry cannot take."""
    from inspect_vmemmap.live import bpftrace

    (tmp_path / "available_filter_functions").write_text(
        "online_pages\nsparse_add_section\n__add_pages\nvirtio_mem_probe [virtio_mem]\n")
    monkeypatch.setattr(bpftrace, "TRACEFS", (str(tmp_path / "missing"), str(tmp_path)))
    names = bpftrace.traceable_functions()
    assert {"online_pages", "sparse_add_section", "__add_pages", "virtio_mem_probe"} <= names
    from types import SimpleNamespace

    read = []
    monkeypatch.setattr(bpftrace, "kprobe_functions", lambda: read.append(1) or {"offline_pages"})
    btf = SimpleNamespace(func_signature=K612.get)
    probes, absent = bpftrace.choose_probes(btf)
    # offline_pages and others are not in this list: kallsyms read once, and its offline_pages taken
    assert read == [1] and any(p.function == "offline_pages" and p.mechanism == "kprobe" for p in probes)
    (tmp_path / "available_filter_functions").write_text("\n".join(K612) + "\n")
    read.clear()
    bpftrace.choose_probes(btf)
    assert read == []  # every function traceable: kallsyms never read
