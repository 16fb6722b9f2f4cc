"""inspect-vmemmap: check a Linux kernel's vmemmap against its mem_section array and the
rules that built it.

From a drgn session: ``inspect_vmemmap.analyze(prog)`` (:mod:`inspect_vmemmap.api`)."""

__version__ = "0.1.0"
__all__ = ["analyze", "Report"]


def analyze(prog, **kwargs):
    """``check`` on a ``drgn.Program`` you already hold; returns a :class:`Report`
    (see :func:`inspect_vmemmap.api.analyze`)."""
    from inspect_vmemmap.api import analyze as _analyze

    return _analyze(prog, **kwargs)


def __getattr__(name):
    if name == "Report":  # imported on first use: the command line does not need it
        from inspect_vmemmap.api import Report

        return Report
    raise AttributeError(f"module 'inspect_vmemmap' has no attribute {name!r}")
