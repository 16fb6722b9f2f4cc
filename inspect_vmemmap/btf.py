"""A small BTF reader: the type facts VMCOREINFO lacks, from the kernel's own BTF.

A kernel built with CONFIG_DEBUG_INFO_BTF carries its types as BTF (the format of the
kernel's Documentation/bpf/btf.rst): live in /sys/kernel/btf/vmlinux, in a crash dump as
the bytes between the symbols ``__start_BTF`` and ``__stop_BTF``, and in vmlinux as the
``.BTF`` section. This module answers sizeof / offsetof / enumerator questions from such a
blob, with no DWARF and no dependencies.

:meth:`Btf.parse` makes one pass over the type records (checking every record fits and
indexing named types by name); members and enumerators are decoded only when asked for.
Broken input raises :class:`BtfError` with a one-line reason; a name or member that is not
there raises :class:`KeyError` (or gives ``None`` where the method says so).
"""

from __future__ import annotations

import re
import struct
from array import array
from typing import Dict, Iterator, List, Optional, Tuple, Union

BTF_MAGIC = 0xEB9F
_HEADER_LEN = 24  # struct btf_header: magic, version, flags, hdr_len, type_off/len, str_off/len

# BTF_KIND_* (include/uapi/linux/btf.h)
KIND_NAMES = ("void", "int", "ptr", "array", "struct", "union", "enum", "fwd", "typedef", "volatile",
              "const", "restrict", "func", "func_proto", "var", "datasec", "float", "decl_tag",
              "type_tag", "enum64")
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _FUNC, \
    _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(1, 20)
_MAX_KIND = _ENUM64
_KIND_BY_NAME = {n: k for k, n in enumerate(KIND_NAMES)}

# bytes after struct btf_type: a fixed part, plus vlen times a per-entry part
_FIXED_EXTRA = (0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 4, 0, 0)
_VLEN_EXTRA = (0, 0, 0, 0, 12, 12, 8, 0, 0, 0, 0, 0, 0, 8, 0, 12, 0, 0, 0, 12)

# kinds that only qualify or rename another type (followed by sizeof and friends)
_MODIFIERS = frozenset((_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG))
# which kind a bare name ("mem_section_usage") means, best first
_BARE_NAME_ORDER = (_TYPEDEF, _INT, _FLOAT, _STRUCT, _UNION, _ENUM, _ENUM64, _VAR, _DATASEC, _FUNC, _FWD,
                    _DECL_TAG, _TYPE_TAG)
_PREFIXES = {"struct": _STRUCT, "union": _UNION, "enum": _ENUM}
_MAX_DEPTH = 64  # typedef chains, array nesting and anonymous-member nesting; garbage can loop
_PATH_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


class DamagedType(KeyError):
    """A type whose members cannot be decoded (a name offset outside the string section):
    information missing, like an absent member, but not evidence that it is absent."""


class BtfError(Exception):
    """The BTF blob is not valid BTF, or does not hold what a question needs (one-line reason)."""


class Member:
    """One member of a struct or union; ``name`` is ``""`` for an anonymous member."""

    __slots__ = ("name", "type", "bit_offset", "bitfield_size")

    def __init__(self, name: str, type_id: int, bit_offset: int, bitfield_size: int) -> None:
        self.name = name
        self.type = type_id
        self.bit_offset = bit_offset
        self.bitfield_size = bitfield_size  # 0 unless a bitfield

    def __repr__(self) -> str:
        bits = f":{self.bitfield_size}" if self.bitfield_size else ""
        return f"Member({self.name!r}{bits}, type={self.type}, bit_offset={self.bit_offset})"


