"""Hostile input at volume (issue 15): seeded mutations of a saved layout (``model``) and
of a real fixture's VMCOREINFO and bytes (``check``), each answered with a result or a
one-line refusal (AnalysisError, exit 2), never another exception, never a loop.

The number of cases scales with INSPECT_VMEMMAP_FUZZ_EXAMPLES (default 300): layouts
3 times that (no drgn), dump mutations a tenth. Each case runs under an alarm
far above what it needs, so a hang fails the case instead of blocking the suite."""

from __future__ import annotations

import json
import os
import random
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_vmemmap.errors import AnalysisError
from tests.recorded import unpack

EXAMPLES = int(os.environ.get("INSPECT_VMEMMAP_FUZZ_EXAMPLES", "300"))
HANG = 120  # seconds: a case that takes this long is a hang


class Hang(Exception):
    pass


@contextmanager
def bounded(seconds=HANG):
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def fixture_core(tmp_path_factory):
    return unpack("7.2-hvo", tmp_path_factory.mktemp("fuzz-hostile"))


@pytest.fixture(scope="module")
def saved_layout(fixture_core):
    from inspect_vmemmap.commands import confirmed_check
    from inspect_vmemmap.source import open_target

    *_, inputs, _ = confirmed_check(open_target(core=str(fixture_core)))
    return json.loads(json.dumps(inputs.to_json()))


# -- model: mutated layouts --------------------------------------------------------------------

_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, -1, 2**52, 2**64 - 1, 2**64, 4096, 8192, 63, 12, 99]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["0x0", "0xffffffffffffffff", "0x10000000000000", "zz", "-0x1", ""]),
    st.lists(st.integers(min_value=-1, max_value=2**53), max_size=4),
    st.recursive(st.integers(0, 9), lambda c: st.lists(c, max_size=3), max_leaves=20),
    st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=3),
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    cur = doc
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return doc


def _refuse_or_predict(tmp_path, text):
    from inspect_vmemmap.inputs import load_layout
    from inspect_vmemmap.model import predict

    f = tmp_path / "layout.json"
    f.write_text(text)
    with bounded():
        try:
            inputs = load_layout(str(f))
        except AnalysisError as e:
            assert "\n" not in str(e)
            return "refused"
        try:
            pred = predict(inputs)
        except AnalysisError as e:
            assert "\n" not in str(e)
            return "refused"
        json.dumps(pred.to_json())
    return "predicted"


@settings(max_examples=EXAMPLES * 3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_layouts_are_predicted_or_refused(saved_layout, tmp_path, data):
    doc = json.loads(json.dumps(saved_layout))
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        try:
            doc = _set(doc, path, data.draw(_values))
        except (TypeError, KeyError, IndexError):
            continue
        paths = list(_paths(doc))
    text = json.dumps(doc, allow_nan=True)
    _refuse_or_predict(tmp_path, text)


def test_layouts_with_ram_up_to_every_power_of_two(saved_layout, tmp_path):
    """RAM from 0 up to 2^k, one case each: predicted while the model can, refused
    beyond, never a loop."""
    seen = set()
    # up to 4096 sections predicted (2^39 with 128M sections), then past MAX_SECTIONS,
    # MAX_PHYSMEM_BITS and 64 bits
    for k in list(range(12, 40)) + [46, 52, 53, 64, 70]:
        doc = json.loads(json.dumps(saved_layout))
        doc["ram"] = [["0x0", hex(1 << k)]]
        doc["boot_ram"] = None
        seen.add(_refuse_or_predict(tmp_path, json.dumps(doc)))
    assert seen == {"predicted", "refused"}


# -- check: mutated dumps ----------------------------------------------------------------------


def _vmcoreinfo_lines(data: bytes):
    at = data.find(b"OSRELEASE=")
    end = data.find(b"\0", at)
    pos = at
    for line in data[at:end].split(b"\n"):
        k, eq, v = line.partition(b"=")
        if eq and v:
            yield pos + len(k) + 1, v
        pos += len(line) + 1


def _check_in_process(path):
    from inspect_vmemmap.commands import confirmed_check
    from inspect_vmemmap.inputs import check_target_inputs, require_possible
    from inspect_vmemmap.source import open_target
    from inspect_vmemmap.truncation import attach

    with bounded():
        try:
            check_target_inputs(core=str(path))
            t = attach(require_possible(open_target(core=str(path))), str(path))
            _, doc, findings, *_ = confirmed_check(t)
        except AnalysisError as e:
            assert "\n" not in str(e), e
            return None
        except MemoryError:
            pytest.fail("out of memory")
    json.dumps(doc)
    return doc


CASES = max(10, EXAMPLES // 10)


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_vmcoreinfo_and_bytes(fixture_core, tmp_path, seed):
    """Per seed: one VMCOREINFO value overwritten (same length: digits, hex, signs,
    non-ASCII), or a run of random bytes written somewhere in the file, or the file cut
    at a random point."""
    rnd = random.Random(seed)
    data = bytearray(fixture_core.read_bytes())
    what = rnd.choice(["vmcoreinfo", "vmcoreinfo", "bytes", "cut"])
    if what == "vmcoreinfo":
        lines = list(_vmcoreinfo_lines(bytes(data)))
        pos, v = rnd.choice(lines)
        alphabet = rnd.choice([b"0123456789", b"0123456789abcdef", b"-0123456789", bytes(range(128, 256)), b"x\n=("])
        new = bytes(rnd.choice(alphabet) for _ in v)
        data[pos:pos + len(v)] = new
    elif what == "bytes":
        at = rnd.randrange(len(data))
        n = rnd.choice([1, 8, 64, 4096])
        data[at:at + n] = bytes(rnd.randrange(256) for _ in range(min(n, len(data) - at)))
    else:
        del data[rnd.randrange(len(data)):]
    path = tmp_path / "m.core"
    path.write_bytes(bytes(data))
    _check_in_process(path)
