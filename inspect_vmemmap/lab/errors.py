"""The lab's single exception type."""

from __future__ import annotations


class LabError(Exception):
    """Any failure of the lab: missing tools, fetch/extract problems, boot timeouts, QMP errors.

    The first line of the message is meant to be shown to a user as-is.
    """
