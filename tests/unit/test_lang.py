"""Language identification (fastText lid.176) on the 12 locales of the Debian handbook WARC,
`--langs` validation, and the LanguageFilter's keep list and threshold."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from data_tools.config import LangConfig
from data_tools.errors import DataError
from data_tools.lang import LanguageFilter, check_languages, identify

# lid.176 has no "nb": Norwegian Bokmål comes out as "no"
ACCEPTED = {"nb": {"nb", "no"}}
SCRIPTS = {  # locales not written in Latin script, and their letters
    "ar": re.compile(r"[\u0600-\u06ff]"),
    "ru": re.compile(r"[\u0400-\u04ff]"),
    "ja": re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]"),
    "zh": re.compile(r"[\u4e00-\u9fff]"),
}
ENGLISH_FUNCTION_WORDS = set("the and of to is a in for with that are this be on it as by or an can which".split())


def url_language(url):
    """"de" for https://debian-handbook.info/browse/de-DE/stable/..."""
    return re.search(r"/browse/([a-z]{2})-[A-Z]{2}/", url).group(1)


def english_density(text):
    words = re.findall(r"[^\W\d_]+", text.lower())
    return sum(w in ENGLISH_FUNCTION_WORDS for w in words) / max(1, len(words))


def written_in_locale(text, lang, english_floor):
    """Whether a page's text is in its URL's language rather than the English the handbook falls
    back to where a translation is missing: non-Latin locales by their script (a majority of the
    letters), Latin-script locales by English function words less frequent than on every en-US page."""
    if lang == "en":
        return True
    if lang in SCRIPTS:
        letters = [c for c in text if c.isalpha()]
        return len(SCRIPTS[lang].findall(text)) > len(letters) / 2
    return english_density(text) < english_floor


@pytest.fixture(scope="module")
def identified(_handbook_docs):
    """(url language, identified language, score, text) of every handbook page."""
    return [(url_language(d.url), *identify(d.text), d.text) for d in _handbook_docs]


def test_language_matches_url_locale(identified):
    """≥ 95% of the pages written in their locale's language are identified as it."""
    english_floor = min(english_density(text) for lang, _, _, text in identified if lang == "en")
    localized = [(lang, found) for lang, found, _, text in identified if written_in_locale(text, lang, english_floor)]
    assert len(localized) >= 60 and len({lang for lang, _ in localized}) == 12  # every locale takes part
    agree = sum(found in ACCEPTED.get(lang, {lang}) for lang, found in localized)
    misses = Counter((lang, found) for lang, found in localized if found not in ACCEPTED.get(lang, {lang}))
    assert agree / len(localized) >= 0.95, misses


def test_every_page_is_its_locale_or_english(identified):
    """Over all 122 pages, language ID answers the URL's language or English (untranslated
    handbook sections are served in English), and the URL's language for most of them."""
    assert len(identified) == 122
    found = [(lang, lid) for lang, lid, _, _ in identified]
    assert all(lid in ACCEPTED.get(lang, {lang}) | {"en"} for lang, lid in found), found
    assert sum(lid in ACCEPTED.get(lang, {lang}) for lang, lid in found) >= 0.75 * len(found)


def test_untranslated_page_is_english(_handbook_docs):
    """A page served under /ru-RU/ whose text is the English original is identified as English."""
    text = next(d.text for d in _handbook_docs if d.url.endswith("/ru-RU/stable/sect.grml.html"))
    assert text.startswith("A.6. Grml\n\nGrml is a live CD")
    lang, score = identify(text)
    assert lang == "en" and score > 0.9


@pytest.mark.parametrize("code", ["xx", "english"])
def test_check_languages_rejects_unknown_code(code):
    """An unknown `--langs` code is a DataError naming it."""
    with pytest.raises(DataError, match=f"--langs: unknown language code '{code}'"):
        check_languages(["de", code])


def test_check_languages_suggests_near_code():
    """A near miss is answered with the close lid.176 codes; known codes pass."""
    check_languages(["de", "fr", "no", "zh", "en"])
    with pytest.raises(DataError, match=r"did you mean .*\bde\b"):
        check_languages(["dee"])


def test_keep_list_drops_other_languages(handbook_docs):
    """With keep=[de, fr], German and French pages are kept, tagged and scored; the others are
    dropped as language_not_kept (or low_confidence below the threshold), nothing else."""
    step = LanguageFilter(LangConfig(keep=["de", "fr"]))
    kept = list(step(handbook_docs))
    assert {d.lang for d in kept} == {"de", "fr"}
    assert all(url_language(d.url) in ("de", "fr") for d in kept)
    assert len(kept) >= 18  # of the 20 de-DE and fr-FR pages
    expected = Counter(
        "low_confidence" if d.meta["lang_score"] < 0.5 else "language_not_kept"
        for d in handbook_docs
        if d.lang not in ("de", "fr") or d.meta["lang_score"] < 0.5
    )
    assert step.stats.dropped == expected and expected["language_not_kept"] >= 95
    assert step.stats.docs_in == 122 and step.stats.docs_out == len(kept)


@pytest.mark.parametrize("threshold, n_kept", [(0.5, 9), (0.9, 0)])
def test_threshold_drops_low_confidence(handbook_docs, threshold, n_kept):
    """Norwegian pages score 0.55–0.81 as "no" (one scores 0.42, as English): threshold 0.5 keeps 9
    of the 10 nb-NO pages, threshold 0.9 drops them all as low_confidence."""
    nb = [d for d in handbook_docs if "/nb-NO/" in d.url]
    step = LanguageFilter(LangConfig(keep=["no"], threshold=threshold))
    kept = list(step(nb))
    assert len(nb) == 10 and len(kept) == n_kept and all(d.lang == "no" for d in kept)
    assert step.stats.dropped == {"low_confidence": 10 - n_kept}
    assert all(d.meta["lang_score"] < threshold for d in nb if d not in kept)
