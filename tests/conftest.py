"""Both tiers: the tool's per-build cache (inspect_vmemmap/kcache.py) is off, so that what a
test sees never depends on what earlier runs left in the user's cache (a hostile dump of a
build the cache knows would be answered from the record, not from its own damaged
memory); tests/unit/test_kcache.py turns it on in a directory of its own."""

import os

os.environ["INSPECT_VMEMMAP_NO_CACHE"] = "1"
