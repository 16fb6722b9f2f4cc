"""Real kdump captures, taken the way production takes them.

The first kernel boots with ``crashkernel=`` and two 9p exports: the host's root,
read-only (as ``--in-guest`` mounts it, :mod:`.inguest`), and a directory the caller owns,
writable. Its /init (the lab's ``init_extra`` hook) mounts both, checks that the kernel
reserved the crash kernel region, and loads the capture kernel with the host's
kexec-tools, chrooted into the host root: ``kexec -p`` with the same kernel image, a small
capture initramfs built here, and the usual kdump command line (``irqpoll nr_cpus=1
reset_devices``). It then waits for the host: :meth:`KdumpSetup.capture` creates a file in
the writable directory, the guest panics with sysrq ``c``, the kernel kexecs into the
capture kernel, whose /init finds /proc/vmcore, mounts the host root and the writable
directory again and runs the host's makedumpfile once per :class:`Save`, all from that one
/proc/vmcore, then powers the VM off (QEMU exits).

Debian's makedumpfile refuses QEMU's own ELF dumps (``dump-guest-memory``), so the capture
kernel's /proc/vmcore is the only way to get its formats from a lab guest.

    setup = KdumpSetup(outdir)
    spec = setup.guest_spec(GuestSpec(debian="6.12", hugepages=8, hvo=True), kernel)
    with boot_guest(spec, kernel=kernel) as guest:
        result = setup.capture(guest)
    result.files["kdump-d31"]   # makedumpfile -l -d 31 -e's output
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from . import inguest
from .arch import arch_info
from .cache import Progress, reporter, require_tool
from .errors import LabError
from .initramfs import build_initramfs

#: mount tag of the writable export
OUT_TAG = "ivmout"
#: the file the host creates to make the first kernel panic
TRIGGER = "panic-now"
MARK_LOADED = "IVM-KDUMP-LOADED"  # "IVM-KDUMP-LOADED <crash kernel bytes>"
MARK_PANIC = "IVM-KDUMP-PANIC"
MARK_CAPTURE = "IVM-KDUMP-CAPTURE"  # "IVM-KDUMP-CAPTURE <uptime>": the capture kernel's /init runs
MARK_SAVE = "IVM-KDUMP-SAVE"  # "IVM-KDUMP-SAVE <name> <status> <uptime before> <uptime after>"
MARK_DONE = "IVM-KDUMP-DONE"
MARK_FAIL = "IVM-KDUMP-FAIL"

#: The capture kernel's reserve. Under TCG, Debian 6.1, 6.12 and 7.2 capture kernels report
#: 190-200M of it available after boot ("Memory:" line) with this busybox initramfs, enough
#: for the host's makedumpfile over 9p; x86 takes it below 4G.
DEFAULT_CRASHKERNEL = "256M"
#: the capture kernel's command line besides console= (Debian kdump-tools' KDUMP_CMDLINE_APPEND
#: minus systemd; panic=-1 makes a capture kernel that panics end the VM at once)
CAPTURE_CMDLINE = "irqpoll nr_cpus=1 reset_devices nousb panic=-1 cgroup_disable=memory"


@dataclass(frozen=True)
class Save:
    """One makedumpfile run on the capture kernel's /proc/vmcore."""

    name: str  # the output file's name in the writable directory
    args: tuple[str, ...]  # makedumpfile options before /proc/vmcore


def makedumpfile_features(path: str | None = None) -> dict[str, bool]:
    """Which compressions this makedumpfile was built with (``makedumpfile -v``):
    ``{"lzo": bool, "snappy": bool, "zstd": bool}`` (zlib, ``-c``, is always there)."""
    exe = path or require_tool("makedumpfile", "makedumpfile")
    p = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=30)
    text = p.stdout + p.stderr
    out = {}
    for name in ("lzo", "snappy", "zstd"):
        m = re.search(rf"^{name}\s+(enabled|disabled)", text, re.M)
        out[name] = bool(m and m.group(1) == "enabled")
    return out


