"""Building the guest's initramfs: static busybox, a generated /init and a few modules.

The archive is an uncompressed ``newc`` cpio written in Python and cached under
``<cache>/initramfs/<sha256>.cpio`` keyed by its content.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import struct
from pathlib import Path
from typing import Iterable, Sequence

from .cache import Progress, atomic_write_bytes, cache_root, reporter
from .errors import LabError

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

MARK_ACCOUNT_BEGIN = "IVM-ACCOUNT-BEGIN"
MARK_ACCOUNT_END = "IVM-ACCOUNT-END"
MARK_READY = "IVM-READY"
MARK_ERROR = "IVM-ERROR"
MARK_SECTION = "@@"  # "@@ <section name>" starts a section inside the account
MARK_MEMORY_CHANGED = "IVM-MEMORY-CHANGED"  # "IVM-MEMORY-CHANGED <n>": memory blocks changed
MARK_STATE = "IVM-STATE"  # one line of the guest's own state (account.parse_state), on the state port
MARK_STATE_END = "IVM-STATE-END"


def find_static_busybox() -> Path:
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file():
            if _elf_is_static(p.read_bytes()[:4096]):
                return p
            raise LabError(f"{p} is dynamically linked: apt-get install busybox-static")
    raise LabError("busybox not found: apt-get install busybox-static")


def _elf_is_static(head: bytes) -> bool:
    """True if the ELF image has no PT_INTERP program header."""
    if head[:4] != b"\x7fELF":
        return False
    end = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        phoff, = struct.unpack_from(end + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
    else:
        phoff, = struct.unpack_from(end + "I", head, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 0x2A)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            break
        p_type, = struct.unpack_from(end + "I", head, off)
        if p_type == 3:  # PT_INTERP
            return False
    return True


# --- /init --------------------------------------------------------------------------------------

ACCOUNT_SCRIPT = r"""
echo @@ uname-r
uname -r
echo @@ cmdline
cat /proc/cmdline
echo @@ meminfo
cat /proc/meminfo
echo @@ cpuinfo-flags
grep -m1 '^flags' /proc/cpuinfo
echo @@ cpuinfo-mmu
grep -m1 '^mmu' /proc/cpuinfo
echo @@ nodes
for n in /sys/devices/system/node/node*; do [ -d "$n" ] && echo "${n##*/}"; done
for n in /sys/devices/system/node/node*; do
  [ -f "$n/meminfo" ] || continue
  echo "@@ node-meminfo ${n##*/}"
  cat "$n/meminfo"
done
for n in /sys/devices/system/node/node*; do
  [ -d "$n" ] || continue
  echo "@@ node-memory-blocks ${n##*/}"
  for b in "$n"/memory*; do [ -e "$b" ] && echo "${b##*/}"; done
done
echo @@ memory-block-size
cat /sys/devices/system/memory/block_size_bytes 2>/dev/null
echo @@ memory-blocks
for b in /sys/devices/system/memory/memory*; do
  [ -f "$b/state" ] && echo "${b##*/} $(cat $b/state)"
done
echo @@ iomem
grep -v '^ ' /proc/iomem
echo @@ hugepages
for h in /sys/kernel/mm/hugepages/hugepages-*; do
  [ -f "$h/nr_hugepages" ] && echo "${h##*/} $(cat $h/nr_hugepages)"
