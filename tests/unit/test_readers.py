"""Readers: format detection, document counts of the sample corpora, and bad input that is
counted, named in one warning (file + offset/page/line) and skipped while the rest is read."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest
from warcio.archiveiterator import ArchiveIterator

from data_tools.errors import DataError
from data_tools.readers import detect_format, expand_inputs, get_reader
from data_tools.stats import StageStats

MW = "{http://www.mediawiki.org/xml/export-0.10/}"


def read(path, fmt=None):
    """Read a file with the reader its format names; return (docs, stats, warnings)."""
    stats, warnings = StageStats(), []
    docs = list(get_reader(fmt or detect_format(path))(path, stats, warnings.append))
    return docs, stats, warnings


@pytest.fixture(scope="module")
def reviews(corpora):
    """Twelve real movie-review sentences (the sentiment fine-tuning set)."""
    with open(corpora / "finetune" / "sentiment-movie-reviews.csv", newline="", encoding="utf-8") as f:
        return [row["text"] for _, row in zip(range(12), csv.DictReader(f))]


def jsonl_bytes(records):
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def write_input(kind, directory, texts, name=None):
    """Write `texts` as an input of `kind`; `name` overrides the file name (to test sniffing)."""
    if kind.startswith("jsonl"):
        path = directory / (name or f"docs.{kind}")
        path.write_bytes(compress(jsonl_bytes({"text": t} for t in texts), kind.removeprefix("jsonl")))
        return path
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / (name or "docs.parquet")
        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=5)
        return path
    import datasets

    path = directory / (name or kind)
    dataset = datasets.Dataset.from_dict({"text": texts})
    if kind == "hf_datasetdict":
        dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["other split"]}), "train": dataset})
    dataset.save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    "name, fmt",
    [("iana.warc.gz", "warc"), ("handbook-multilingual.warc.gz", "warc"), ("enwiki-sample.xml.bz2", "wikipedia")],
)
def test_detect_format_of_sample_corpora(corpora, name, fmt):
    """Each shipped corpus is recognised as what it is."""
    assert detect_format(corpora / name) == fmt


BUILT = [
    ("jsonl", "jsonl"),
    ("jsonl.gz", "jsonl"),
    ("jsonl.zst", "jsonl"),
    ("parquet", "parquet"),
    ("hf_dataset", "hf_dataset"),
    ("hf_datasetdict", "hf_dataset"),
]


@pytest.mark.parametrize("kind, fmt", BUILT)
def test_detect_format_and_read_built_inputs(tmp_path, reviews, kind, fmt):
    """JSONL (plain, gzip, zstd), Parquet and `datasets` directories are detected and read back
    text for text, in order (a DatasetDict gives its train split)."""
    path = write_input(kind, tmp_path, reviews)
    assert detect_format(path) == fmt
    docs, stats, warnings = read(path)
    assert [d.text for d in docs] == reviews
    assert {d.source for d in docs} == {path.name}
    assert stats.docs_in == stats.docs_out == len(reviews)
    assert warnings == []


@pytest.mark.parametrize("kind, fmt", [("jsonl", "jsonl"), ("jsonl.gz", "jsonl"), ("jsonl.zst", "jsonl"), ("parquet", "parquet")])
def test_detect_format_by_content_without_extension(tmp_path, reviews, kind, fmt):
    """Without a telling name, the (decompressed) first bytes decide."""
    assert detect_format(write_input(kind, tmp_path, reviews, name="input.dat")) == fmt


@pytest.mark.parametrize(
    "name, fmt, opener", [("iana.warc.gz", "warc", gzip.open), ("enwiki-sample.xml.bz2", "wikipedia", bz2.open)]
)
def test_detect_format_of_renamed_corpus(corpora, tmp_path, name, fmt, opener):
    """A WARC or Wikipedia dump renamed to `.gz` / `.bz2` only is still found by its content."""
    path = tmp_path / ("input" + name[name.rindex(".") :])
    path.write_bytes((corpora / name).read_bytes())
    assert detect_format(path) == fmt
    with opener(path, "rb") as f:  # the renamed file holds what the reader expects
        assert f.read(5) in (b"WARC/", b"<medi")


def test_detect_format_rejects_unknown_file_and_directory(tmp_path):
    """Unknown content and a plain directory are DataErrors naming the path."""
    unknown = tmp_path / "notes.txt"
    unknown.write_text("Plain prose, not a corpus format.\n")
    with pytest.raises(DataError, match="notes.txt: unknown input format"):
        detect_format(unknown)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="folder: directory of unknown format"):
        detect_format(folder)


def test_jsonl_keeps_record_id_and_url(tmp_path, reviews):
    """`id` and `url` fields are carried; records without `id` get distinct ids naming the file."""
    path = tmp_path / "docs.jsonl"
    records = [{"text": reviews[0], "id": "r0", "url": "https://example.org/r0"}] + [{"text": t} for t in reviews[1:4]]
    path.write_bytes(jsonl_bytes(records))
    docs, _, _ = read(path)
    assert (docs[0].id, docs[0].url) == ("r0", "https://example.org/r0")
    generated = [d.id for d in docs[1:]]
    assert len(set(generated)) == 3 and all(i.startswith("docs.jsonl") for i in generated)
    assert {d.url for d in docs[1:]} == {""}


@pytest.mark.parametrize("kind", ["parquet", "hf_dataset"])
def test_table_without_text_column_is_a_data_error(tmp_path, kind):
    """Parquet / datasets input without a `text` column names the file and its columns."""
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": ["a", "b"]}), path)
    else:
        import datasets

        path = tmp_path / "docs_ds"
        datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"docs.*no 'text' column \(columns: body\)"):
        read(path)


def test_parquet_null_text_row_is_skipped_with_row_number(tmp_path, reviews):
    """A null `text` in row 2 is counted as missing_text, named by row, and its neighbours read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": reviews[:2] + [None] + reviews[2:4]}), path)
    docs, stats, warnings = read(path)
    assert [d.text for d in docs] == reviews[:4]
    assert stats.dropped == {"missing_text": 1}
    assert len(warnings) == 1 and str(path) in warnings[0] and "row 2" in warnings[0]


