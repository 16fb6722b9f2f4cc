"""boot waits on the guest's own state (issue 17): the state lines /init writes on a serial
port of their own, the deadlines scaled to what is asked, and what a timeout says."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspect_vmemmap.lab.account import GuestAccount, parse_state
from inspect_vmemmap.lab.arch import ARCHES
from inspect_vmemmap.lab.errors import LabError
from inspect_vmemmap.lab.guest import Guest, GuestSpec, boot_deadline, hotplug_deadline, qemu_argv
from inspect_vmemmap.lab.initramfs import make_init

LINE = ("IVM-STATE {seq} memtotal=1954452 blocks: memory0=online memory32=online memory33={st} "
        "hugepages: 2048kB=4/3 1048576kB=0/0 IVM-STATE-END")


def test_parse_state_takes_the_last_whole_line():
    text = "\r\n".join([LINE.format(seq=1, st="offline"), LINE.format(seq=2, st="online"),
                        "IVM-STATE 3 memtotal=1 blocks: memory0=onl"])  # cut short: skipped
    st = parse_state(text)
    assert st.seq == 2 and st.memory_blocks == {0: "online", 32: "online", 33: "online"}
    assert st.mem_total_kb == 1954452 and st.hugepages == {2048: (4, 3), 1 << 20: (0, 0)}
    assert parse_state("garbage IVM-STATE x") is None
    assert st.blocks_text(range(31, 35)) == "memory31=absent, memory32-33=online, memory34=absent"


def test_init_writes_state_lines_to_its_port():
    init = make_init([], watch_memory=True, state_device="/dev/ttyS2")
    assert "ivm_dev=/dev/ttyS2" in init and "IVM-STATE $ivm_seq" in init and "free_hugepages" in init
    assert "IVM-STATE" not in make_init([])  # only guests that take hotplug


def test_state_port_on_x86_64():
    spec = GuestSpec(maxmem="4G")
    argv = qemu_argv(spec, ARCHES["x86_64"], "qemu", "k", "i", "q", "c", "/w/console.log")
    assert "file,id=ivmstate,path=/w/state.log" in argv and "isa-serial,chardev=ivmstate,index=2" in argv
    assert not any("ivmstate" in a for a in qemu_argv(GuestSpec(), ARCHES["x86_64"], "qemu", "k", "i", "q", "c",
                                                      "/w/console.log"))


def test_deadlines_scale_with_what_is_asked():
    small = boot_deadline(GuestSpec(mem="1G"))
    assert boot_deadline(GuestSpec(mem="64G")) > small
    assert boot_deadline(GuestSpec(mem="1G", hugepages=400, hvo=True)) > small
    assert boot_deadline(GuestSpec(mem="1G", numa=2)) > small
    assert hotplug_deadline(64, False) > hotplug_deadline(8, False)
    assert hotplug_deadline(8, True) > hotplug_deadline(8, False)


class _Proc:
    returncode = None

    def poll(self):
        return None


def _guest(tmp_path: Path) -> Guest:
    g = Guest(GuestSpec(maxmem="4G"), kernel=type("K", (), {"release": "6.12-test"})(), workdir=tmp_path,
              sockdir=tmp_path)
    g.account = GuestAccount(memory_block_size=128 << 20, memory_blocks={0: "online"})
    g.process = _Proc()
    replies = {"object-add": {}, "device_add": {},
               "query-memory-devices": [{"data": {"id": "ivm-hp-dimm0", "addr": 32 * (128 << 20), "size": 256 << 20}}]}
    g.qmp = lambda cmd, *a, **k: replies[cmd]
    return g


def test_hotplug_waits_on_the_state_and_says_what_it_saw(tmp_path):
    g = _guest(tmp_path)
    g.state_log.write_text(LINE.format(seq=7, st="offline") + "\n")
    said = []
    with pytest.raises(LabError) as e:
        g.hotplug("256M", timeout=0.5, progress=said.append)
    msg = str(e.value).splitlines()[0]
    assert "memory32-33 not online after 0s" in msg and "state line (#7) says memory32=online, memory33=offline" in msg
    assert any("waiting up to 0s for the guest's sysfs to show memory32-33 online" in s for s in said), said


def test_hotplug_done_when_the_state_says_so(tmp_path):
    g = _guest(tmp_path)
    g.state_log.write_text(LINE.format(seq=8, st="online") + "\n")
    g.hotplug("256M", timeout=1, progress=lambda s: None)  # no account reprinted: the state line's
    assert g.account.memory_blocks == {0: "online", 32: "online", 33: "online"}
    assert g.account.mem_total_kb == 1954452 and g.account.nr_hugepages == {2048: 4, 1 << 20: 0}


def test_hotplug_with_no_state_at_all(tmp_path):
    g = _guest(tmp_path)
    with pytest.raises(LabError, match="wrote no state line at all to state.log"):
        g.hotplug("256M", timeout=0.3, progress=lambda s: None)
