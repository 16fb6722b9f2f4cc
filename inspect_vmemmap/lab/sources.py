"""Deriving the Debian archive URIs from the host's apt configuration (pure functions).

No host name is hard-coded anywhere: the mirror comes from the host's own
``/etc/apt/sources.list.d/*.sources`` (deb822) or ``/etc/apt/sources.list`` (one-line
format), or from ``$INSPECT_VMEMMAP_DEBIAN_MIRROR``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import LabError

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# Suites that carry the main archive (never -security/-updates/-backports).
_MAIN_SUITES = {
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke",
    "sid", "unstable", "testing", "stable", "oldstable", "experimental",
}


def parse_deb822(text: str) -> list[dict[str, str]]:
    """Parse deb822 stanzas (as in ``*.sources``) into dicts of field -> value.

    Comments are dropped; continuation lines are joined with newlines.
    """
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                stanzas.append(cur)
            cur, last = {}, None
            continue
        if raw[0] in " \t" and last is not None:
            cur[last] += "\n" + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last = key.strip().lower()
        cur[last] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def _is_main_suite(suite: str, codename: str | None) -> bool:
    return suite == codename or suite in _MAIN_SUITES


def uris_from_deb822(text: str, codename: str | None) -> list[str]:
    """URIs of the stanza serving the main suite (``codename`` preferred)."""
    stanzas = [
        s for s in parse_deb822(text)
        if "deb" in s.get("types", "deb").split() and s.get("enabled", "yes").lower() != "no"
    ]
    for match in (lambda suite: suite == codename, lambda suite: _is_main_suite(suite, codename)):
        for s in stanzas:
            if any(match(suite) for suite in s.get("suites", "").split()):
                uris = s.get("uris", "").split()
                if uris:
                    return uris
    return []


_ONE_LINE = re.compile(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)")


def uris_from_one_line(text: str, codename: str | None) -> list[str]:
    """URIs of ``deb URI SUITE ...`` lines for the main suite (``codename`` preferred)."""
    entries = []
    for line in text.splitlines():
        m = _ONE_LINE.match(line.split("#", 1)[0])
        if m:
            entries.append((m.group(1), m.group(2)))
    for match in (lambda suite: suite == codename, lambda suite: _is_main_suite(suite, codename)):
        uris = [u for u, suite in entries if match(suite)]
        if uris:
            return list(dict.fromkeys(uris))
    return []


def host_codename(os_release: Path = Path("/etc/os-release")) -> str | None:
    try:
        text = os_release.read_text()
    except OSError:
        return None
    m = re.search(r'^VERSION_CODENAME="?([^"\n]*)"?', text, re.M)
    return m.group(1) if m and m.group(1) else None


def host_debian_uris(etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """The Debian archive URIs this host uses (or ``$INSPECT_VMEMMAP_DEBIAN_MIRROR``)."""
    env = os.environ.get("INSPECT_VMEMMAP_DEBIAN_MIRROR")
    if env:
        return env.split()
    codename = host_codename()
    texts: list[tuple[str, str]] = []
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix in (".sources", ".list") and f.is_file():
                texts.append((f.suffix, f.read_text(errors="replace")))
    main = etc_apt / "sources.list"
    if main.is_file():
        texts.append((".list", main.read_text(errors="replace")))
    for kind, text in texts:
        uris = (uris_from_deb822 if kind == ".sources" else uris_from_one_line)(text, codename)
        if uris:
            return uris
    raise LabError(
        "cannot find a Debian archive in /etc/apt sources; "
        "set INSPECT_VMEMMAP_DEBIAN_MIRROR to a Debian mirror URI"
    )


def sources_list(uris: list[str], suite: str, keyring: str = DEBIAN_KEYRING) -> str:
    """One-line sources.list text for ``suite`` main from ``uris``."""
    return "".join(f"deb [signed-by={keyring}] {u} {suite} main\n" for u in uris)
