"""The error classes, for the pipeline's modules; they live in the shared leaf `data_tools.common`."""

from data_tools.common import ConfigError, DataError, DstrainError, StorageError, first_line

__all__ = ["ConfigError", "DataError", "DstrainError", "StorageError", "first_line"]
