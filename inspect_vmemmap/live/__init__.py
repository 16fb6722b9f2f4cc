"""Watching a running kernel change its vmemmap, with eBPF (``inspect-vmemmap watch``).

- :mod:`.probes`: the kernel functions that change the vmemmap, chosen per kernel by
  feature (its BTF and its traceable functions), and the bpftrace program over them;
- :mod:`.events`: bpftrace's lines turned into changes (entry and return paired per task,
  nested calls folded into the change that made them);
- :mod:`.watch`: the command: runs bpftrace, re-checks what each change touched once it
  has returned, and a periodic full check.

Nothing here imports drgn; the target comes from :mod:`inspect_vmemmap.target`.
"""