done
echo @@ tainted
cat /proc/sys/kernel/tainted
"""


# With watch_memory: after IVM-READY a background loop polls the memory blocks' sysfs state
# (shell builtins only, no fork but `sleep`; its variables are ivm_* as the account's
# loops reuse plain names) and, whenever the set of blocks or a state
# changes (hot-add, onlining), prints "IVM-MEMORY-CHANGED <n>" and the whole account again.
# The signature is taken before the boot account, so no change after it can be missed.
_MEMSIG_FUNC = r"""
ivm_memsig() {
  ivm_sig=""
  for ivm_b in /sys/devices/system/memory/memory*; do
    [ -f "$ivm_b/state" ] && read ivm_st < "$ivm_b/state" && ivm_sig="$ivm_sig ${ivm_b##*/}=$ivm_st"
  done
}
"""

_MEMORY_WATCHER = r"""
(
  ivm_changes=0
  while true; do
    sleep 0.5
    ivm_last="$ivm_sig"
    ivm_memsig
    if [ "$ivm_sig" != "$ivm_last" ]; then
      ivm_changes=$((ivm_changes + 1))
      echo "%(changed)s $ivm_changes"
      ivm_account
    fi
  done
) &
"""


# With watch_memory, the guest's own state on one line, read from its sysfs and /proc with
# shell builtins only: each memory block's state, MemTotal and every hugepage pool's counters.
# Written to the state port (a serial line of its own, so kernel messages and the account
# never mix with it) when it changes and every 5 s besides, so that a line lost or garbled
# is followed by a whole one; the host waits on these (Guest.wait_state).
_STATE_REPORTER = r"""
(
  ivm_dev=%(dev)s
  [ -c "$ivm_dev" ] && stty -F "$ivm_dev" 115200 raw -echo 2>/dev/null
  [ -w "$ivm_dev" ] || ivm_dev=/dev/console
  ivm_seq=0; ivm_prev=""; ivm_quiet=0
  while true; do
    ivm_memsig
    ivm_mt=0
    while read ivm_k ivm_v ivm_u; do [ "$ivm_k" = MemTotal: ] && ivm_mt=$ivm_v; done < /proc/meminfo
    ivm_hp=""
    for ivm_h in /sys/kernel/mm/hugepages/hugepages-*; do
      [ -f "$ivm_h/nr_hugepages" ] || continue
      read ivm_n < "$ivm_h/nr_hugepages"; read ivm_f < "$ivm_h/free_hugepages"
      ivm_hp="$ivm_hp ${ivm_h##*/hugepages-}=$ivm_n/$ivm_f"
    done
    ivm_now="memtotal=$ivm_mt blocks:$ivm_sig hugepages:$ivm_hp"
    if [ "$ivm_now" != "$ivm_prev" ] || [ $ivm_quiet -ge 10 ]; then
      ivm_seq=$((ivm_seq + 1))
      echo "%(mark)s $ivm_seq $ivm_now %(end)s" > "$ivm_dev"
      ivm_prev="$ivm_now"; ivm_quiet=0
    else
      ivm_quiet=$((ivm_quiet + 1))
    fi
    sleep 0.5
  done
) &
"""


def make_init(modules: Sequence[str], init_extra: str = "", watch_memory: bool = False,
              state_device: str = "/dev/console") -> str:
    """The /init script. ``modules`` are in-initramfs paths, in load order.

    With ``watch_memory`` the account is printed again whenever memory blocks change, and
    the guest's state line is written to ``state_device`` (see _STATE_REPORTER).
    """
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt /sbin /usr/bin /usr/sbin",
        "/bin/busybox --install -s",
        "export PATH=/sbin:/bin:/usr/sbin:/usr/bin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        f"fail() {{ echo \"{MARK_ERROR} $*\"; }}",
    ]
    for m in modules:
        q = shlex.quote(m)
        lines.append(f"insmod {q} || fail insmod {q}")
    lines += [
        "if [ ! -d /sys/firmware/qemu_fw_cfg ]; then",
        "  fail 'no /sys/firmware/qemu_fw_cfg: VMCOREINFO will be missing from dumps'",
        "fi",
    ]
    if init_extra:
        lines += ["# --- init_extra ---", init_extra.rstrip("\n"), "# --- end init_extra ---"]
    lines += [
        # Keep kernel messages from interleaving with the account.
        "echo 1 > /proc/sys/kernel/printk",
        "ivm_account() {",
        f"echo {MARK_ACCOUNT_BEGIN}",
        ACCOUNT_SCRIPT.strip("\n"),
        f"echo {MARK_ACCOUNT_END}",
        "}",
    ]
    if watch_memory:
        lines += [_MEMSIG_FUNC.strip("\n"), "ivm_memsig"]
    lines += ["ivm_account", f"echo {MARK_READY}"]
    if watch_memory:
        lines.append((_MEMORY_WATCHER % {"changed": MARK_MEMORY_CHANGED}).strip("\n"))
        lines.append((_STATE_REPORTER % {"dev": shlex.quote(state_device), "mark": MARK_STATE,
                                         "end": MARK_STATE_END}).strip("\n"))
    lines.append("while true; do sleep 3600; done")
    return "\n".join(lines) + "\n"


# --- cpio -------------------------------------------------------------------------------------


class Cpio:
    """Minimal ``newc`` cpio writer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        self._ino += 1
        buf = hdr.encode() + name_b
        buf += b"\0" * (-len(buf) % 4)
        buf += data + b"\0" * (-len(data) % 4)
        self._parts.append(buf)

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._entry(d, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, 0o120777, target.encode())

    def getvalue(self) -> bytes:
        trailer = Cpio()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0, nlink=1)
        data = b"".join(self._parts) + trailer._parts[0]
        return data + b"\0" * (-len(data) % 512)


def build_initramfs(
    module_files: Iterable[Path] = (),
    init_extra: str = "",
    busybox: Path | None = None,
    progress: Progress = None,
    cache_dir: Path | None = None,
    watch_memory: bool = False,
    state_device: str = "/dev/console",
) -> Path:
    """Build (or reuse from the cache) an initramfs loading ``module_files`` in order.

    ``watch_memory``: see :func:`make_init`.
    """
    busybox = busybox or find_static_busybox()
    cio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "mnt", "lib/modules"):
        cio.mkdir(d)
    cio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cio.symlink("bin/sh", "busybox")
    in_guest = []
    for i, f in enumerate(module_files):
        name = f"lib/modules/{i:02d}-{f.name}"
        cio.file(name, f.read_bytes())
        in_guest.append("/" + name)
    cio.file("init", make_init(in_guest, init_extra, watch_memory, state_device).encode(), 0o755)
    data = cio.getvalue()
    key = hashlib.sha256(data).hexdigest()[:24]
    out = (cache_dir or cache_root() / "initramfs") / f"{key}.cpio"
    if not out.exists():
        reporter(progress)(f"building initramfs {out.name} ({len(in_guest)} modules)")
        atomic_write_bytes(out, data)
    else:
        os.utime(out)  # mark as recently used
    return out