def test_expand_inputs_sorts_globs_and_rejects_missing(tmp_path):
    """Globs expand sorted; a missing path or an empty glob is a DataError naming it."""
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    assert expand_inputs([str(tmp_path / "*.jsonl")]) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match=r"\*.parquet: the pattern matches no file"):
        expand_inputs([str(tmp_path / "*.parquet")])


# ----------------------------------------------------------------------------- sample corpora


@dataclass
class Record:
    offset: int
    length: int
    type: str
    url: str
    content_type: str
    status: str


def warc_records(path):
    """Every record of a WARC as warcio sees it, with its byte offset and length."""
    records = []
    with open(path, "rb") as f:
        iterator = ArchiveIterator(f)
        for rec in iterator:
            http = rec.http_headers
            content_type = (http.get_header("Content-Type") or "") if http else ""
            status = http.get_statuscode() if http else ""
            url = rec.rec_headers.get_header("WARC-Target-URI") or ""
            rec.content_stream().read()
            offset, length = iterator.get_record_offset(), iterator.get_record_length()
            records.append(Record(offset, length, rec.rec_type, url, content_type, status))
    return records


def html_ok(records):
    return [r for r in records if r.type == "response" and r.status == "200" and r.content_type.startswith("text/html")]


@pytest.mark.parametrize(
    "name, n_docs, dropped",
    [
        # README: 343 records (1 warcinfo, 171 request, 48 response, 123 revisit); 20 HTML responses, 4 of them 302s
        ("iana.warc.gz", 16, {"warcinfo": 1, "request": 171, "revisit": 123, "not_html": 28, "http_status_not_200": 4}),
        # README: 257 records (1 warcinfo, 128 request, 128 response); 122 HTML, 6 CSS/PNG/GIF/SVG
        ("handbook-multilingual.warc.gz", 122, {"warcinfo": 1, "request": 128, "not_html": 6}),
        # README: 206 pages, 100 redirects (one of them is in the Wikipedia: namespace)
        ("enwiki-sample.xml.bz2", 106, {"redirect": 99, "not_article_namespace": 1}),
    ],
)
def test_sample_corpus_counts(corpora, name, n_docs, dropped):
    """Documents read and the reasons the rest were skipped add up to the corpus README's counts."""
    docs, stats, warnings = read(corpora / name)
    assert len(docs) == stats.docs_out == n_docs
    assert dict(stats.dropped) == dropped
    assert stats.docs_in == n_docs + sum(dropped.values())
    assert warnings == []


