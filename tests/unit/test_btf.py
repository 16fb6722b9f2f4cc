"""inspect_vmemmap.btf: synthetic BTF blobs built here, garbage of every sort, and the live
kernel's /sys/kernel/btf/vmlinux parsed whole. The lab's Debian vmlinux files are checked
against their own DWARF in tests/kernel/test_btf_dwarf.py."""

from __future__ import annotations

import random
import struct
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pytest

from inspect_vmemmap.btf import Btf, BtfError, KIND_NAMES

LIVE_BTF = "/sys/kernel/btf/vmlinux"


# ---- building BTF ------------------------------------------------------------------------

class BtfBuilder:
    """Writes BTF blobs type by type; each add returns the new type's id (ids start at 1)."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.string_offsets: Dict[str, int] = {"": 0}
        #: (name, kind, vlen, kind_flag, size_or_type, extra u32 words; a str word is a name)
        self.types: List[Tuple[str, int, int, int, int, List[Union[int, str]]]] = []

    def _str(self, s: str) -> int:
        if s not in self.string_offsets:
            self.string_offsets[s] = len(self.strings)
            self.strings += s.encode() + b"\0"
        return self.string_offsets[s]

    def add(self, kind: str, name: str = "", size_or_type: int = 0, extra: Sequence[Union[int, str]] = (),
            vlen: int = 0, kind_flag: int = 0) -> int:
        self.types.append((name, KIND_NAMES.index(kind), vlen, kind_flag, size_or_type, list(extra)))
        return len(self.types)

    @property
    def next_id(self) -> int:
        return len(self.types) + 1

    # one helper per kind
    def int_(self, name: str, size: int, signed: bool = False) -> int:
        return self.add("int", name, size, [(1 if signed else 0) << 24 | size * 8])

    def float_(self, name: str, size: int) -> int:
        return self.add("float", name, size)

    def ptr(self, target: int) -> int:
        return self.add("ptr", "", target)

    def typedef(self, name: str, target: int) -> int:
        return self.add("typedef", name, target)

    def modifier(self, kind: str, target: int, name: str = "") -> int:
        return self.add(kind, name, target)

    def array(self, elem: int, nelems: int, index_type: int = 1) -> int:
        return self.add("array", "", 0, [elem, index_type, nelems])

    def struct(self, name: str, size: int, members: Sequence[Tuple[str, int, int, int]], union: bool = False) -> int:
        """members: (name, type, bit offset, bitfield size)"""
        kflag = int(any(m[3] for m in members))
        words: List[Union[int, str]] = []
        for mname, mtype, bit_off, bsz in members:
            words += [mname, mtype, (bsz << 24 | bit_off) if kflag else bit_off]
        return self.add("union" if union else "struct", name, size, words, len(members), kflag)

    def enum(self, name: str, values: Sequence[Tuple[str, int]], size: int = 4, signed: bool = False) -> int:
        words: List[Union[int, str]] = []
        for n, v in values:
            words += [n, v & 0xFFFFFFFF]
        return self.add("enum", name, size, words, len(values), int(signed))

    def enum64(self, name: str, values: Sequence[Tuple[str, int]], signed: bool = False) -> int:
        words: List[Union[int, str]] = []
        for n, v in values:
            v &= (1 << 64) - 1
            words += [n, v & 0xFFFFFFFF, v >> 32]
        return self.add("enum64", name, 8, words, len(values), int(signed))

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add("fwd", name, 0, kind_flag=int(union))

    def func_proto(self, ret: int, params: Sequence[Tuple[str, int]]) -> int:
        words: List[Union[int, str]] = []
        for n, t in params:
            words += [n, t]
        return self.add("func_proto", "", ret, words, len(params))

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.add("func", name, proto, vlen=linkage)

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self.add("var", name, type_id, [linkage])

    def datasec(self, name: str, size: int, vars_: Sequence[Tuple[int, int, int]]) -> int:
        words: List[Union[int, str]] = []
        for v, off, sz in vars_:
            words += [v, off, sz]
        return self.add("datasec", name, size, words, len(vars_))

    def decl_tag(self, name: str, target: int, component_idx: int = -1) -> int:
        return self.add("decl_tag", name, target, [component_idx & 0xFFFFFFFF])

    def type_tag(self, name: str, target: int) -> int:
        return self.add("type_tag", name, target)

    def blob(self, endian: str = "<", hdr_extra: int = 0) -> bytes:
        """The BTF: header (24 bytes plus ``hdr_extra`` zero bytes), types, strings."""
        types = bytearray()
        for name, kind, vlen, kflag, size_or_type, extra in self.types:
            info = kflag << 31 | kind << 24 | vlen
            types += struct.pack(endian + "III", self._str(name), info, size_or_type)
            for w in extra:
                types += struct.pack(endian + "I", self._str(w) if isinstance(w, str) else w)
        strings = bytes(self.strings)
        hdr_len = 24 + hdr_extra
        header = struct.pack(endian + "HBBIIIII", 0xEB9F, 1, 0, hdr_len, 0, len(types), len(types), len(strings))
        return header + bytes(hdr_extra) + bytes(types) + strings


PAGE_FLAGS = [("PG_locked", 0), ("PG_writeback", 1), ("PG_head", 6), ("PG_reserved", 13), ("__NR_PAGEFLAGS", 24)]
SECTION_FLAGS = [("SECTION_MARKED_PRESENT_BIT", 0), ("SECTION_HAS_MEM_MAP_BIT", 1), ("SECTION_IS_ONLINE_BIT", 2),
                 ("SECTION_IS_EARLY_BIT", 3), ("SECTION_TAINT_ZONE_DEVICE_BIT", 4),
                 ("SECTION_IS_VMEMMAP_PREINIT_BIT", 5), ("SECTION_MAP_LAST_BIT", 6)]


def mini_kernel() -> BtfBuilder:
    """A few kernel types, shaped as 6.18 has them (anonymous unions in struct page, an
    anonymous enum for the section flags), plus one of every other kind."""
    b = BtfBuilder()
    ulong = b.int_("long unsigned int", 8)
    int_ = b.int_("int", 4, signed=True)
    uint = b.int_("unsigned int", 4)
    char = b.int_("char", 1, signed=True)
    list_head = b.next_id
    b.struct("list_head", 16, [("next", list_head + 1, 0, 0), ("prev", list_head + 1, 64, 0)])
    b.ptr(list_head)
    flags_struct = b.struct("", 8, [("f", ulong, 0, 0)])
    memdesc_flags_t = b.typedef("memdesc_flags_t", flags_struct)
    atomic = b.struct("", 4, [("counter", int_, 0, 0)])
    atomic_t = b.typedef("atomic_t", atomic)
    void_ptr = b.ptr(0)
    lru_union = b.struct("", 16, [("lru", list_head, 0, 0), ("buddy_list", list_head, 0, 0)], union=True)
    pagecache = b.struct("", 40, [("", lru_union, 0, 0), ("mapping", void_ptr, 128, 0), ("index", ulong, 192, 0),
                                  ("private", ulong, 256, 0)])
    tail = b.struct("", 8, [("compound_head", ulong, 0, 0)])
    big_union = b.struct("", 40, [("", pagecache, 0, 0), ("", tail, 0, 0)], union=True)
    mapcount_union = b.struct("", 4, [("page_type", uint, 0, 0), ("_mapcount", atomic_t, 0, 0)], union=True)
    b.struct("page", 64, [("flags", memdesc_flags_t, 0, 0), ("", big_union, 64, 0), ("", mapcount_union, 384, 0),
                          ("_refcount", atomic_t, 416, 0), ("memcg_data", ulong, 448, 0)])
    cb_head = b.struct("callback_head", 16, [("next", void_ptr, 0, 0), ("func", void_ptr, 64, 0)])
    usage = b.struct("mem_section_usage", 24, [("rcu", cb_head, 0, 0), ("subsection_map", b.array(ulong, 1), 128, 0),
                                               ("pageblock_flags", b.array(ulong, 0), 192, 0)])
    b.struct("mem_section", 16, [("section_mem_map", ulong, 0, 0), ("usage", b.ptr(usage), 64, 0)])
    const_char_ptr = b.ptr(b.modifier("const", char))
    zone = b.struct("zone", 48, [("zone_start_pfn", ulong, 0, 0), ("name", const_char_ptr, 64, 0),
                                 ("spanned_pages", ulong, 128, 0), ("pad", b.array(char, 24), 192, 0)])
    pglist = b.struct("pglist_data", 4 * 48 + 24, [("node_zones", b.array(zone, 4), 0, 0), ("nr_zones", int_, 1536, 0),
                                                   ("node_start_pfn", ulong, 1600, 0), ("node_id", int_, 1664, 0)])
    b.typedef("pg_data_t", pglist)
    b.enum("", SECTION_FLAGS)
    b.enum("zone_type", [("ZONE_DMA", 0), ("ZONE_DMA32", 1), ("ZONE_NORMAL", 2), ("ZONE_MOVABLE", 3), ("__MAX_NR_ZONES", 4)])
    b.enum("pageflags", PAGE_FLAGS + [("PG_readahead", 8)])
    b.enum("pagetype", [("PGTY_buddy", 0xF0), ("PGTY_table", 0xF2)])
    b.enum("signs", [("NEG_ONE", -1), ("SMALL", 5)], signed=True)
    b.enum("big", [("BIG", 0xFFFFFFFF)])
    b.enum64("wide", [("W_MIN", -(1 << 63)), ("W_ONE", 1)], signed=True)
    b.enum64("uwide", [("U_MAX", (1 << 64) - 1)])
    # bitfields (kind_flag set) and the kinds sizeof does not take
    b.struct("bits", 8, [("a", uint, 0, 3), ("b", uint, 3, 5), ("c", uint, 8, 8), ("d", uint, 32, 0)])
    b.fwd("opaque")
    b.fwd("maybe", union=True)
    cv = b.modifier("volatile", b.modifier("const", b.typedef("u32", uint)))
    b.typedef("cv_u32", cv)
    proto = b.func_proto(int_, [("x", ulong), ("", 0)])
    b.func("do_thing", proto)
    b.typedef("thing_fn", proto)
    v = b.var("jiffies", ulong)
    b.datasec(".data", 8, [(v, 0, 8)])
    b.decl_tag("tag", v)
    b.typedef("tagged", b.type_tag("user", ulong))
    b.float_("double", 8)
    b.struct("slot", 8, [("x", ulong, 0, 0)])
    b.struct("slot", 96, [("y", ulong, 0, 0)])
    b.fwd("mem_section")  # a forward declaration of an existing struct, after it
    matrix = b.array(b.array(uint, 3), 2)
    b.struct("grid", 24, [("m", matrix, 0, 0)])
    return b


@pytest.fixture(scope="module")
def mini() -> Btf:
    return Btf.parse(mini_kernel().blob())


# ---- the synthetic kernel -------------------------------------------------------------------

def test_sizes(mini):
    assert mini.sizeof("struct page") == 64
    assert mini.sizeof("page") == 64  # bare name, no typedef: the struct
    assert mini.sizeof("struct mem_section") == 16
    assert mini.sizeof("mem_section_usage") == 24
    assert mini.sizeof("pg_data_t") == mini.sizeof("struct pglist_data") == 216
    assert mini.sizeof("long unsigned int") == 8 and mini.sizeof("char") == 1
    assert mini.sizeof("memdesc_flags_t") == 8 and mini.sizeof("atomic_t") == 4
    assert mini.sizeof("cv_u32") == 4  # typedef -> volatile -> const -> typedef -> int
    assert mini.sizeof("tagged") == 8  # type_tag
    assert mini.sizeof("grid") == 24 and mini.sizeof(mini.member_type("grid", "m")) == 24
    assert mini.sizeof(mini.member_type("zone", "name")) == 8  # pointer = sizeof(long)
    assert mini.sizeof("enum zone_type") == 4 and mini.sizeof("enum wide") == 8
    assert mini.sizeof("jiffies") == 8 and mini.sizeof(".data") == 8 and mini.sizeof("double") == 8
    assert mini.sizeof(mini.find("struct page")) == 64


def test_sizeof_refuses_what_has_no_size(mini):
    for what in ("opaque", "do_thing", "thing_fn", "tag", 0):
        with pytest.raises(BtfError):
            mini.sizeof(what)
    with pytest.raises(KeyError):
        mini.sizeof("struct nonesuch")
    with pytest.raises(BtfError):
        mini.sizeof(10 ** 6)


def test_offsets(mini):
    assert mini.offsetof("struct mem_section", "usage") == 8
    assert mini.offsetof("mem_section", "section_mem_map") == 0
    assert mini.offsetof("struct mem_section_usage", "subsection_map") == 16
    # inside anonymous unions and structs, as C finds them
    assert mini.offsetof("struct page", "compound_head") == 8
    assert mini.offsetof("struct page", "lru") == 8 and mini.offsetof("struct page", "buddy_list") == 8
    assert mini.offsetof("struct page", "mapping") == 24 and mini.offsetof("struct page", "private") == 40
    assert mini.offsetof("struct page", "_mapcount") == 48 == mini.offsetof("struct page", "page_type")
    assert mini.offsetof("struct page", "memcg_data") == 56
    # paths: nested members, array elements, through typedefs
    assert mini.offsetof("struct page", "lru.prev") == 16
    assert mini.offsetof("struct page", "flags.f") == 0
    assert mini.offsetof("struct page", "_refcount.counter") == 52
    assert mini.offsetof("pg_data_t", "node_start_pfn") == 200
    assert mini.offsetof("pg_data_t", "node_zones[2].spanned_pages") == 2 * 48 + 16
    assert mini.offsetof("grid", "m[1][2]") == 12 + 8
    assert mini.offsetof(mini.find("struct zone"), "name") == 8


def test_absent_members_raise_key_error(mini):
    for struct_name, path in [("struct page", "nonesuch"), ("struct nonesuch", "x"), ("struct page", "flags.g"),
                              ("struct page", "memcg_data.x"), ("struct page", "lru[1]"), ("struct page", "a..b"),
                              ("struct page", "")]:
        with pytest.raises(KeyError):
            mini.offsetof(struct_name, path)
    assert not mini.has_member("struct page", "index.x") and mini.has_member("struct page", "index")
    for not_a_struct in ("long unsigned int", "zone_type", "opaque"):
        with pytest.raises(KeyError):
            mini.offsetof(not_a_struct, "x")
        with pytest.raises(KeyError):
            mini.members(not_a_struct)


def test_bitfields(mini):
    assert [(m.name, m.bit_offset, m.bitfield_size) for m in mini.members("bits")] == \
        [("a", 0, 3), ("b", 3, 5), ("c", 8, 8), ("d", 32, 0)]
    assert mini.bit_offsetof("bits", "b") == 3
    assert mini.offsetof("bits", "c") == 1 and mini.offsetof("bits", "d") == 4
    with pytest.raises(BtfError):
        mini.offsetof("bits", "b")  # starts mid-byte


def test_member_types(mini):
    t = mini.member_type("struct page", "flags")
    assert (mini.kind(t), mini.name(t)) == ("typedef", "memdesc_flags_t")
    assert mini.kind(mini.resolve(t)) == "struct" and mini.name(mini.resolve(t)) == ""
    assert mini.name(mini.member_type("struct page", "compound_head")) == "long unsigned int"
    assert mini.kind(mini.member_type("struct mem_section", "usage")) == "ptr"
    assert [m.name for m in mini.members("struct page")] == ["flags", "", "", "_refcount", "memcg_data"]
    assert mini.kind(0) == "void" and mini.name(0) == "void"


def test_find(mini):
    page = mini.find("struct page")
    assert page == mini.find("page", "struct") == mini.find("page")
    assert mini.kind(page) == "struct" and mini.name(page) == "page"
    assert mini.find("page", "union") is None and mini.find("nonesuch") is None
    assert mini.kind(mini.find("opaque")) == "fwd" and mini.find("opaque", "struct") is None
    # a forward declaration does not hide the definition
    assert mini.kind(mini.find("mem_section")) == "struct" and mini.find("mem_section", "fwd") is not None
    # "enum" finds ENUM64 too
    assert mini.kind(mini.find("enum wide")) == "enum64" == mini.kind(mini.find("wide", "enum64"))
    assert mini.kind(mini.find("jiffies")) == "var" and mini.kind(mini.find("do_thing")) == "func"
    # duplicate names: the lowest id, and find_all tells
    slots = mini.find_all("struct slot")
    assert len(slots) == 2 and mini.find("struct slot") == slots[0] and mini.sizeof(slots[0]) == 8
    assert mini.find_all("nonesuch") == []
    with pytest.raises(ValueError):
        mini.find("page", "structure")
    assert len(mini) == len(mini_kernel().types)


def test_enums(mini):
    assert mini.enum_value("SECTION_MARKED_PRESENT_BIT") == 0  # in an anonymous enum
    assert mini.enum_value("SECTION_MAP_LAST_BIT") == 6
    assert mini.enum_value("__MAX_NR_ZONES") == 4
    assert mini.enum_value("PG_head") == 6 and mini.enum_value("PG_reserved") == 13
    assert mini.enum_value("PGTY_buddy") == 0xF0
    assert mini.enum_value("PAGE_TYPE_BASE") is None
    assert mini.enum_value("NEG_ONE") == -1 and mini.enum_value("BIG") == 0xFFFFFFFF
    assert mini.enum_value("W_MIN") == -(1 << 63) and mini.enum_value("U_MAX") == (1 << 64) - 1
    assert mini.enumerators("zone_type")["ZONE_MOVABLE"] == 3
    assert mini.enumerators("enum pageflags") == dict(PAGE_FLAGS + [("PG_readahead", 8)])
    assert mini.enumerators(containing="SECTION_IS_EARLY_BIT") == dict(SECTION_FLAGS)
    assert mini.enumerators("SECTION_IS_EARLY_BIT") == dict(SECTION_FLAGS)  # an enumerator: its enum
    assert list(mini.enumerators(None, containing="SECTION_MARKED_PRESENT_BIT")) == [n for n, _ in SECTION_FLAGS]
    for bad in [dict(enum_name="nonesuch"), dict(enum_name="enum SECTION_IS_EARLY_BIT"), dict(containing="nonesuch"), {}]:
        with pytest.raises(KeyError):
            mini.enumerators(**bad)


def test_big_endian_and_longer_header_give_the_same_answers(mini):
    b = mini_kernel()
    for blob in (b.blob(">"), b.blob("<", hdr_extra=8), b.blob(">", hdr_extra=4) + bytes(100)):
        other = Btf.parse(blob)
        assert other.sizeof("struct page") == 64 and other.offsetof("struct page", "compound_head") == 8
        assert other.offsetof("pg_data_t", "node_zones[2].spanned_pages") == 112
        assert [(m.name, m.bit_offset, m.bitfield_size) for m in other.members("bits")] == \
            [(m.name, m.bit_offset, m.bitfield_size) for m in mini.members("bits")]
        assert other.enum_value("NEG_ONE") == -1 and other.enum_value("W_MIN") == -(1 << 63)
        assert other.enumerators(containing="SECTION_MAP_LAST_BIT") == dict(SECTION_FLAGS)


def test_blob_size_from_the_header_alone():
    blob = mini_kernel().blob()
    assert Btf.blob_size(blob[:24]) == len(blob)
    assert Btf.blob_size(mini_kernel().blob(">", hdr_extra=8)[:24]) == len(blob) + 8
    assert Btf.parse(blob + b"\xff" * 64).sizeof("struct page") == 64  # trailing bytes ignored
    with pytest.raises(BtfError):
        Btf.blob_size(b"\x9f\xeb\x01")


# ---- garbage ------------------------------------------------------------------------------

def _poke(btf: Btf) -> None:
    """Ask everything of a BTF that parsed: only BtfError or KeyError may come out."""
    quiet = (BtfError, KeyError)
    for tid in range(len(btf) + 2):
        for call in (lambda: btf.kind(tid), lambda: btf.name(tid), lambda: btf.sizeof(tid), lambda: btf.resolve(tid),
                     lambda: btf.members(tid)):
            try:
                call()
            except quiet:
                pass
    for name in ("struct page", "page", "mem_section", "pg_data_t", "grid", "bits", "zone_type", "jiffies"):
        btf.find(name)
        for call in (lambda: btf.sizeof(name), lambda: btf.offsetof(name, "compound_head"),
                     lambda: btf.offsetof(name, "node_zones[2].spanned_pages"), lambda: btf.offsetof(name, "lru.prev"),
                     lambda: btf.member_type(name, "flags"), lambda: btf.enumerators(name),
                     lambda: btf.offsetof(name, "m[1][2]"), lambda: btf.has_member(name, "usage")):
            try:
                call()
            except quiet:
                pass
    for e in ("SECTION_MAP_LAST_BIT", "PG_head", "W_MIN", "nonesuch"):
        try:
            btf.enum_value(e)
            btf.enumerators(containing=e)
        except quiet:
            pass


def _parse_or_btf_error(blob: bytes) -> Optional[Btf]:
    try:
        btf = Btf.parse(blob)
    except BtfError as e:
        assert str(e) and "\n" not in str(e)
        return None
    _poke(btf)
    return btf


def test_every_truncation_is_a_btf_error():
    for blob in (mini_kernel().blob("<"), mini_kernel().blob(">")):
        for n in range(len(blob)):
            with pytest.raises(BtfError):
                Btf.parse(blob[:n])


def test_bad_headers():
    good = mini_kernel().blob()
    hdr = list(struct.unpack_from("<HBBIIIII", good))

    def with_header(**changes) -> bytes:
        fields = dict(zip(["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"], hdr))
        fields.update(changes)
        return struct.pack("<HBBIIIII", *fields.values()) + good[24:]

    bad = [b"", b"\x9f", b"\x9f\xeb\x01\x00", bytes(24), b"\x7fELF" + bytes(100), with_header(magic=0x9FEB),
           with_header(version=2), with_header(hdr_len=0), with_header(hdr_len=23), with_header(hdr_len=len(good) + 1),
           with_header(hdr_len=0xFFFFFFFF), with_header(type_off=len(good)), with_header(type_len=0xFFFFFFFF),
           with_header(type_off=0xFFFFFFF0, type_len=0x20), with_header(str_off=0xFFFFFFFF),
           with_header(str_len=0xFFFFFFFF), with_header(str_len=0), with_header(str_off=hdr[6] + 1, str_len=hdr[7] - 1),
           with_header(str_len=hdr[7] - 1),  # last string loses its NUL
           with_header(type_len=hdr[5] - 4),  # last type record cut short
           ]
    for blob in bad:
        with pytest.raises(BtfError):
            Btf.parse(blob)


def _one_type_blob(name_off: int, info: int, size: int, extra: bytes = b"", strings: bytes = b"\0x\0") -> bytes:
    types = struct.pack("<III", name_off, info, size) + extra
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def test_bad_type_records():
    struct_info = 4 << 24
    for blob in [
        _one_type_blob(1, struct_info | 0xFFFF, 8, bytes(12)),  # vlen runs past the end
        _one_type_blob(1, struct_info | 2, 8, bytes(12)),
        _one_type_blob(1, 6 << 24 | 1, 4, bytes(4)),  # an enum missing half an enumerator
        _one_type_blob(1, 19 << 24 | 1, 8, bytes(8)),  # enum64 likewise
        _one_type_blob(1, 1 << 24, 4),  # int without its u32
        _one_type_blob(0, 3 << 24, 0, bytes(8)),  # array short
        _one_type_blob(1, 20 << 24, 0),  # unknown kind
        _one_type_blob(1, 0, 0),  # kind 0 (void is never a record)
        _one_type_blob(99, 1 << 24, 4, bytes(4)),  # name outside the strings
        _one_type_blob(3, 1 << 24, 4, bytes(4)),  # name offset == string section length
    ]:
        with pytest.raises(BtfError):
            Btf.parse(blob)


def test_broken_references_are_btf_errors():
    b = BtfBuilder()
    b.typedef("loop_a", 2)
    b.typedef("loop_b", 1)
    b.array(3, 2)  # an array of itself
    b.typedef("self_array", 3)
    b.struct("inside_out", 8, [("", 5, 0, 0)])  # an anonymous member of its own type
    b.typedef("dangling", 999)
    b.struct("bad_member", 8, [("x", 12345, 0, 0), ("", 999, 0, 0)])
    b.enum("bad_name", [("ok", 1)])
    b.struct("deep", 8, [("", 9, 0, 0)])
    for i in range(200):  # 200 nested anonymous structs
        b.struct("", 8, [("", b.next_id + 1, 0, 0)] if i < 199 else [("leaf", 1, 0, 0)])
    btf = Btf.parse(b.blob())
    for call in (lambda: btf.sizeof("loop_a"), lambda: btf.resolve(1), lambda: btf.sizeof("self_array"),
                 lambda: btf.offsetof("inside_out", "x"), lambda: btf.sizeof("dangling"),
                 lambda: btf.offsetof("bad_member", "nope"), lambda: btf.sizeof(btf.member_type("bad_member", "x")),
                 lambda: btf.offsetof("deep", "leaf")):
        with pytest.raises(BtfError):
            call()
    _poke(btf)


def test_random_bytes_terminate_with_btf_error():
    rng = random.Random(1234)
    for i in range(3000):
        n = rng.randrange(0, 400)
        blob = bytearray(rng.getrandbits(8) for _ in range(n))
        if i % 2 and n >= 24:  # get past the magic and version, with plausible lengths
            type_len = rng.randrange(0, n)
            struct.pack_into("<HBBIIIII", blob, 0, 0xEB9F, 1, 0, 24, 0, type_len, type_len, max(0, n - 24 - type_len))
            if rng.random() < 0.5:
                blob[-1] = 0
                if type_len + 24 < n:
                    blob[24 + type_len] = 0
        _parse_or_btf_error(bytes(blob))


def test_mutated_blobs_parse_or_fail_cleanly():
    rng = random.Random(99)
    good = mini_kernel().blob()
    parsed = 0
    for _ in range(1500):
        blob = bytearray(good)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            pos = rng.randrange(len(blob))
            if rng.random() < 0.5:
                blob[pos] ^= 1 << rng.randrange(8)
            else:
                blob[pos] = rng.choice((0, 0xFF, rng.getrandbits(8)))
        parsed += _parse_or_btf_error(bytes(blob)) is not None
    assert parsed > 100  # mostly type data and names changed, which still parses


# ---- the live kernel -----------------------------------------------------------------------

def _live_btf() -> bytes:
    try:
        with open(LIVE_BTF, "rb") as f:
            return f.read()
    except OSError:
        pytest.skip(f"no readable {LIVE_BTF}")


def test_live_kernel_btf():
    """Whatever kernel this machine runs, its BTF parses whole and every type in it
    resolves, sizes and lays out its members without error; nothing here is a fact of one
    kernel (the facts are checked against DWARF on the lab's kernels, tests/kernel)."""
    data = _live_btf()
    btf = Btf.parse(data)
    assert Btf.blob_size(data) == len(data)
    for tid in range(1, len(btf) + 1):
        kind = btf.kind(tid)
        assert kind in KIND_NAMES
        if kind in ("struct", "union"):
            size = btf.sizeof(tid)
            for m in btf.members(tid):
                assert 0 <= m.bit_offset + m.bitfield_size <= size * 8 or not size


def test_func_signature():
    b = BtfBuilder()
    ulong = b.int_("long unsigned int", 8)
    int_ = b.int_("int", 4, signed=True)
    b.func("sparse_add_section", b.func_proto(int_, [("nid", int_), ("start_pfn", ulong), ("nr_pages", ulong)]))
    b.func("vmemmap_free", b.func_proto(0, [("start", ulong), ("end", ulong)]))
    btf = Btf.parse(b.blob())
    assert btf.func_signature("sparse_add_section") == (["nid", "start_pfn", "nr_pages"], True)
    assert btf.func_signature("vmemmap_free") == (["start", "end"], False)
    assert btf.func_signature("absent") is None


def test_watch_takes_the_btf_behind_the_per_build_cache_not_a_second_parse():
    """live.bpftrace.kernel_btf on a target whose types come from the per-build cache
    (kcache.RecordedTypes) gives the one Btf that answers for them, loaded once."""
    from types import SimpleNamespace

    from inspect_vmemmap.kcache import KernelRecord, RecordedTypes
    from inspect_vmemmap.live.bpftrace import kernel_btf

    b = BtfBuilder()
    b.func("vmemmap_free", b.func_proto(0, [("start", b.int_("long unsigned int", 8))]))
    loads = []

    def load():
        loads.append(1)
        return Btf.parse(b.blob())

    types = RecordedTypes(KernelRecord("ab" * 20, "r", None), load)
    got = kernel_btf(SimpleNamespace(types=types))
    assert isinstance(got, Btf) and got.func_signature("vmemmap_free") is not None
    assert kernel_btf(SimpleNamespace(types=types)) is got and loads == [1]


def test_an_enum_with_a_damaged_name_leaves_the_other_enums_answering():
    """An enumerator name offset outside the string section (a damaged dump: the fuzz suite
    found one) makes that enum's enumerators unknown; every other enum still answers."""
    b = mini_kernel()
    b.add("enum", "broken", 4, [0xFFFFFF, 7], 1)  # its one enumerator's name: far outside
    btf = Btf.parse(b.blob())
    assert btf.enum_value("__MAX_NR_ZONES") == 4 and btf.enum_value("PGTY_buddy") == 0xF0
    assert btf.enum_value("SECTION_MAP_LAST_BIT") == 6
    with pytest.raises(KeyError):
        btf.enumerators("broken")
