"""The error every layer raises when a target cannot be analysed (the CLI, the lab and
the sources share it)."""


class AnalysisError(Exception):
    """The target cannot be analysed; the message is the one line the user sees."""


def one_line(e: BaseException) -> str:
    """:return: the first line of an exception's message, or its type's name."""
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