@pytest.mark.parametrize("name", ["iana.warc.gz", "handbook-multilingual.warc.gz"])
def test_warc_reads_exactly_the_html_200_responses(corpora, name):
    """The WARC reader yields the HTML responses with status 200 warcio finds, in file order, with
    the declared charset (lowercased) and undecoded payload."""
    docs, _, _ = read(corpora / name)
    expected = html_ok(warc_records(corpora / name))
    assert [d.url for d in docs] == [r.url for r in expected]
    assert all(d.format == "html" and isinstance(d.raw, bytes) and d.raw.lstrip().startswith(b"<") for d in docs)
    assert {d.meta["charset"] for d in docs} == {"utf-8"}


def test_wikipedia_reads_exactly_the_article_pages(corpora):
    """Article titles equal the namespace-0, non-redirect pages of the dump as ElementTree sees them."""
    with bz2.open(corpora / "enwiki-sample.xml.bz2") as f:
        pages = ET.parse(f).getroot().findall(f"{MW}page")
    expected = [p.findtext(f"{MW}title") for p in pages if p.findtext(f"{MW}ns") == "0" and p.find(f"{MW}redirect") is None]
    docs, _, _ = read(corpora / "enwiki-sample.xml.bz2")
    assert [d.meta["title"] for d in docs] == expected
    assert docs[0].url == "https://en.wikipedia.org/wiki/Anarchism" and docs[0].format == "wikitext"
    assert all(d.id.startswith("wiki-") and d.raw for d in docs)


# ----------------------------------------------------------------------------- bad input


def assert_one_warning(warnings, path, where):
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and where in warnings[0], warnings[0]


