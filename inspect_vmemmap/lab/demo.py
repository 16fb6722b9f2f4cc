"""``scripts/demo --boot``: boot a Debian kernel with HVO hugepages and run ``sections`` and
``map`` against the live guest through its QMP socket."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from . import SERIES, GuestSpec, LabError, boot_guest


def main(argv: list[str]) -> int:
    series = argv[0] if argv else "6.12"
    if series not in SERIES or len(argv) > 1:
        print(f"demo: --boot takes one Debian kernel series: {', '.join(SERIES)} (not {' '.join(argv)})",
              file=sys.stderr)
        return 2
    spec = GuestSpec(debian=series, mem="1G", hugepages=4, hvo=True)
    try:
        with tempfile.TemporaryDirectory(prefix="ivm-demo-") as work, boot_guest(spec, workdir=work) as guest:
            acct = guest.account
            print(f"# guest {acct.release}: MemTotal {acct.mem_total_kb} kB, "
                  f"HugePages_Total {acct.hugepages_total}, nodes {acct.nodes}", flush=True)
            print("# the QMP socket below is the demo guest's: it is gone when the demo ends", flush=True)
            status = 0
            for cmd in ("sections", "map"):
                argv_ = [sys.executable, "-m", "inspect_vmemmap", cmd, "--qemu", str(guest.qmp_socket),
                         "--vmlinux", str(guest.kernel.vmlinux)]
                print(f"\n$ inspect-vmemmap {cmd} --qemu {guest.qmp_socket} --vmlinux {guest.kernel.vmlinux}", flush=True)
                status = max(status, subprocess.call(argv_))
        print(f"\n# the same guest, booted and checked in one command you can run again:\n"
              f"$ .venv/bin/inspect-vmemmap boot --debian {series} --mem 1G --hugepages 4 --hvo", flush=True)
        return status
    except LabError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
