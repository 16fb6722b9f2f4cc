"""docs/schema.json, the one JSON schema of every command's ``--json`` document, and a
validator for tests (jsonschema, draft 2020-12)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "schema.json"
#: the documents the schema defines, by command
COMMANDS = ("check", "sections", "map", "pfn", "model", "boot")


@lru_cache(maxsize=None)
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@lru_cache(maxsize=None)
def _validator(command: str):
    import jsonschema

    root = schema()
    if command not in root["$defs"]:
        raise KeyError(f"docs/schema.json defines no document for {command!r}")
    sub = {k: v for k, v in root.items() if k not in ("anyOf", "title", "description")}
    sub["$ref"] = f"#/$defs/{command}"
    cls = jsonschema.validators.validator_for(root)
    cls.check_schema(root)
    return cls(sub, format_checker=cls.FORMAT_CHECKER)


def errors(doc, command: str) -> list:
    """Every way ``doc`` breaks the schema of ``command``'s document, as readable lines."""
    out = []
    for e in sorted(_validator(command).iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        out.append(f"{where}: {e.message[:300]}")
    return out


def validate(doc, command: str) -> None:
    """:raises AssertionError: naming every violation of ``command``'s schema."""
    bad = errors(doc, command)
    assert not bad, f"{command} --json does not match docs/schema.json:\n  " + "\n  ".join(bad[:20])