class Btf:
    """The types of one BTF blob. Build with :meth:`parse`; type ids start at 1 (0 is void)."""

    #: what the type information came from (the DWARF adapter's says "dwarf")
    source = "btf"

    def __init__(self, data: bytes, endian: str, types_start: int, strs_start: int, strs_end: int,
                 offsets: array, kinds: bytearray, names: Dict[str, Union[int, List[int]]]) -> None:
        self._data = data
        self._endian = endian
        self._types_start = types_start
        self._strs_start = strs_start
        self._strs_end = strs_end
        self._offsets = offsets  # type id -> offset of its struct btf_type in data (id 0 unused)
        self._kinds = kinds  # type id -> BTF_KIND_*
        self._names = names  # name -> type id, or list of ids when several types share the name
        self._u32 = struct.Struct(endian + "I").unpack_from
        self._3u32 = struct.Struct(endian + "III").unpack_from
        self._members: Dict[int, List[Member]] = {}
        self._enumerators: Optional[Dict[str, Tuple[int, int]]] = None
        self._ptr_size: Optional[int] = None

    # ---- construction ----------------------------------------------------------------

    @staticmethod
    def blob_size(header: bytes) -> int:
        """:return: the length of the whole BTF blob that starts with ``header`` (at least its
        first 24 bytes), so that a caller reading from memory knows how much to read.
        :raises BtfError: if the header is not a BTF header."""
        endian, hdr_len, type_off, type_len, str_off, str_len = _read_header(header, whole=False)
        return hdr_len + max(type_off + type_len, str_off + str_len)

    @classmethod
    def parse(cls, data: bytes) -> "Btf":
        """Check the header and every type record, and index the named types.

        Bytes after the declared type and string sections are ignored.

        :return: the parsed BTF.
        :raises BtfError: (one line) on anything that is not well-formed BTF: bad magic or
            version, sections outside the data, truncated or unknown type records, names
            outside the string section.
        """
        data = bytes(data)
        endian, hdr_len, type_off, type_len, str_off, str_len = _read_header(data)
        types_start = hdr_len + type_off
        types_end = types_start + type_len
        strs_start = hdr_len + str_off
        strs_end = strs_start + str_len
        if types_end > len(data):
            raise BtfError(f"type section ({types_start}+{type_len}) runs past the end of the {len(data)}-byte blob")
        if strs_end > len(data):
            raise BtfError(f"string section ({strs_start}+{str_len}) runs past the end of the {len(data)}-byte blob")
        if str_len == 0 or data[strs_start] != 0 or data[strs_end - 1] != 0:
            raise BtfError("string section does not start and end with a NUL byte")

        unpack = struct.Struct(endian + "III").unpack_from
        find_nul = data.find
        fixed, per_vlen = _FIXED_EXTRA, _VLEN_EXTRA
        offsets = array("L", [0])
        kinds = bytearray(1)
        add_offset, add_kind = offsets.append, kinds.append
        names: Dict[str, Union[int, List[int]]] = {}
        get_name = names.get
        pos, tid = types_start, 1
        while pos < types_end:
            if pos + 12 > types_end:
                raise BtfError(f"type {tid} at byte {pos - types_start} of the type section is truncated")
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            if kind == 0 or kind > _MAX_KIND:
                raise BtfError(f"type {tid} has unknown kind {kind}")
            nxt = pos + 12 + fixed[kind] + per_vlen[kind] * (info & 0xFFFF)
            if nxt > types_end:
                raise BtfError(f"type {tid} ({KIND_NAMES[kind]}, vlen {info & 0xFFFF}) runs past the end of the type section")
            add_offset(pos)
            add_kind(kind)
            if name_off:
                if name_off >= str_len:
                    raise BtfError(f"type {tid} has name offset {name_off} outside the {str_len}-byte string section")
                start = strs_start + name_off
                name = data[start:find_nul(b"\0", start)].decode("ascii", "replace")
                prev = get_name(name)
                if prev is None:
                    names[name] = tid
                elif isinstance(prev, list):
                    prev.append(tid)
                else:
                    names[name] = [prev, tid]
            pos = nxt
            tid += 1
        return cls(data, endian, types_start, strs_start, strs_end, offsets, kinds, names)

    # ---- plain facts about one type --------------------------------------------------

    def __len__(self) -> int:
        """:return: the number of types, not counting void (so ids are 1..len)."""
        return len(self._offsets) - 1

    def kind(self, type_id: int) -> str:
        """:return: the kind of a type: "int", "struct", "typedef", ... ("void" for id 0).
        :raises BtfError: if the id is out of range."""
        if type_id == 0:
            return "void"
        self._check_id(type_id)
        return KIND_NAMES[self._kinds[type_id]]

    def name(self, type_id: int) -> str:
        """:return: the name of a type ("" when anonymous; "void" for id 0), without any
        struct/union/enum prefix.
        :raises BtfError: if the id is out of range."""
        if type_id == 0:
            return "void"
        self._check_id(type_id)
        return self._str(self._u32(self._data, self._offsets[type_id])[0])

    def find_all(self, name: str, kind: Optional[str] = None) -> List[int]:
        """:return: the ids of every type with this name (and kind, as for :meth:`find`),
        lowest first; more than one means the kernel has several types of that name (a
        driver's private ``struct slot``, say), so :meth:`find` may not give the one meant.
        :raises ValueError: for an unknown kind name."""
        wanted = self._wanted_kinds(name, kind)
        ids = self._names.get(_strip_prefix(name))
        if ids is None:
            return []
        if isinstance(ids, int):
            ids = [ids]
        kinds = self._kinds
        return [tid for tid in ids if kinds[tid] in wanted]

    def find(self, name: str, kind: Optional[str] = None) -> Optional[int]:
        """Look a type up by name.

        ``name`` may carry a ``struct ``/``union ``/``enum `` prefix instead of ``kind``.
        ``kind`` is a kind name ("struct", "union", "enum", "typedef", "int", "fwd", "var",
        "func", ...); "enum" matches both ENUM and ENUM64. Without a kind, a bare name means
        the first of typedef, int, float, struct, union, enum, var, datasec, func, fwd,
        decl_tag, type_tag that has it. Among several types of the same name and kind, the lowest id wins.

        :return: the type id, or ``None`` if there is no such type.
        :raises ValueError: for an unknown kind name.
        """
        wanted = self._wanted_kinds(name, kind)
        name = _strip_prefix(name)
        ids = self._names.get(name)
        if ids is None:
            return None
        if isinstance(ids, int):
            ids = (ids,)
        for k in wanted:
            for tid in ids:
                if self._kinds[tid] == k:
                    return tid
        return None

    def resolve(self, type_id: int) -> int:
        """:return: the type id after following typedef, const, volatile, restrict and
        type_tag (0 for void).
        :raises BtfError: on an out-of-range id or a cyclic chain."""
        for _ in range(_MAX_DEPTH):
            if type_id == 0:
                return 0
            self._check_id(type_id)
            if self._kinds[type_id] not in _MODIFIERS:
                return type_id
            type_id = self._ref(type_id)
        raise BtfError(f"type chain through id {type_id} is cyclic or too deep")

    def sizeof(self, name_or_id: Union[str, int]) -> int:
        """The size of a type, as C's sizeof.

        :param name_or_id: a type id, or a name as :meth:`find` takes it ("struct page",
            "mem_section_usage", "pg_data_t", "unsigned long").
        :return: the size in bytes; typedefs and qualifiers are followed, an array is
            nelems times its element, a pointer is the size of ``long``.
        :raises KeyError: if no type has that name.
        :raises BtfError: for a type without a size (void, function, forward declaration)
            or broken references.
        """
        tid = self._type_id(name_or_id)
        factor = 1
        for _ in range(_MAX_DEPTH):
            tid = self.resolve(tid)
            if tid == 0:
                raise BtfError("void has no size")
            k = self._kinds[tid]
            if k in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT, _DATASEC):
                return factor * self._3u32(self._data, self._offsets[tid])[2]
            if k == _PTR:
                return factor * self._pointer_size()
            if k == _ARRAY:
                elem, _, nelems = self._array(tid)
                factor *= nelems
                tid = elem
            elif k == _VAR:
                tid = self._ref(tid)
            else:
                raise BtfError(f"type {tid} ({self._describe(tid)}) has no size")
        raise BtfError(f"array nesting through type {tid} is cyclic or too deep")

    # ---- struct members ----------------------------------------------------------------

    def members(self, struct_name_or_id: Union[str, int]) -> List[Member]:
        """:return: the direct members of a struct or union (typedefs followed), anonymous
        ones included with name "".
        :raises KeyError: if there is no such type, or it is not a struct or union."""
        tid = self.resolve(self._type_id(struct_name_or_id, default_kind=_STRUCT))
        if tid == 0 or self._kinds[tid] not in (_STRUCT, _UNION):
            raise KeyError(f"{struct_name_or_id!r} is {self._describe(tid)}, not a struct or union")
        return list(self._member_list(tid))

    def bit_offsetof(self, struct_name: str, member_path: str) -> int:
        """:return: the offset in bits of a member; see :meth:`offsetof` for the path."""
        return self._walk(struct_name, member_path)[0]

    def offsetof(self, struct_name: str, member_path: str) -> int:
        """The byte offset of a member, as C's offsetof.

        :param struct_name: "struct mem_section_usage", "mem_section_usage", "pg_data_t", or
            a type id.
        :param member_path: a member name; members of anonymous structs and unions are found
            as C finds them (``compound_head`` in ``struct page``); ``a.b`` goes into a
            nested member and ``a[3]`` indexes an array member.
        :return: the offset in bytes from the start of the struct.
        :raises KeyError: if the struct or a member on the path is absent (a path into a
            type that is not a struct or union has no members, so is absent too).
        :raises BtfError: if the member is a bitfield not starting on a byte (use
            :meth:`bit_offsetof`), or the types are broken.
        """
        bits = self._walk(struct_name, member_path)[0]
        if bits % 8:
            raise BtfError(f"{member_path} in {struct_name} starts at bit {bits}, not on a byte")
        return bits // 8

    def member_type(self, struct_name: str, member: str) -> int:
        """:return: the type id of a member as declared (not resolved: it may be a typedef;
        see :meth:`resolve`); ``member`` is a path as :meth:`offsetof` takes it.
        :raises KeyError: if the struct or member is absent."""
        return self._walk(struct_name, member)[1]

    def member_size(self, struct_name: str, member: str) -> int:
        """:return: the size in bytes of ``member``'s type (an array member: all of it)."""
        return self.sizeof(self.member_type(struct_name, member))

    def has_member(self, struct_name: str, member_path: str) -> bool:
        """:return: whether the struct (exists and) has that member (path as for :meth:`offsetof`)."""
        try:
            self._walk(struct_name, member_path)
        except DamagedType:
            raise  # cannot tell: the caller's feature test must not read it as absent
        except KeyError:
            return False
        return True

    # ---- enums -------------------------------------------------------------------------

    def enumerators(self, enum_name: Optional[str] = None, *, containing: Optional[str] = None) -> Dict[str, int]:
        """The enumerators of one enum, by the enum's name or by one of its enumerators (the
        way to reach an anonymous enum, such as the kernel's section flag bits).

        :param enum_name: "zone_type" or "enum zone_type". If no enum has this name but an
            enumerator does, that enumerator's enum is meant. ``None``: use ``containing``.
        :param containing: an enumerator name ("SECTION_MARKED_PRESENT_BIT").
        :return: enumerator name -> value, in declaration order (signed or unsigned as the
            enum says).
        :raises KeyError: if there is no such enum.
        """
        tid = None
        if enum_name is not None:
            tid = self.find(enum_name, "enum")
            if tid is None and not enum_name.startswith("enum "):
                containing = containing or enum_name
        if tid is None:
            if containing is None:
                raise KeyError(f"no enum {enum_name!r}")
            hit = self._enum_index().get(containing)
            if hit is None:
                raise KeyError(f"no enum {enum_name!r}" if enum_name else f"no enumerator {containing!r}")
            tid = hit[1]
        return dict(self._enum_entries(tid))

    def enum_value(self, enumerator: str) -> Optional[int]:
        """Search every enum, anonymous ones included, for an enumerator.

        The index over all enumerators is built on the first call. When several enums
        define the same name, the one with the lowest type id wins.

        :return: the enumerator's value ("PG_head", "__MAX_NR_ZONES", "PGTY_buddy", ...),
            or ``None`` if no enum has it (an enum whose names are damaged has none: each
            caller has its fallback for a kernel without the enumerator).
        """
        hit = self._enum_index().get(enumerator)
        return None if hit is None else hit[0]

    def func_signature(self, name: str) -> Optional[Tuple[List[str], bool]]:
        """A kernel function's parameters, as its BTF ``FUNC`` record and ``FUNC_PROTO`` give
        them (pahole emits the functions that were not inlined away).

        :return: ``(parameter names, returns a value)``, or ``None`` if there is no such function.
        """
        tid = self.find(name, "func")
        if tid is None:
            return None
        proto = self._ref(tid)
        self._check_id(proto)
        if self._kinds[proto] != _FUNC_PROTO:
            return None
        off = self._offsets[proto]
        _, info, ret = self._3u32(self._data, off)
        params = [self._str(self._u32(self._data, off + 12 + 8 * i)[0]) for i in range(info & 0xFFFF)]
        return params, ret != 0

    # ---- helpers -------------------------------------------------------------------------

    def _check_id(self, type_id: int) -> None:
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"type id {type_id} is out of range (1..{len(self._offsets) - 1})")

    def _str(self, off: int) -> str:
        start = self._strs_start + off
        if off and start >= self._strs_end:
            raise BtfError(f"name offset {off} is outside the string section")
        return self._data[start:self._data.find(b"\0", start)].decode("ascii", "replace")

    def _ref(self, type_id: int) -> int:
        """The type a modifier, pointer, var or decl_tag refers to (its size_or_type field)."""
        return self._3u32(self._data, self._offsets[type_id])[2]

    def _array(self, type_id: int) -> Tuple[int, int, int]:
        """(element type, index type, nelems) of an array."""
        return self._3u32(self._data, self._offsets[type_id] + 12)

    def _describe(self, type_id: int) -> str:
        if type_id == 0:
            return "void"
        kind = KIND_NAMES[self._kinds[type_id]]
        name = self.name(type_id)
        return f"{kind} {name}" if name else f"anonymous {kind}"

    def _wanted_kinds(self, name: str, kind: Optional[str]) -> Tuple[int, ...]:
        if kind is None:
            prefix = name.split(" ", 1)[0]
            if prefix in _PREFIXES and " " in name:
                kind = prefix
            else:
                return _BARE_NAME_ORDER
        k = _KIND_BY_NAME.get(kind)
        if k is None:
            raise ValueError(f"unknown BTF kind {kind!r}")
        return (_ENUM, _ENUM64) if k == _ENUM else (k,)

    def _type_id(self, name_or_id: Union[str, int], default_kind: Optional[int] = None) -> int:
        """A type id from an id or a name (``KeyError`` if absent). A bare name that is not a
        typedef is looked up as ``default_kind`` first."""
        if isinstance(name_or_id, int):
            if name_or_id:
                self._check_id(name_or_id)
            return name_or_id
        tid = None
        if default_kind is not None and " " not in name_or_id:
            tid = self.find(name_or_id, "typedef") or self.find(name_or_id, KIND_NAMES[default_kind])
        if tid is None:
            tid = self.find(name_or_id)
        if tid is None:
            raise KeyError(f"no type {name_or_id!r} in the BTF")
        return tid

    def _pointer_size(self) -> int:
        if self._ptr_size is None:
            tid = self.find("long unsigned int", "int") or self.find("long int", "int")
            self._ptr_size = self._3u32(self._data, self._offsets[tid])[2] if tid else 8
        return self._ptr_size

    def _member_list(self, tid: int) -> List[Member]:
        """The members of struct/union ``tid`` (decoded once, then cached)."""
        cached = self._members.get(tid)
        if cached is not None:
            return cached
        data = self._data
        off = self._offsets[tid]
        _, info, _ = self._3u32(data, off)
        bitfields = bool(info >> 31)
        unpack = self._3u32
        result = []
        for i in range(info & 0xFFFF):
            name_off, mtype, moff = unpack(data, off + 12 + 12 * i)
            name = self._entry_name(tid, "member", i, name_off)
            if bitfields:
                result.append(Member(name, mtype, moff & 0xFFFFFF, moff >> 24))
            else:
                result.append(Member(name, mtype, moff, 0))
        self._members[tid] = result
        return result

    def _entry_name(self, tid: int, what: str, i: int, name_off: int) -> str:
        """The name of member or enumerator ``i`` of type ``tid``. Names are decoded lazily,
        so checked here: one outside the string section makes the type unusable, which is
        information missing (:class:`DamagedType`, a KeyError as for an absent member), not a crash."""
        strs = self._strs_end - self._strs_start
        if name_off >= strs:
            raise DamagedType(f"BTF type {tid} ({self.name(tid) or 'anonymous'}): {what} {i}'s name offset "
                              f"{name_off} is outside the {strs}-byte string section")
        return self._str(name_off)

    def _find_member(self, tid: int, name: str, visiting: Optional[set] = None,
                     searched: Optional[set] = None) -> Optional[Tuple[int, int]]:
        """(bit offset, type id) of member ``name`` of struct/union ``tid``, looking into
        anonymous struct/union members as C does; ``None`` if absent.

        Each struct is searched at most once per lookup, and a struct that (in broken BTF)
        contains itself raises :class:`BtfError`, so garbage cannot make this loop or blow up.
        """
        if visiting is None:
            visiting, searched = set(), set()
        if tid in visiting:
            raise BtfError(f"type {tid} contains itself through anonymous members")
        if len(visiting) > _MAX_DEPTH:
            raise BtfError(f"anonymous members nest too deep at type {tid}")
        visiting.add(tid)
        for m in self._member_list(tid):
            if m.name == name:
                visiting.discard(tid)
                return m.bit_offset, m.type
            if not m.name:
                inner = self.resolve(m.type)
                if inner and inner not in searched and self._kinds[inner] in (_STRUCT, _UNION):
                    hit = self._find_member(inner, name, visiting, searched)
                    if hit is not None:
                        visiting.discard(tid)
                        return m.bit_offset + hit[0], hit[1]
        visiting.discard(tid)
        searched.add(tid)
        return None

    def _walk(self, struct_name: Union[str, int], path: str) -> Tuple[int, int]:
        """(bit offset, declared type id) at the end of a member path."""
        tid = self._type_id(struct_name, default_kind=_STRUCT)
        bits = 0
        where = str(struct_name)
        for token in path.split("."):
            m = _PATH_TOKEN.match(token)
            if m is None:
                raise KeyError(f"bad member path {path!r}")
            name, indices = m.groups()
            container = self.resolve(tid)
            if container == 0 or self._kinds[container] not in (_STRUCT, _UNION):
                raise KeyError(f"{where} is {self._describe(container)}, which has no member {name!r}")
            hit = self._find_member(container, name)
            if hit is None:
                raise KeyError(f"{where} has no member {name!r}")
            bits += hit[0]
            tid = hit[1]
            where = f"{where}.{name}"
            for index in re.findall(r"\d+", indices):
                arr = self.resolve(tid)
                if arr == 0 or self._kinds[arr] != _ARRAY:
                    raise KeyError(f"{where} is not an array")
                elem, _, _ = self._array(arr)
                bits += int(index) * self.sizeof(elem) * 8
                tid = elem
                where = f"{where}[{index}]"
        return bits, tid

    def _enum_entries(self, tid: int) -> Iterator[Tuple[str, int]]:
        """(name, value) of each enumerator of ENUM/ENUM64 ``tid``; :raises DamagedType: if a
        name lies outside the string section (:meth:`_entry_name`)."""
        data = self._data
        off = self._offsets[tid]
        _, info, _ = self._3u32(data, off)
        signed = bool(info >> 31)
        count = info & 0xFFFF
        if self._kinds[tid] == _ENUM:
            unpack = struct.Struct(self._endian + ("Ii" if signed else "II")).unpack_from
            for i in range(count):
                name_off, value = unpack(data, off + 12 + 8 * i)
                yield self._entry_name(tid, "enumerator", i, name_off), value
        else:
            for i in range(count):
                name_off, lo, hi = self._3u32(data, off + 12 + 12 * i)
                value = (hi << 32) | lo
                if signed and value >= 1 << 63:
                    value -= 1 << 64
                yield self._entry_name(tid, "enumerator", i, name_off), value

    def _enum_index(self) -> Dict[str, Tuple[int, int]]:
        """enumerator name -> (value, enum type id), over every enum; built once."""
        if self._enumerators is None:
            index: Dict[str, Tuple[int, int]] = {}
            kinds = self._kinds
            for tid in range(1, len(kinds)):
                if kinds[tid] == _ENUM or kinds[tid] == _ENUM64:
                    try:
                        entries = list(self._enum_entries(tid))
                    except DamagedType:  # a damaged blob: its enumerators are unknown, the others still answer
                        continue
                    for name, value in entries:
                        if name not in index:
                            index[name] = (value, tid)
            self._enumerators = index
        return self._enumerators


def _strip_prefix(name: str) -> str:
    prefix, _, rest = name.partition(" ")
    return rest if rest and prefix in _PREFIXES else name


def _read_header(data: bytes, whole: bool = True) -> Tuple[str, int, int, int, int, int]:
    """(endian, hdr_len, type_off, type_len, str_off, str_len) of a BTF header; ``whole``:
    ``data`` is the whole blob, so the header must fit in it."""
    if len(data) < _HEADER_LEN:
        raise BtfError(f"{len(data)} bytes is too short for a BTF header")
    if data[0:2] == b"\x9f\xeb":
        endian = "<"
    elif data[0:2] == b"\xeb\x9f":
        endian = ">"
    else:
        raise BtfError(f"bad BTF magic {data[0:2].hex()} (want 0xeb9f)")
    version = data[2]
    if version != 1:
        raise BtfError(f"unsupported BTF version {version}")
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(endian + "5I", data, 4)
    if hdr_len < _HEADER_LEN or (whole and hdr_len > len(data)):
        raise BtfError(f"BTF header length {hdr_len} is impossible for a {len(data)}-byte blob")
    return endian, hdr_len, type_off, type_len, str_off, str_len