def default_saves(features: dict[str, bool] | None = None) -> tuple[Save, ...]:
    """The saves a capture takes by default, all from the same /proc/vmcore:

    - ``elf-d0``: ``-E -d 0``, an unfiltered ELF vmcore (every page the capture kernel sees);
    - ``kdump-d31``: ``-d 31`` kdump-compressed (zstd ``-z`` where this makedumpfile has it,
      else lzo ``-l``, else zlib ``-c``) with ``-e`` (exclude the struct pages of excluded
      pages; x86_64 only; it needs ``--work-dir``, and makedumpfile gives it up when the
      vmemmap is not all 2M PMD blocks, which HVO's split PMDs are not);
    - ``elf-d31``: ``-E -d 31``: filtered ELF, where excluded pages are simply missing.
    """
    f = features if features is not None else makedumpfile_features()
    comp = "-z" if f.get("zstd") else "-l" if f.get("lzo") else "-c"
    return (
        Save("elf-d0", ("-E", "-d", "0")),
        Save("kdump-d31", (comp, "-d", "31", "-e", "--work-dir", "{work}")),
        Save("elf-d31", ("-E", "-d", "31")),
    )


@dataclass
class SaveResult:
    name: str
    args: tuple[str, ...]
    path: Path
    status: int
    seconds: float
    log: str  # makedumpfile's own messages

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.path.is_file()


@dataclass
class CaptureResult:
    saves: dict[str, SaveResult]
    panic_to_capture_seconds: float  # host clock: trigger written -> capture /init running
    capture_seconds: float  # host clock: trigger written -> QEMU exited
    console: str  # the console from the panic on

    @property
    def files(self) -> dict[str, Path]:
        return {n: s.path for n, s in self.saves.items() if s.ok}


