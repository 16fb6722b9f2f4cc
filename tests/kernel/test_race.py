"""A running kernel changing underneath `check` (issue 5), on a real kernel through QMP.

The guest (Debian 6.12, HugeTLB vmemmap optimisation on) grows its HugeTLB pool to 8 pages
and shrinks it to 0, over and over, printing the pool size after each change; every change
remaps the vmemmap of 8 folios. The test holds the guest stopped (QMP `stop` on the lab's
own monitor) while check reads it, and lets exactly one change happen in the middle of the
first read: after the page-table walk, before the HugeTLB pools are read. That read mixes
two states; the second read sees one. What the first read alone reported must come back as
`race` warnings, not errors.
"""

from __future__ import annotations

import re
import time

import pytest

from inspect_vmemmap.lab import GuestSpec, boot_guest

pytestmark = pytest.mark.kernel

# /init runs this before it prints its account to the same console: the loop waits 10 s
# first, so that its lines cannot fall between the account's (a run saw "IVM-HP 8" read as
# the memory block size)
CHURN = ("( sleep 10; while :; do for n in 8 0; do echo $n > /proc/sys/vm/nr_hugepages; "
         "echo IVM-HP $(cat /proc/sys/vm/nr_hugepages); sleep 1; done; done ) &")


@pytest.fixture(scope="module")
def churning(tmp_path_factory):
    spec = GuestSpec(debian="6.12", mem="1G", hvo=True, la57=False, init_extra=CHURN)
    with boot_guest(spec, workdir=tmp_path_factory.mktemp("race")) as guest:
        yield guest


def _pool_changes(guest) -> list:
    return re.findall(r"IVM-HP (\d+)", guest.console_text())


def test_a_change_during_a_read_is_a_race(churning, monkeypatch):
    from inspect_vmemmap.source import gather as gather_mod
    from inspect_vmemmap.source import open_target
    from inspect_vmemmap.commands import confirmed_check
    from inspect_vmemmap.findings import exit_status

    guest = churning
    deadline = time.monotonic() + 120
    while len(_pool_changes(guest)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(_pool_changes(guest)) >= 2, guest.console_tail()
    guest.qmp("stop")
    try:
        t = open_target(qemu=str(guest.qmp_socket), vmlinux=str(guest.kernel.vmlinux))
        real = gather_mod.gather_inputs
        pools = []

        def gather_inputs(tgt, notes=None, memory=None):
            if not pools:  # first read: the walk is done; let the pool change once
                seen = len(_pool_changes(guest))
                guest.qmp("cont")
                end = time.monotonic() + 60
                while len(_pool_changes(guest)) == seen and time.monotonic() < end:
                    time.sleep(0.05)
                guest.qmp("stop")
                pools.append(_pool_changes(guest)[seen:])
            return real(tgt, notes, memory)

        monkeypatch.setattr(gather_mod, "gather_inputs", gather_inputs)
        a, doc, findings, res, inputs, notes = confirmed_check(t, passes=3)
    finally:
        guest.qmp("cont")

    (changed,) = pools
    assert len(changed) == 1, f"the pool changed {changed} times during the first read"
    now = int(changed[0])
    assert doc["target"]["source"] == "qemu" and doc["target"]["reads"] == 2
    races = [f for f in findings if f.kind == "race"]
    assert races, [f.to_json() for f in findings]
    assert all(f.severity == "warning" and f.extra["seen_in"] == [1] for f in races)
    assert {f.extra["was"] for f in races} <= {"hvo-inconsistent", "alias", "backing-free"}
    assert exit_status(findings) == 0, [f.to_json() for f in findings if f.severity == "error"]
    # the second read saw the pool as the guest left it
    assert res.hvo["optimized_folios"] == now
    assert len(inputs.folios) == now
