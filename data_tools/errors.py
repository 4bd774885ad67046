"""The error users see: one line naming the file or field and what to do."""


class DataError(Exception):
    """Bad input or configuration; the CLI prints the message alone and exits non-zero."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none), to quote inside a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
