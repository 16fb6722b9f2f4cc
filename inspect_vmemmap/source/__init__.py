"""Reading a kernel: opening it (:mod:`.target`, through the drgn adapter :mod:`.drgn`),
its VMCOREINFO (:mod:`.vmcoreinfo`), the layout decision (:mod:`.decide`), the kernel
structures the model's inputs come from (:mod:`.kstructs`, :mod:`.gather`) and what a dump
file left out (:mod:`.dumpfile`)."""

from inspect_vmemmap.source.target import Target, open_target, target_from_program

__all__ = ["Target", "open_target", "target_from_program"]
