"""Turn raw markup into plain text: HTML with resiliparse, wikitext with mwparserfromhell."""

from __future__ import annotations

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from data_tools.config import ExtractConfig
from data_tools.doc import Doc, Step
from data_tools.wikitext import wikitext_to_text


def html_to_text(raw: bytes, charset: str | None, main_content: bool = True) -> str:
    """Decode with the declared charset when it works, else the detected one, then extract."""
    html = bytes_to_str(raw, charset or detect_encoding(raw), fallback_encodings=("utf-8", "cp1252"))
    return extract_plain_text(html, main_content=main_content, alt_texts=False, links=False, list_bullets=True)


class ExtractText(Step):
    name = "extract"

    def __init__(self, config: ExtractConfig) -> None:
        super().__init__()
        self.config = config

    def apply(self, doc: Doc) -> str | None:
        if doc.format == "html":
            doc.text = html_to_text(doc.raw, doc.meta.pop("charset", None), self.config.main_content)
        elif doc.format == "wikitext":
            doc.text = wikitext_to_text(doc.raw)
        doc.raw, doc.format = None, "text"
        return "empty" if len(doc.text.strip()) < self.config.min_chars else None
