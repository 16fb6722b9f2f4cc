"""The command line (docs/CONTRACT.md)."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click
from rich.console import Console

from inspect_vmemmap.findings import exit_status

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    """One line on stderr and exit status 2 (CONTRACT.md)."""
    click.echo(f"inspect-vmemmap: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def target_options(f: Callable) -> Callable:
    @click.option("--core", type=click.Path(dir_okay=False), help="A crash dump: ELF vmcore or kdump-compressed.")
    @click.option("--qemu", metavar="SOCKET", help="A running QEMU guest, through its QMP socket.")
    @click.option("--vmlinux", type=click.Path(dir_okay=False), help="Kernel debug info (DWARF).")
    @click.option("--no-debuginfo", is_flag=True, help="Ignore any debug info; VMCOREINFO, kallsyms and BTF only.")
    @click.option("--vmcoreinfo", type=click.Path(dir_okay=False), metavar="FILE",
                  help="VMCOREINFO text for a dump that lacks the note (default: found in the dump by its text).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs["tgt"] = {k: kwargs.pop(k) for k in ("core", "qemu", "vmlinux", "no_debuginfo", "vmcoreinfo")}
        return f(*args, **kwargs)

    return wrapper


def _open(tgt: dict):
    from inspect_vmemmap.errors import AnalysisError
    from inspect_vmemmap.source import open_target
    from inspect_vmemmap.userfiles import UserFileError, plain_core

    status = Console(stderr=True).status if sys.stderr.isatty() else None
    given = tgt.get("core")
    try:
        from inspect_vmemmap.inputs import check_target_inputs, require_possible
        from inspect_vmemmap.truncation import attach

        check_target_inputs(**tgt)  # before anything opens them: a FIFO or a silent QMP socket blocks forever
        if given:  # a compressed dump (.xz, .gz, .bz2, .zst) is read from a decompressed copy
            tgt = dict(tgt, core=plain_core(given, status))
        if status is None:
            return attach(require_possible(open_target(**tgt)), tgt.get("core"))
        what = given or tgt.get("qemu") or "the running kernel"
        how = f", loading debug info from {tgt['vmlinux']}" if tgt.get("vmlinux") else ""
        with status(f"opening {what}{how}"):  # DWARF takes seconds
            return attach(require_possible(open_target(**tgt)), tgt.get("core"))
    except UserFileError as e:
        _fail(str(e))
    except AnalysisError as e:
        # messages name the file opened: the user's, not the decompressed copy
        _fail(str(e).replace(tgt["core"], f"{given} (decompressed)") if given and tgt["core"] != given else str(e))


def _guard(f: Callable) -> Callable:
    """Turn analysis errors and broken input into one line and exit 2, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from inspect_vmemmap.errors import AnalysisError

        try:
            return f(*args, **kwargs)
        except AnalysisError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted")
        except BrokenPipeError:
            from inspect_vmemmap.report import reader_went_away

            reader_went_away()
        except MemoryError:
            _fail("out of memory")
        except Exception as e:  # a bug: still one line, the traceback on request
            import os

            if os.environ.get("INSPECT_VMEMMAP_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (set INSPECT_VMEMMAP_DEBUG=1 for the traceback)")

    return wrapper


class _RichProgress:
    """A transient progress bar on stderr, for work that can take more than a second."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()

    def task(self, description: str, total: int):
        tid = self.bar.add_task(description, total=total)
        return lambda completed: self.bar.update(tid, completed=completed)

    def close(self) -> None:
        self.bar.stop()


def _progress():
    import atexit

    if not sys.stderr.isatty():
        return None
    progress = _RichProgress()
    atexit.register(progress.close)
    return progress


def _load(tgt: dict):
    from inspect_vmemmap.commands import Analysis

    return Analysis(_open(tgt), _progress())


def main() -> None:
    """Entry point: click's usage errors become one line and exit status 2 too."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted")
    except click.ClickException as e:
        _fail(e.format_message())
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inspect-vmemmap")
def cli() -> None:
    """Check that a kernel's struct page array (the vmemmap) is where the kernel thinks it is.

    Without --core or --qemu, reads the running kernel through /proc/kcore (as root).
    """


@cli.command()
@target_options
@_guard
def sections(tgt, as_json):
    """The mem_section table: flags (crash's P M O E D), coded and decoded mem_map."""
    from inspect_vmemmap import report

    ld = _load(tgt)
    doc, findings = ld.sections_doc()
    if as_json:
        report.print_json(doc)
    else:
        con = report.stdout_console()
        report.target_line(con, ld.t.to_json(), ld.t.layout)
        report.print_sections(con, ld.sections)
        report.print_findings(con, findings)
    sys.exit(exit_status(findings))


@cli.command("map")
@target_options
@_guard
def map_(tgt, as_json):
    """The vmemmap as the page tables map it: ranges, page sizes, permissions, backing, node."""
    from inspect_vmemmap import report

    ld = _load(tgt)
    doc, findings = ld.map_doc()
    if as_json:
        report.print_json(doc)
    else:
        con = report.stdout_console()
        report.target_line(con, ld.t.to_json(), ld.t.layout)
        report.print_map(con, ld.vmemmap())
        report.print_findings(con, findings)
    sys.exit(exit_status(findings))


