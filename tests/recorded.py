"""The recorded dumps in fixtures/ (scripts/make-fixtures), unpacked for a test."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def unpack(name: str, directory: Path) -> Path:
    """:return: ``directory/NAME.core``, the fixture ``NAME.core.xz`` decompressed there."""
    path = Path(directory) / f"{name}.core"
    with lzma.open(FIXTURES / f"{name}.core.xz") as f, open(path, "wb") as out:
        shutil.copyfileobj(f, out)
    return path