def test_warc_gz_with_corrupt_member_in_the_middle(corpora, tmp_path):
    """Zeroed bytes inside one HTML response's gzip member: that record is counted as malformed,
    named by its byte offset, and every other page is still read."""
    source = corpora / "handbook-multilingual.warc.gz"
    html = html_ok(warc_records(source))
    victim = html[len(html) // 2]
    data = bytearray(source.read_bytes())
    middle = victim.offset + victim.length // 2
    data[middle : middle + 64] = bytes(64)
    path = tmp_path / "corrupt.warc.gz"
    path.write_bytes(bytes(data))

    docs, stats, warnings = read(path)
    assert [d.url for d in docs] == [r.url for r in html if r is not victim]
    assert stats.dropped["malformed_record"] == 1
    assert_one_warning(warnings, path, f"at byte {victim.offset} ")


def test_warc_gz_truncated_in_last_member(corpora, tmp_path):
    """A download cut inside the last record loses that record only, with one warning at its offset."""
    source = corpora / "handbook-multilingual.warc.gz"
    records = warc_records(source)
    last = records[-1]
    path = tmp_path / "truncated.warc.gz"
    path.write_bytes(source.read_bytes()[: last.offset + last.length // 2])

    docs, stats, warnings = read(path)
    assert [d.url for d in docs] == [r.url for r in html_ok(records) if r.offset < last.offset]
    assert len(docs) == 121  # the last record is the second alias page, an HTML response
    assert stats.dropped["malformed_record"] == 1
    assert_one_warning(warnings, path, f"at byte {last.offset} ")


@pytest.fixture(scope="module")
def plain_warc(corpora):
    """The multilingual WARC decompressed, plus the plain-file offset of each record."""
    source = corpora / "handbook-multilingual.warc.gz"
    compressed = source.read_bytes()
    records, parts, offset = warc_records(source), [], 0
    offsets = []
    for rec in records:
        member = gzip.decompress(compressed[rec.offset : rec.offset + rec.length])
        offsets.append(offset)
        parts.append(member)
        offset += len(member)
    return b"".join(parts), records, offsets


def test_plain_warc_reads_like_gzipped(corpora, tmp_path, plain_warc):
    """An uncompressed .warc gives the same documents as the per-record gzipped original."""
    data, _, _ = plain_warc
    path = tmp_path / "plain.warc"
    path.write_bytes(data)
    docs, stats, warnings = read(path)
    original, _, _ = read(corpora / "handbook-multilingual.warc.gz")
    assert [(d.url, d.raw) for d in docs] == [(d.url, d.raw) for d in original]
    assert stats.dropped == {"warcinfo": 1, "request": 128, "not_html": 6} and warnings == []


@pytest.mark.parametrize(
    "old, new",
    [(b"WARC/1.0\r\n", b"WARX/1.0\r\n"), (b"\r\nContent-Length:", b"\r\nContent-Lenght:")],
    ids=["version-line", "content-length"],
)
def test_plain_warc_with_broken_header(tmp_path, plain_warc, old, new):
    """A response whose WARC header is broken is skipped with one warning at its byte offset;
    the reader finds the next record and reads on."""
    data, records, offsets = plain_warc
    html = html_ok(records)
    victim = html[len(html) // 2]
    start = offsets[records.index(victim)]
    header_end = data.index(b"\r\n\r\n", start)
    at = data.index(old, start, header_end)
    path = tmp_path / "broken.warc"
    path.write_bytes(data[:at] + new + data[at + len(old) :])

    docs, stats, warnings = read(path)
    assert [d.url for d in docs] == [r.url for r in html if r is not victim]
    assert stats.dropped["malformed_record"] == 1
    assert_one_warning(warnings, path, f"at byte {start} ")


@pytest.fixture(scope="module")
def enwiki_xml(corpora):
    with bz2.open(corpora / "enwiki-sample.xml.bz2", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize(
    "old, new",
    [("<revision>", "<revision>\n      <unclosed>"), ("</page>", "")],
    ids=["unclosed-tag", "missing-page-end"],
)
def test_wikipedia_dump_with_one_broken_page(tmp_path, enwiki_xml, old, new):
    """One page with broken XML is counted as malformed_page and named by number and title; the
    pages after it parse as usual."""
    start = enwiki_xml.index("<page>\n    <title>Albedo</title>")
    end = enwiki_xml.index("</page>", start) + len("</page>")
    page = enwiki_xml[start:end]
    number = enwiki_xml[:end].count("<page>")
    path = tmp_path / "broken.xml"
    path.write_text(enwiki_xml[:start] + page.replace(old, new, 1) + enwiki_xml[end:], encoding="utf-8")

    docs, stats, warnings = read(path)
    titles = [d.meta["title"] for d in docs]
    assert len(docs) == 105 and "Albedo" not in titles
    assert titles[:3] == ["Anarchism", "Autism", "A"] and titles[-1] == "Algorithm"
    assert stats.dropped["malformed_page"] == 1
    assert_one_warning(warnings, path, f"page {number} ('Albedo'")


BAD_LINES = {
    # kind: (line bytes, dropped reason, words of the warning)
    "non_utf8": (
        '{"text": "Es wurde keine Datei übertragen. Überprüfen Sie das Encoding des Formulars."}'.encode("latin-1"),
        "non_utf8",
        "not UTF-8",
    ),
    "malformed_json": (b'{"text": "The Rock is destined to be the 21st Century\'s new', "malformed_json", "not valid JSON"),
    "missing_text": (
        b'{"body": "The gorgeously elaborate continuation of The Lord of the Rings trilogy"}',
        "missing_text",
        "no string field 'text'",
    ),
}


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_jsonl_bad_line_is_skipped_with_line_number(tmp_path, reviews, kind, suffix):
    """A non-UTF-8, malformed or text-less line 3 is counted by reason, named as file:3, and the
    lines around it are read."""
    line, reason, words = BAD_LINES[kind]
    good = [json.dumps({"text": t}).encode() for t in reviews[:5]]
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(compress(b"\n".join(good[:2] + [line] + good[2:]) + b"\n", suffix))

    docs, stats, warnings = read(path)
    assert [d.text for d in docs] == reviews[:5]
    assert dict(stats.dropped) == {reason: 1}
    assert stats.docs_in == 6 and stats.docs_out == 5
    assert_one_warning(warnings, path, f"{path}:3: ")
    assert words in warnings[0]


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("empty.warc.gz", "warc"),
        ("empty.warc", "warc"),
        ("empty.jsonl", "jsonl"),
        ("empty.xml", "wikipedia"),
        ("empty.xml.bz2", "wikipedia"),
    ],
)
def test_empty_file_is_counted_and_named(tmp_path, name, fmt):
    """An empty input of a known kind yields nothing, counts empty_file and warns once naming it."""
    path = tmp_path / name
    path.touch()
    assert detect_format(path) == fmt
    docs, stats, warnings = read(path)
    assert docs == []
    assert dict(stats.dropped) == {"empty_file": 1}
    assert_one_warning(warnings, path, "empty file")


@pytest.mark.parametrize(
    "name, message", [("empty.parquet", "not a readable Parquet file"), ("empty.txt", "empty file of unknown format")]
)
def test_empty_file_without_a_reader_is_a_data_error(tmp_path, name, message):
    """An empty Parquet file cannot be opened and an empty unknown file has no reader: both name the file."""
    path = tmp_path / name
    path.touch()
    with pytest.raises(DataError, match=f"{name}: {message}"):
        read(path)