@cli.command()
@click.argument("pfn_text", metavar="PFN")
@target_options
@_guard
def pfn(pfn_text, tgt, as_json):
    """One pfn explained: section, struct page address, every page-table level, backing page.

    PFN is decimal or 0x-prefixed hex.
    """
    from inspect_vmemmap import report

    try:
        value = int(pfn_text, 0)
        if value < 0:
            raise ValueError
    except ValueError:
        _fail(f"PFN must be a non-negative number (decimal or 0x hex), not {pfn_text!r}")
    ld = _load(tgt)
    if value >= 1 << (ld.t.layout.max_physmem_bits - ld.t.layout.page_shift):
        _fail(f"pfn {value:#x} is beyond MAX_PHYSMEM_BITS ({ld.t.layout.max_physmem_bits})")
    doc, findings = ld.pfn_doc(value)
    info = doc["pfn"]
    if as_json:
        report.print_json(doc)
    else:
        con = report.stdout_console()
        report.target_line(con, ld.t.to_json(), ld.t.layout)
        report.print_pfn(con, info)
        report.print_findings(con, findings)
    sys.exit(exit_status(findings))


@cli.command()
@target_options
@click.option("--save-layout", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write the model's inputs read from this kernel (replay with `model FILE`).")
@click.option("--deep", is_flag=True, help="Read every struct page's node and zone, not a sample per section.")
@click.option("--reads", type=click.IntRange(1, 10), default=3, show_default=True, metavar="N",
              help="Running kernels (live, --qemu): read again after errors, at most N reads in all; "
                   "errors that change between reads are reported as races.")
@_guard
def check(tgt, as_json, save_layout, deep, reads):
    """Everything: sections, vmemmap page tables, the reference model, and what backs the vmemmap."""
    import json as _json

    from inspect_vmemmap import report
    from inspect_vmemmap.live.racecheck import check_running  # eBPF on the running kernel, else re-reads

    if save_layout:
        from inspect_vmemmap.inputs import require_output_path

        require_output_path(save_layout, "--save-layout", [(tgt["core"], "--core"), (tgt["vmlinux"], "--vmlinux"),
                                                           (tgt["vmcoreinfo"], "--vmcoreinfo"), (tgt["qemu"], "--qemu")])
    ld, doc, findings, res, inputs, notes = check_running(_open(tgt), deep, _progress(), reads)
    if save_layout:
        try:
            with open(save_layout, "w") as f:
                _json.dump(inputs.to_json(), f, indent=1)
        except OSError as e:
            _fail(f"{save_layout}: {e.strerror}")
    if as_json:
        report.print_json(doc)
    else:
        report.print_check_report(report.stdout_console(), ld, doc, findings, res, notes)
    sys.exit(exit_status(findings))


@cli.command()
@click.argument("layout_file", metavar="LAYOUT", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_guard
def model(layout_file, as_json):
    """The reference model alone, offline: what the kernel should have built for LAYOUT
    (a JSON file written by `check --save-layout`)."""
    from inspect_vmemmap import report
    from inspect_vmemmap.model import predict
    from inspect_vmemmap.userfiles import UserFileError, read_layout

    from inspect_vmemmap.inputs import load_layout

    try:
        inputs = load_layout(layout_file, read_layout)  # schema and limits too: one line, exit 2
    except UserFileError as e:
        _fail(str(e))
    pred = predict(inputs)
    if as_json:
        doc = {"schema": report.SCHEMA, "target": {"source": "layout", "kernel_release": inputs.layout.kernel_release,
                                                   "arch": inputs.layout.arch}, "model": pred.to_json()}
        report.print_json(doc)
    else:
        report.print_model(report.stdout_console(), inputs, pred)
    sys.exit(0)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def boot(args):
    """Boot a kernel in a throwaway QEMU VM with a given memory layout and check its vmemmap
    (from the host, or --in-guest); `boot --help` for the options."""
    from inspect_vmemmap.lab import boot as _boot  # its options and logic: inspect_vmemmap/lab/boot.py

    sys.exit(_boot.command.main(list(args), prog_name="inspect-vmemmap boot", standalone_mode=False) or 0)


@cli.command()
@click.option("--interval", metavar="S", type=click.FloatRange(min=0.1), default=None,
              help="Also a full check every S seconds (catches what no probe sees).")
@click.option("--duration", metavar="S", type=click.FloatRange(min=0), default=None, help="Stop after S seconds.")
@click.option("--count", metavar="N", type=click.IntRange(min=1), default=None, help="Stop after N changes.")
@click.option("--attach-timeout", metavar="S", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="How long bpftrace may take to attach its probes (minutes in an emulated guest).")
@target_options
@_guard
def watch(tgt, as_json, interval, duration, count, attach_timeout):
    """Watch the running kernel change its vmemmap (eBPF, bpftrace; as root) and re-check
    what each change touched once it has returned. Ctrl-C ends; exit status as check."""
    from inspect_vmemmap.live.watch import command  # inspect_vmemmap/live/
    from inspect_vmemmap.report import stdout_console

    sys.exit(command(tgt, as_json, interval, duration, count, _open, stdout_console, _fail,
                     attach_timeout=attach_timeout))
