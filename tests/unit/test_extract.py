"""Extraction: real HTML pages to text (charsets included) and Wikipedia wikitext to markup-free
text that keeps the visible words of links and headings."""

from __future__ import annotations

import re

import pytest
from warcio.archiveiterator import ArchiveIterator

from data_tools.config import ExtractConfig
from data_tools.doc import Doc
from data_tools.extract import ExtractText, html_to_text
from data_tools.wikitext import wikitext_to_text

HANDBOOK = "https://debian-handbook.info/browse/"


def html_responses(path):
    """{url: (declared Content-Type, payload)} of every HTML response in a WARC, whatever its status."""
    pages = {}
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f):
            content_type = rec.http_headers.get_header("Content-Type", "") if rec.http_headers else ""
            if rec.rec_type == "response" and content_type.startswith("text/html"):
                pages[rec.rec_headers.get_header("WARC-Target-URI")] = (content_type, rec.content_stream().read())
    return pages


@pytest.fixture(scope="module")
def iana_pages(corpora):
    return html_responses(corpora / "iana.warc.gz")


@pytest.fixture(scope="module")
def handbook_pages(corpora):
    return html_responses(corpora / "handbook-multilingual.warc.gz")


# ----------------------------------------------------------------------------- HTML


def test_iso_8859_1_pages_of_iana(iana_pages):
    """The iana crawl's iso-8859-1 pages (Apache 302 bodies) decode with their declared charset."""
    latin1 = {url: page for url, page in iana_pages.items() if "iso-8859-1" in page[0]}
    assert len(latin1) == 2
    for content_type, payload in latin1.values():
        assert html_to_text(payload, content_type.split("charset=")[1]) == "Found\n\nThe document has moved here."


def test_real_page_text(iana_pages):
    """A real iana page gives its heading and prose, typographic quotes intact, and no HTML or script."""
    text = html_to_text(iana_pages["http://www.iana.org/domains"][1], "utf-8")
    assert text.startswith("Domain Name Services\n\nIANA is responsible for the operation and maintenance of")
    assert "delegating administrative responsibility of “top-level domains”" in text
    assert "â€" not in text  # UTF-8 decoded once, not as cp1252
    for markup in ("<div", "<a ", "<script", "<meta", "</", "function(", "{"):
        assert markup not in text


@pytest.mark.parametrize(
    "url, charset",
    [
        (HANDBOOK + "ru-RU/stable/sect.why-gnu-linux.html", "koi8-r"),
        (HANDBOOK + "ru-RU/stable/sect.why-gnu-linux.html", "cp1251"),
        (HANDBOOK + "fr-FR/stable/security.html", "iso-8859-1"),
        (HANDBOOK + "de-DE/stable/sect.why-gnu-linux.html", "iso-8859-1"),
        ("http://www.iana.org/domains/root/db", "iso-8859-1"),
    ],
)
def test_declared_charset_decodes_re_encoded_page(iana_pages, handbook_pages, url, charset):
    """A real page re-encoded in a legacy charset gives the same text as the UTF-8 original when
    that charset is declared, and when none is declared (detection)."""
    payload = {**iana_pages, **handbook_pages}[url][1]
    reference = html_to_text(payload, "utf-8")
    encoded = payload.decode("utf-8").encode(charset, "xmlcharrefreplace")
    assert encoded != payload and re.search(r"[^\x00-\x7f]", reference)
    assert html_to_text(encoded, charset) == reference
    assert html_to_text(encoded, None) == reference


@pytest.mark.parametrize("charset", ["koi8-r", "cp1251"])
def test_declared_charset_is_used(handbook_pages, charset):
    """Cyrillic bytes decoded under a wrong declared charset turn to mojibake: the declaration is
    what makes the test above pass, not luck."""
    payload = handbook_pages[HANDBOOK + "ru-RU/stable/sect.why-gnu-linux.html"][1]
    encoded = payload.decode("utf-8").encode(charset, "xmlcharrefreplace")
    assert "Почему дистрибутив" in html_to_text(encoded, charset)
    assert "Почему дистрибутив" not in html_to_text(encoded, "utf-8")


