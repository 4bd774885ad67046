"""The error users see: one line naming the file or field and what to do."""


class DataError(Exception):
    """Bad input or configuration; the CLI prints the message alone and exits non-zero."""
