"""inspect-vmemmap: check a Linux kernel's vmemmap against its mem_section array and the
rules that built it."""

__version__ = "0.1.0"