def test_main_content_drops_navigation(iana_pages):
    """main_content=True keeps the page's prose and drops the navigation lists around it."""
    payload = iana_pages["http://www.iana.org/"][1]
    main, full = html_to_text(payload, "utf-8", True), html_to_text(payload, "utf-8", False)
    assert "The Internet Assigned Numbers Authority (IANA) is responsible" in main
    assert len(main) < len(full)
    assert "• Root Zone Management" in full and "• Root Zone Management" not in main


def test_extract_step_turns_raw_into_text(corpora):
    """ExtractText fills `text`, clears `raw`, consumes the charset and keeps every iana page."""
    from data_tools.readers.warc import read_warc
    from data_tools.stats import StageStats

    step, warnings = ExtractText(ExtractConfig()), []
    docs = list(step(read_warc(corpora / "iana.warc.gz", StageStats(), warnings.append)))
    assert warnings == []
    assert len(docs) == 16 and step.stats.docs_out == 16 and not step.stats.dropped
    assert all(d.format == "text" and d.raw is None and "charset" not in d.meta and d.text for d in docs)
    assert step.stats.chars_out == sum(len(d.text) for d in docs)


def test_extract_step_drops_short_pages_as_empty(iana_pages):
    """Pages whose text is shorter than min_chars are dropped with reason "empty"."""
    docs = [
        Doc(id=url, source="iana", raw=payload, format="html", meta={"charset": "utf-8"})
        for url, (_, payload) in iana_pages.items()
    ]
    lengths = [len(html_to_text(d.raw, "utf-8").strip()) for d in docs]
    min_chars = sorted(lengths)[5]  # the 5 shortest pages fall below it
    step = ExtractText(ExtractConfig(min_chars=min_chars))
    kept = list(step(docs))
    assert step.stats.dropped == {"empty": 5}
    assert all(len(d.text.strip()) >= min_chars for d in kept) and len(kept) == len(docs) - 5


# ----------------------------------------------------------------------------- wikitext

MARKUP = ["{{", "}}", "[[", "]]", "<ref", "{|", "|}", "Category:", "File:", "thumb|"]


@pytest.mark.parametrize("markup", MARKUP)
def test_wikitext_leaves_no_markup(enwiki_docs, markup):
    """No article of the enwiki sample keeps template, link, ref, table, category or file markup."""
    assert len(enwiki_docs) == 106
    offenders = [d.meta["title"] for d in enwiki_docs if markup in d.text]
    assert offenders == []


def test_wikitext_source_has_that_markup(corpora):
    """The raw articles do contain every markup the test above looks for (so it can fail)."""
    from data_tools.readers.wikipedia import read_wikipedia
    from data_tools.stats import StageStats

    warnings = []
    raw = "".join(d.raw for d in read_wikipedia(corpora / "enwiki-sample.xml.bz2", StageStats(), warnings.append))
    assert warnings == []
    assert all(markup in raw for markup in MARKUP)


def test_wikitext_keeps_link_text(article):
    """Anarchism's opening sentence keeps the words of its plain and piped links."""
    # source: '''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] societies ...
    text = article("Anarchism")
    assert text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions. "
        "These are often described as stateless societies,"
    )


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("'''Anarchism''' is a [[political philosophy]].", "Anarchism is a political philosophy."),
        ("advocates [[self-governance|self-governed]] societies", "advocates self-governed societies"),
        ("{{Anarchism sidebar}}\nAnarchism draws on many currents.", "Anarchism draws on many currents."),
        ("stateless societies,<ref>George Woodcock. ''Anarchism''</ref> although", "stateless societies, although"),
        ("harmful.<ref name=\"iep\" /> While", "harmful. While"),
        ("[[File:Paolo Monti - Servizio fotografico.jpg|thumb|upright|A caption]]\nText.", "Text."),
        ("Text.\n[[Category:Political culture]]\n[[fr:Anarchisme]]", "Text."),
        ("== Etymology and terminology ==\nThe term", "Etymology and terminology\nThe term"),
        ("see [http://www.theanarchistlibrary.org the library] here", "see the library here"),
        ("{| class=\"wikitable\"\n|-\n| cell || cell\n|}\nAfter.", "After."),
        ("A&nbsp;B &amp; C<!-- hidden -->", "A\xa0B & C"),
    ],
)
def test_wikitext_constructs(wikitext, expected):
    """Each construct of real articles becomes its visible text (or nothing)."""
    assert wikitext_to_text(wikitext) == expected