@dataclass
class KdumpSetup:
    """A writable directory for the dumps and how to take them (see the module's doc).

    ``outdir`` must be an absolute path on the host's root file system tree as the guest
    sees it over 9p (any directory the caller owns: a test's tmp_path is fine).
    """

    outdir: Path
    crashkernel: str = DEFAULT_CRASHKERNEL
    saves: Sequence[Save] | None = None  # None: default_saves() for this makedumpfile
    capture_cmdline: str = CAPTURE_CMDLINE
    progress: Progress = None
    _capture_initrd: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.outdir = Path(self.outdir).absolute()
        if re.search(r"[\s'\"\\$`]", str(self.outdir)):
            raise LabError(f"kdump: {self.outdir}: the output directory's path must not need shell quoting")

    # -- before the boot ---------------------------------------------------------------------

    def guest_spec(self, spec, kernel):
        """``spec`` with what a kdump capture needs: ``crashkernel=``, the 9p exports, the
        modules and the /init part that loads the capture kernel. Builds the capture
        initramfs. ``kernel`` is the DebianKernel (or LocalKernel) that will boot."""
        require_tool("kexec", "kexec-tools")
        mdf = require_tool("makedumpfile", "makedumpfile")
        if inguest.environment_problem():
            raise LabError(f"kdump: {inguest.environment_problem()}")
        info = arch_info(spec.arch)
        if spec.arch != "x86_64":
            raise LabError(f"kdump captures are implemented for x86_64 guests, not {spec.arch}")
        if self.saves is None:
            self.saves = default_saves(makedumpfile_features(mdf))
        names = [s.name for s in self.saves]
        if len(set(names)) != len(names) or any(not re.fullmatch(r"[\w.-]+", n) for n in names):
            raise LabError(f"kdump: save names must be distinct file names: {names}")
        self.outdir.mkdir(parents=True, exist_ok=True)
        (self.outdir / TRIGGER).unlink(missing_ok=True)
        (self.outdir / "work").mkdir(exist_ok=True)

        modules = [*inguest.modules_for(spec.arch, kernel.modules_dep())]
        files = kernel.ensure_modules(["qemu_fw_cfg", *modules], progress=self.progress)
        busybox = None
        if info.name != os.uname().machine:
            from .debian import fetch_busybox

            busybox = fetch_busybox(spec.arch, kernel.suite, self.progress)
        self._capture_initrd = build_initramfs(files, self._capture_script(), busybox=busybox,
                                               progress=self.progress)
        append = f"console={info.console} {self.capture_cmdline}".strip()
        cmdline = " ".join(p for p in (spec.cmdline.strip(), f"crashkernel={self.crashkernel}") if p)
        return replace(
            spec,
            cmdline=cmdline,
            extra_modules=tuple(dict.fromkeys([*spec.extra_modules, *modules])),
            init_extra=(spec.init_extra.rstrip("\n") + "\n" if spec.init_extra else "")
            + self._first_script(Path(kernel.boot_image).absolute(), self._capture_initrd, append),
            qemu_args=(*spec.qemu_args, *self.qemu_args()),
        )

    def qemu_args(self) -> list[str]:
        """The host's root read-only (as --in-guest exports it) and ``outdir`` writable."""
        return [
            "-fsdev", "local,id=ivmkdroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=ivmkdroot,mount_tag={inguest.MOUNT_TAG}",
            "-fsdev", f"local,id=ivmkdout,path={self.outdir},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=ivmkdout,mount_tag={OUT_TAG}",
        ]

    def _mounts(self) -> str:
        """Shell function ``ivm_kd_mount [OPTS]``: the host root at /host with the guest's proc,
        sysfs, devtmpfs and a tmpfs on /tmp in it, and ``outdir`` writable at its own path
        inside (``OPTS`` appended to its 9p options: the capture kernel writes through the
        page cache, ``,cache=loose``; the first kernel must not, it polls for the trigger)."""
        r = inguest.GUEST_ROOT
        out = f"{r}{self.outdir}"
        from .cache import cache_root

        scratch = inguest.scratch_dir(sys.executable, inguest.project_root(), cache_root())
        return f"""\
ivm_kd_mount() {{
  mkdir -p {r} || return 1
  mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose {inguest.MOUNT_TAG} {r} \\
    || {{ echo "{MARK_FAIL} cannot mount the host root over 9p"; return 1; }}
  mount -t proc proc {r}/proc && mount -t sysfs sysfs {r}/sys && mount -t devtmpfs devtmpfs {r}/dev \\
    && mount -t tmpfs -o mode=1777 tmpfs {r}{scratch} \\
    || {{ echo "{MARK_FAIL} cannot mount proc, sysfs, devtmpfs and tmpfs in {r}"; return 1; }}
  # the capture kernel ($1 set) needs no host file under /tmp, but makedumpfile writes its
  # temporary files to /tmp whatever TMPDIR says
  if [ -n "$1" ] && [ {scratch} != /tmp ]; then mount -t tmpfs -o mode=1777 tmpfs {r}/tmp; fi
  mkdir -p {out} && mount -t 9p -o rw,trans=virtio,version=9p2000.L,msize=512000$1 {OUT_TAG} {out} \\
    || {{ echo "{MARK_FAIL} cannot mount the writable directory {self.outdir} over 9p"; return 1; }}
}}
ivm_kd_run() {{ env -i HOME={scratch} TMPDIR={scratch} PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin LANG=C chroot {r} "$@"; }}
"""

    def _first_script(self, image: Path, initrd: Path, append: str) -> str:
        """The first kernel's part of /init: mount, load the capture kernel, wait for the host."""
        out = f"{inguest.GUEST_ROOT}{self.outdir}"
        return self._mounts() + f"""\
ivm_kd_load() {{
  ivm_kd_mount || {{ fail "kdump: mounts failed"; return 1; }}
  read ivm_kd_size < /sys/kernel/kexec_crash_size
  [ "${{ivm_kd_size:-0}}" -gt 0 ] || {{ fail "kdump: crashkernel={self.crashkernel} reserved nothing"; return 1; }}
  ivm_kd_run kexec -p {shlex.quote(str(image))} --initrd={shlex.quote(str(initrd))} \\
      --append={shlex.quote(append)} > {out}/kexec.log 2>&1 \\
    || {{ fail "kdump: kexec -p failed: $(tail -n 1 {out}/kexec.log)"; return 1; }}
  read ivm_kd_loaded < /sys/kernel/kexec_crash_loaded
  [ "$ivm_kd_loaded" = 1 ] || {{ fail "kdump: kexec -p did not load a capture kernel"; return 1; }}
  echo "{MARK_LOADED} $ivm_kd_size"
  echo 1 > /proc/sys/kernel/sysrq
  (
    while [ ! -e {out}/{TRIGGER} ]; do sleep 0.2; done
    echo "{MARK_PANIC}"
    echo c > /proc/sysrq-trigger
  ) &
}}
ivm_kd_load
"""

    def _capture_script(self) -> str:
        """The capture initramfs's part of /init: in the capture kernel, every save, then off."""
        out = f"{inguest.GUEST_ROOT}{self.outdir}"
        lines = [self._mounts().rstrip("\n"),
                 "if [ -e /proc/vmcore ]; then",
                 f"  echo \"{MARK_CAPTURE} $(cut -d' ' -f1 /proc/uptime)\"",
                 "  if ivm_kd_mount ,cache=loose; then"]
        for s in self.saves:
            args = " ".join(shlex.quote(a) for a in self._args(s))
            dest = shlex.quote(f"{self.outdir}/{s.name}")
            lines += [
                f"    rm -f {out}/{s.name}; t0=$(cut -d' ' -f1 /proc/uptime)",
                f"    ivm_kd_run makedumpfile {args} /proc/vmcore {dest} > {out}/{s.name}.log 2>&1",
                f"    rc=$?; sync; echo \"{MARK_SAVE} {s.name} $rc $t0 $(cut -d' ' -f1 /proc/uptime)\"",
            ]
        lines += [
            f"    sync; umount {out}",
            "  fi",
            f"  echo {MARK_DONE}",
            "  poweroff -f; reboot -f",
            "fi",
            'fail "kdump: the capture initramfs booted, but there is no /proc/vmcore"',
        ]
        return "\n".join(lines) + "\n"

    def _args(self, save: Save) -> tuple[str, ...]:
        """makedumpfile's options for ``save``, ``{work}`` replaced by a work directory."""
        return tuple(a.replace("{work}", f"{self.outdir}/work") for a in save.args)

    # -- after the boot ----------------------------------------------------------------------

    def capture(self, guest, timeout: float = 900.0) -> CaptureResult:
        """Panic the guest (sysrq ``c``), wait until the capture kernel saved every dump and
        QEMU exited; raises LabError, with the console tail, when that does not happen."""
        report = reporter(self.progress)
        text = guest.console_text()
        if MARK_LOADED not in text:
            raise LabError("kdump: the guest did not load a capture kernel (boot it with KdumpSetup.guest_spec)")
        mark = len(text)
        start = time.monotonic()
        report("panicking the guest (sysrq c)")
        (self.outdir / TRIGGER).touch()
        up = None
        deadline = start + timeout
        while True:
            text = guest.console_text()[mark:]
            if up is None and re.search(rf"^{MARK_CAPTURE} ", text, re.M):
                up = time.monotonic() - start
                report(f"capture kernel up {up:.1f}s after the panic")
            rc = guest.process.poll()
            if rc is not None:
                break
            if time.monotonic() > deadline:
                raise LabError(f"kdump: the capture did not end within {timeout:.0f}s; last console lines:\n"
                               + "\n".join(guest.console_tail(30)))
            time.sleep(0.2)
        total = time.monotonic() - start
        fails = re.findall(rf"^(?:{MARK_FAIL}|IVM-ERROR) (.*)$", text, re.M)
        if up is None:  # (the first kernel's MARK_PANIC may not reach the console before it dies)
            raise LabError("kdump: the capture kernel did not run"
                           + (f" ({fails[0]})" if fails else "") + "; last console lines:\n"
                           + "\n".join(guest.console_tail(30)))
        saves: dict[str, SaveResult] = {}
        for m in re.finditer(rf"^{MARK_SAVE} (\S+) (\d+) (\S+) (\S+)\s*$", text, re.M):
            name, rc, t0, t1 = m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4))
            s = next(s for s in self.saves if s.name == name)
            log = self.outdir / f"{name}.log"
            saves[name] = SaveResult(name, self._args(s), self.outdir / name, rc, t1 - t0,
                                     log.read_text(errors="replace") if log.exists() else "")
            report(f"makedumpfile {' '.join(s.args).replace(' --work-dir {work}', '')}: status {rc} in {t1 - t0:.1f}s"
                   + (f", {(self.outdir / name).stat().st_size >> 20} MiB" if (self.outdir / name).exists() else ""))
        missing = [s.name for s in self.saves if s.name not in saves]
        if missing or MARK_DONE not in text:
            raise LabError(f"kdump: the capture kernel did not finish ({', '.join(missing) or 'no end mark'})"
                           + (f": {fails[0]}" if fails else "") + "; last console lines:\n"
                           + "\n".join(guest.console_tail(30)))
        bad = [s for s in saves.values() if not s.ok]
        if bad:
            last = bad[0].log.strip().splitlines()[-3:] if bad[0].log.strip() else []
            raise LabError(f"kdump: makedumpfile {' '.join(bad[0].args)} failed (status {bad[0].status}): "
                           + " | ".join(last))
        report(f"capture done in {total:.1f}s")
        return CaptureResult(saves, up, total, text)
