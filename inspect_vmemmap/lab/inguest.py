"""Running the tool inside a lab guest, against the guest's own /proc/kcore.

The guest mounts the host's root file system read-only over virtio-9p (mount tag
``hostroot``), mounts its own proc, sysfs, devtmpfs and a tmpfs on /tmp inside that tree
(on another scratch directory when the project lives under /tmp, as a CI clone may),
and chroots into it to run the host's Python (``sys.executable``, with the project on
PYTHONPATH): the very interpreter, drgn and source tree the host uses, with no copy.
A guest of another architecture than the host's gets a Debian userland of its own
architecture instead (:mod:`.userland`) as that root, and the project's source tree over a
second read-only 9p export (``ivmproject``) mounted inside it, on its PYTHONPATH.

The host asks for a run over a second serial line (a QEMU chardev socket: an ISA
16550, ``/dev/ttyS1``, on x86_64; a virtio console, ``/dev/hvc0``, on aarch64), so kernel
messages on the console never mix with the result. The request is one line::

    check NONCE ARGS...

and the guest answers::

    IVM-INGUEST-BEGIN NONCE
    <the tool's stdout>
    IVM-INGUEST-STDERR NONCE
    <the tool's stderr>
    IVM-INGUEST-END NONCE STATUS
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .initramfs import ACCOUNT_SCRIPT, MARK_ACCOUNT_BEGIN, MARK_ACCOUNT_END

MOUNT_TAG = "hostroot"
PROJECT_TAG = "ivmproject"  # the project's source tree, for a foreign userland
PYCACHE_TAG = "ivmpycache"  # its byte code, kept across boots (the userland's pycache_dir)
GUEST_ROOT = "/host"  # where the guest mounts the host's root
MARK_BEGIN = "IVM-INGUEST-BEGIN"
MARK_STDERR = "IVM-INGUEST-STDERR"
MARK_END = "IVM-INGUEST-END"
MARK_WATCHING = "IVM-INGUEST-WATCHING"  # watch's probes are attached
#: what watch prints on stderr once its probes are attached (inspect_vmemmap.live.watch)
WATCH_READY = "probes attached"

#: 9p over virtio; the lab adds their dependencies (netfs, 9pnet, fscache on 6.1, virtio, virtio_ring)
MODULES = ("9pnet_virtio", "9p")
#: loaded when the kernel has them as modules (6.1: virtio_pci is =m), else taken to be built in
OPTIONAL_MODULES = {"x86_64": ("virtio_pci",), "aarch64": ("virtio_pci", "virtio_console"),
                    "riscv64": ("virtio_pci", "virtio_console")}
#: the guest end of the request line, per architecture
CHANNEL_DEVICE = {"x86_64": "/dev/ttyS1", "aarch64": "/dev/hvc0", "riscv64": "/dev/hvc0"}


def project_root() -> Path:
    """The directory holding the ``inspect_vmemmap`` package (put on the guest's PYTHONPATH)."""
    import inspect_vmemmap

    return Path(inspect_vmemmap.__file__).resolve().parent.parent


def modules_for(arch: str, available) -> list[str]:
    """Module names to load: 9p and, where ``available`` (module names the kernel has as
    modules) lists them, the virtio transport and console."""
    return [m for m in OPTIONAL_MODULES.get(arch, ()) if m in available] + list(MODULES)


def qemu_args(arch: str, channel_socket: Path, userland=None) -> list[str]:
    """The host's root (or ``userland``'s, a :class:`.userland.Userland`, with the project's
    source tree beside it) as a read-only 9p export, and the request line on ``channel_socket``."""
    root = userland.root if userland is not None else "/"
    args = [
        "-fsdev", f"local,id=ivmroot,path={root},security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev=ivmroot,mount_tag={MOUNT_TAG}",
    ]
    if userland is not None:
        args += [
            "-fsdev", f"local,id=ivmproj,path={project_root()},security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=ivmproj,mount_tag={PROJECT_TAG}",
            # writable: the guest's Python compiles what it imports there once for all boots
            "-fsdev", f"local,id=ivmpyc,path={userland.pycache_dir()},security_model=none,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=ivmpyc,mount_tag={PYCACHE_TAG}",
        ]
    args += ["-chardev", f"socket,id=ivmreq,path={channel_socket},server=on,wait=off"]
    if arch == "x86_64":
        args += ["-device", "isa-serial,chardev=ivmreq,index=1"]  # COM2: ttyS1 (lab.guest puts its state line on COM3)
    else:
        args += ["-device", "virtio-serial-pci", "-device", "virtconsole,chardev=ivmreq"]
    return args


def scratch_dir(python: str, pythonpath: Path, *more: Path) -> str:
    """A directory of the host root to hide under the guest's writable tmpfs: /tmp, unless
    the interpreter, the project or one of ``more`` lives there (a CI clone or cache under
    /tmp), then another."""
    used = [os.path.realpath(python), str(Path(pythonpath).resolve()), os.path.abspath(python)]
    used += [str(Path(m).resolve()) for m in more]
    for d in ("/tmp", "/var/tmp", "/mnt", "/srv", "/media", "/opt"):
        if os.path.isdir(d) and not any(u == d or u.startswith(d + "/") for u in used):
            return d
    raise LabError("--in-guest: no host directory to put the guest's scratch tmpfs on")


def init_script(arch: str, python: str | None = None, pythonpath: Path | None = None, userland=None) -> str:
    """Shell for the lab's ``init_extra``: mount the host root (or ``userland``'s, with the
    project's source tree in it) and start the request loop.

    Runs as part of /init before the guest reports ready, so a failure here (reported with
    ``fail``) fails the boot with its reason.
    """
    if userland is not None:
        python, pythonpath, scratch = userland.python, Path(userland.project_mount), "/tmp"
    else:
        python = python or sys.executable
        pythonpath = pythonpath or project_root()
        scratch = scratch_dir(python, pythonpath)
    chan = CHANNEL_DEVICE.get(arch)
    if chan is None:
        raise LabError(f"--in-guest: no request channel for {arch}")
    r = GUEST_ROOT
    env = " ".join(shlex.quote(a) for a in (
        f"HOME={scratch}", f"TMPDIR={scratch}", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
        "LANG=C.UTF-8",
        # a foreign userland has no byte code (Debian compiles it in maintainer scripts, which
        # never ran): compiled on first use into the pycache export (a tmpfs if it fails)
        *((f"PYTHONPYCACHEPREFIX={scratch}/pycache",) if userland is not None else ("PYTHONDONTWRITEBYTECODE=1",)),
        "PYTHONUNBUFFERED=1", f"PYTHONPATH={pythonpath}",
    ))
    py = shlex.quote(python)
    project_mount = "" if userland is None else f"""
  mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose {PROJECT_TAG} {r}{pythonpath} \\
    || {{ fail "in-guest: cannot mount the project's source tree over 9p ({PROJECT_TAG})"; return 1; }}"""
    pycache_mount = "" if userland is None else f"""
  mkdir -p {r}{scratch}/pycache && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {PYCACHE_TAG} {r}{scratch}/pycache"""
    return f"""\
ivm_ig() {{
  mkdir -p {r} || return 1
  mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose {MOUNT_TAG} {r} \\
    || {{ fail "in-guest: cannot mount the host root over 9p ({MOUNT_TAG})"; return 1; }}{project_mount}
  for d in proc sys dev {scratch.lstrip("/")}; do
    [ -d {r}/$d ] || {{ fail "in-guest: the host has no /$d to mount on"; return 1; }}
  done
  mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && mount -t devtmpfs devtmpfs {r}/dev \\
    && mount -t tmpfs -o mode=1777 tmpfs {r}{scratch} \\
    || {{ fail "in-guest: cannot mount proc, sysfs, devtmpfs and tmpfs in {r}"; return 1; }}{pycache_mount}
  # (the venv's python is a symlink to an absolute path: look at it inside the chroot)
  chroot {r} /bin/sh -c "[ -x {py} ]" || {{ fail "in-guest: "{py}" does not run in the host root over 9p"; return 1; }}
  [ -e {chan} ] || {{ fail "in-guest: no {chan} (the request line)"; return 1; }}
  exec 3<>{chan} && stty raw -echo <&3 || {{ fail "in-guest: cannot open {chan}"; return 1; }}
  # watch (eBPF) finds the traceable functions in tracefs; bpftrace wants debugfs and bpffs
  mount -t tracefs tracefs {r}/sys/kernel/tracing 2>/dev/null
  mount -t debugfs debugfs {r}/sys/kernel/debug 2>/dev/null
  mount -t bpf bpf {r}/sys/fs/bpf 2>/dev/null
  (
    o={r}{scratch}/ivm-check.out; e={r}{scratch}/ivm-check.err
    wo={r}{scratch}/ivm-watch.out; we={r}{scratch}/ivm-watch.err
    ivm_answer() {{
      {{ echo; echo "{MARK_BEGIN} $ivm_nonce"; cat $o; echo
         echo "{MARK_STDERR} $ivm_nonce"; cat $e; echo
         echo "{MARK_END} $ivm_nonce $ivm_rc"; }} >&3
    }}
    while read -r ivm_cmd ivm_nonce ivm_args <&3; do
      case "$ivm_cmd" in
      check)
        env -i {env} chroot {r} {py} -m inspect_vmemmap check $ivm_args > $o 2> $e
        ivm_rc=$?; ivm_answer ;;
      watch)  # in the background; answered once its probes are attached (or it ended)
        env -i {env} chroot {r} {py} -m inspect_vmemmap watch $ivm_args > $wo 2> $we &
        ivm_watch=$!
        while kill -0 $ivm_watch 2>/dev/null && ! grep -q '{WATCH_READY}' $we; do sleep 0.2; done
        if kill -0 $ivm_watch 2>/dev/null; then echo "{MARK_WATCHING} $ivm_nonce" >&3
        else wait $ivm_watch; ivm_rc=$?; cp $wo $o; cp $we $e; ivm_answer; fi ;;
      settle)  # watch says on stderr when what changed so far was re-checked
        ivm_n=$(grep -c 'settled' $we); kill -USR1 $ivm_watch 2>/dev/null
        while kill -0 $ivm_watch 2>/dev/null && [ "$(grep -c 'settled' $we)" -le "$ivm_n" ]; do sleep 0.2; done
        : > $o; : > $e; kill -0 $ivm_watch 2>/dev/null; ivm_rc=$?; ivm_answer ;;
      churn)  # SECONDS N [AT]: write N, then 0, to the 2M pool's nr_hugepages until SECONDS passed
        # (scripts/bench watch), from uptime AT on; answered with the cycles done, /proc/vmstat's
        # htlb counters before and after, and the loop's own /proc/self/stat (its utime, stime):
        # shell builtins only.
        set -- $ivm_args; : > $e
        read -r up _ < /proc/uptime
        while [ -n "$3" ] && [ "${{up%.*}}" -lt "$3" ]; do sleep 1; read -r up _ < /proc/uptime; done
        ( f=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
          read -r up _ < /proc/uptime; end=$(( ${{up%.*}} + $1 )); n=0
          while read -r k v; do case $k in htlb*) echo "before $k $v";; esac; done < /proc/vmstat
          read -r st < /proc/self/stat; echo "stat0 $st"; echo "uptime0 $up"
          while [ "${{up%.*}}" -lt $end ]; do
            echo $2 > $f || break; echo 0 > $f || break; n=$((n+1)); read -r up _ < /proc/uptime
          done
          read -r st < /proc/self/stat; echo "stat1 $st"; echo "cycles $n"; echo "uptime $up"
          while read -r k v; do case $k in htlb*) echo "after $k $v";; esac; done < /proc/vmstat
        ) > $o 2>> $e
        ivm_rc=$?; ivm_answer ;;
      peek)  # what the running watch printed so far (tests follow its periodic checks)
        cp $wo $o; : > $e; kill -0 $ivm_watch 2>/dev/null; ivm_rc=$?; ivm_answer ;;
      unwatch)
        kill -INT $ivm_watch 2>/dev/null; wait $ivm_watch; ivm_rc=$?
        cp $wo $o; cp $we $e; ivm_answer ;;
      hugepages)  # KB N: resize the pool of that page size; answered with the account
        set -- $ivm_args
        echo "$2" > /sys/kernel/mm/hugepages/hugepages-$1kB/nr_hugepages 2> $e
        ivm_rc=$?; ivm_account_now > $o; ivm_answer ;;
      devdax)  # I ALIGN MODE: the I-th NVDIMM (by address), left raw at boot, made device-dax
        # (guest.devdax_script's ivm_devdax, its "fail" said on stderr); answered with its
        # IVM-DEVDAX line and the account
        set -- $ivm_args; : > $e
        fail() {{ echo "$*" >> $e; }}
        if [ -z "$ivm_regions" ]; then echo "no NVDIMM region in the guest" >> $e
        else ivm_devdax $(echo $ivm_regions | cut -d' ' -f$(($1 + 1))) $2 $3 > $o 2>> $e; fi
        [ -s $e ]; ivm_rc=$(( ! $? )); ivm_account_now >> $o; ivm_answer ;;
      offline)  # BLOCK...: offline these memory blocks; answered with the account
        : > $e; ivm_rc=0
        for b in $ivm_args; do echo offline > /sys/devices/system/memory/memory$b/state 2>> $e || ivm_rc=1; done
        ivm_account_now > $o; ivm_answer ;;
      esac
    done
  ) &
}}
ivm_account_now() {{
echo {MARK_ACCOUNT_BEGIN}
{ACCOUNT_SCRIPT.strip()}
echo {MARK_ACCOUNT_END}
}}
ivm_ig
"""


@dataclass
class InGuestResult:
    status: int
    stdout: str
    stderr: str
    seconds: float


class Channel:
    """The host end of the request line (a QEMU chardev socket in server mode)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.sock: socket.socket | None = None
        self._rest = b""  # read past the end of the last answer

    def connect(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                return
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise LabError(f"cannot connect to the guest's request line {self.path}: {e}") from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def run_check(self, args: list[str], timeout: float, alive=None) -> InGuestResult:
        """Ask the guest to run ``check ARGS`` and wait for its answer.

        ``alive``: a callable raising LabError when the guest died (polled while waiting).
        """
        if any(not re.fullmatch(r"--[a-z-]+", a) for a in args):
            raise LabError(f"in-guest: unsupported check arguments {args}")
        return self.request("check", args, timeout, alive, "in-guest check")

    def start_watch(self, args: list[str], timeout: float, alive=None) -> InGuestResult | None:
        """Start ``watch ARGS`` in the guest; return None once its probes are attached, or
        its result if it ended before that (it could not attach: the reason is on its stderr)."""
        if any(not re.fullmatch(r"--[a-z-]+|[0-9]+(\.[0-9]+)?", a) for a in args):
            raise LabError(f"in-guest: unsupported watch arguments {args}")
        return self.request("watch", args, timeout, alive, "in-guest watch", watching=True)

    def settle_watch(self, timeout: float, alive=None) -> bool:
        """Wait until the guest's watch has re-checked every change made so far (SIGUSR1);
        :return: False if the watch is no longer running."""
        return self.request("settle", [], timeout, alive, "in-guest watch").status == 0

    def churn(self, seconds: int, pages: int, timeout: float, alive=None, at: float | None = None) -> InGuestResult:
        """Grow the guest's 2M pool to ``pages`` and shrink it to 0, again and again, for
        ``seconds`` (scripts/bench watch), from the guest's uptime ``at`` on (None: now);
        stdout: ``cycles``, ``before``/``after`` htlb vmstat counters, ``uptime0``,
        ``stat0``/``stat1`` (the loop's /proc/self/stat)."""
        args = [str(int(seconds)), str(int(pages))] + ([str(int(at))] if at is not None else [])
        return self.request("churn", args, timeout, alive, "in-guest churn")

    def peek_watch(self, timeout: float, alive=None) -> InGuestResult:
        """What the guest's watch printed so far (status 0 while it runs)."""
        return self.request("peek", [], timeout, alive, "in-guest watch")

    def stop_watch(self, timeout: float, alive=None) -> InGuestResult:
        """End the guest's watch (SIGINT) and return what it printed."""
        return self.request("unwatch", [], timeout, alive, "in-guest watch")

    def step(self, cmd: str, args: list[str], timeout: float, alive=None) -> InGuestResult:
        """``hugepages KB N`` or ``offline BLOCK...`` in the guest; its stdout is the
        guest's account afterwards (:func:`inspect_vmemmap.lab.account.parse_account`)."""
        if cmd not in ("hugepages", "offline") or any(not re.fullmatch(r"[0-9]+", a) for a in args):
            raise LabError(f"in-guest: unsupported step {cmd} {args}")
        return self.request(cmd, args, timeout, alive, f"in-guest {cmd}")

    def devdax(self, index: int, align: int, mode: str, timeout: float, alive=None) -> InGuestResult:
        """Make the ``index``-th NVDIMM (by address; left raw at boot: ``Nvdimm.deferred``)
        device-dax with ``align`` and its memmap in RAM (``mode`` 'ram') or on the device
        ('pmem'); its stdout is the IVM-DEVDAX line and the guest's account."""
        if mode not in ("ram", "pmem"):
            raise LabError(f"in-guest: devdax mode {mode!r}")
        return self.request("devdax", [str(int(index)), str(int(align)), mode], timeout, alive, "in-guest devdax")

    def request(self, cmd: str, args: list[str], timeout: float, alive, what: str,
                watching: bool = False) -> InGuestResult | None:
        if self.sock is None:
            self.connect()
        nonce = secrets.token_hex(4)
        start = time.monotonic()
        self.sock.sendall(f"{cmd} {nonce} {' '.join(args)}\n".encode())
        end_re = re.compile(rf"^{MARK_END} {nonce} (\d+)$", re.M)
        watching_re = re.compile(rf"^{MARK_WATCHING} {nonce}$", re.M)
        buf = self._rest
        self._rest = b""
        deadline = start + timeout
        while True:
            text = buf.decode(errors="replace").replace("\r", "")
            m = end_re.search(text)
            if m:
                break
            w = watching_re.search(text) if watching else None
            if w:
                self._rest = buf[buf.find(f"{MARK_WATCHING} {nonce}".encode()) + len(MARK_WATCHING) + len(nonce) + 1:]
                return None
            if alive is not None:
                alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"{what} did not answer within {timeout:.0f}s (raise --timeout)")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not chunk:
                raise LabError(f"the guest's request line closed before the {what} answered")
            buf += chunk
        begin = text.rfind(f"{MARK_BEGIN} {nonce}\n", 0, m.start())
        mid = text.rfind(f"{MARK_STDERR} {nonce}\n", 0, m.start())
        if begin < 0 or mid < begin:
            raise LabError(f"{what}: garbled answer on the request line")
        out = text[begin + len(MARK_BEGIN) + len(nonce) + 2:mid]
        err = text[mid + len(MARK_STDERR) + len(nonce) + 2:m.start()]
        # the guest adds one newline after each part (the tool's output may lack its own)
        out = out[:-1] if out.endswith("\n") else out
        err = err[:-1] if err.endswith("\n") else err
        return InGuestResult(int(m.group(1)), out, err, time.monotonic() - start)


def channel_path(directory: Path) -> Path:
    return Path(directory) / "req.sock"


def environment_problem() -> str | None:
    """Why the host's Python could not run in a guest over 9p, or None."""
    exe = sys.executable
    if not exe or not os.path.isabs(exe):
        return "the host's Python has no absolute path (sys.executable)"
    return None


def userland_for(arch: str, progress=None):
    """None when a guest of ``arch`` runs the host's own Python (the host's architecture),
    else its Debian userland (:func:`.userland.ensure_userland`, built once)."""
    if arch == os.uname().machine:
        return None
    from .userland import ensure_userland

    return ensure_userland(arch, progress=progress)


def with_in_guest(spec, kernel, channel_socket: Path, progress=None):
    """``spec`` (a :class:`.guest.GuestSpec`) with what an in-guest run needs added: the 9p
    modules of ``kernel``, the root (the host's, or a userland of the guest's architecture),
    the request line on ``channel_socket``."""
    from dataclasses import replace

    u = userland_for(spec.arch, progress)
    return replace(
        spec,
        extra_modules=(*spec.extra_modules, *modules_for(spec.arch, kernel.modules_dep())),
        init_extra=spec.init_extra + init_script(spec.arch, userland=u),
        qemu_args=(*spec.qemu_args, *qemu_args(spec.arch, channel_socket, userland=u)),
    )
