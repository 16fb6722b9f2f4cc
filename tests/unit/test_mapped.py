"""mapped.VmemmapMemory: virtual reads through the walk's leaves give exactly what the
target's own virtual read gives, and raise what it raises."""

import random

import pytest

from inspect_vmemmap.mapped import VmemmapMemory
from inspect_vmemmap.memory import FaultError
from inspect_vmemmap.vmemmap import MappedLeaf

PAGE = 4096
VBASE = 0xFFFFEA0000000000


class MmuMemory:
    """Physical pages, and a virtual read that translates page by page through its own
    map (the independent truth), counting the reads each way."""

    def __init__(self, phys_pages, vmap):
        self.phys = phys_pages  # phys page address -> bytes
        self.vmap = vmap  # virtual page address -> phys page address
        self.reads = {True: 0, False: 0}

    def read(self, address, size, physical=False):
        self.reads[physical] += 1
        out = bytearray()
        a = address
        while len(out) < size:
            page = a - a % PAGE
            p = page if physical else self.vmap.get(page)
            if p is None or p not in self.phys:
                raise FaultError(address, physical, "not mapped" if not physical else "not RAM")
            take = min(PAGE - a % PAGE, size - len(out))
            out += self.phys[p][a - page:a - page + take]
            a += take
        return bytes(out)


def _machine(seed=1):
    rnd = random.Random(seed)
    phys = {}
    vmap = {}
    leaves = []
    va = VBASE
    p = 0x100000000
    # a 2M leaf, then a split PMD with HVO-like folios (a head page, 7 tails on it), a
    # hole, then base pages backed by RAM missing from the dump
    for k in range(512):
        vmap[va + k * PAGE] = p + k * PAGE
    leaves.append(MappedLeaf(va, 512 * PAGE, p, True))
    va += 512 * PAGE
    p += 512 * PAGE
    for f in range(8):
        head = p + f * PAGE
        for k in range(8):
            vmap[va + k * PAGE] = head
            leaves.append(MappedLeaf(va + k * PAGE, PAGE, head, k == 0))
        va += 8 * PAGE
    p += 8 * PAGE
    va += 16 * PAGE  # unmapped
    for k in range(4):
        vmap[va + k * PAGE] = p + 0x10000000 + k * PAGE
        leaves.append(MappedLeaf(va + k * PAGE, PAGE, p + 0x10000000 + k * PAGE, True))
    pages = set(vmap.values())
    for q in pages:
        phys[q] = bytes(rnd.randrange(256) for _ in range(PAGE))
    del phys[p + 0x10000000 + 2 * PAGE]  # not in the dump
    return MmuMemory(phys, vmap), leaves, va + 4 * PAGE


def _outcome(mem, a, n):
    try:
        return mem.read(a, n)
    except FaultError as e:
        return ("fault", str(e))


def test_every_read_as_the_virtual_read_says():
    mem, leaves, top = _machine()
    vm = VmemmapMemory(mem, leaves)
    rnd = random.Random(7)
    for _ in range(3000):
        a = VBASE - 2 * PAGE + rnd.randrange(top - VBASE + 4 * PAGE)
        n = rnd.choice([1, 8, 64, 4096, 8192, 3 * PAGE + 17, 40 * PAGE])
        assert _outcome(vm, a, n) == _outcome(mem, a, n), (hex(a), n)


def test_one_physical_read_per_piece():
    mem, leaves, _ = _machine()
    vm = VmemmapMemory(mem, leaves)
    assert vm.pieces(VBASE + 100, 512 * PAGE - 100) == [(0x100000000 + 100, 512 * PAGE - 100)]
    mem.reads = {True: 0, False: 0}
    vm.read(VBASE + 511 * PAGE, 2 * PAGE)  # the 2M leaf's last page, then the folio's head
    assert mem.reads == {True: 1, False: 0}  # physically contiguous: one read
    mem.reads = {True: 0, False: 0}
    split = VBASE + 512 * PAGE
    data = vm.read(split, 8 * PAGE)  # a head and its 7 tails: one page, read once
    assert mem.reads == {True: 1, False: 0}
    assert data == mem.read(split, PAGE) * 8


def test_outside_the_leaves_reads_virtually():
    mem, leaves, top = _machine()
    vm = VmemmapMemory(mem, leaves)
    assert vm.pieces(VBASE - PAGE, 2 * PAGE) is None
    assert vm.pieces(top - 8, 16) is None
    with pytest.raises(FaultError) as e:
        vm.read(top, 8)
    assert "virtual" in str(e.value)
    assert VmemmapMemory(mem, []).pieces(VBASE, 8) is None
