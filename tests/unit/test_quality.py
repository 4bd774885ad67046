"""Quality filters: every Gopher repetition / quality rule and the C4 line rules fire with their
named reason on inputs built from real article text; real Wikipedia articles mostly pass."""

from __future__ import annotations

import pytest

from data_tools.config import C4Config, GopherQualityConfig, GopherRepetitionConfig
from data_tools.quality import STOP_WORDS, C4Lines, GopherQuality, GopherRepetition

UNSPACED = GopherQualityConfig().unspaced_langs


@pytest.fixture(scope="module")
def albedo(article):
    """Words and single-line paragraphs of the real 'Albedo' article."""
    text = article("Albedo")
    paragraphs = [p for p in text.split("\n\n") if len(p.split()) >= 5 and "\n" not in p]
    return text.split(), paragraphs


def chunks(words, size, count, phrase):
    """`count` consecutive chunks of `size` real words, each followed by `phrase`, on one line."""
    return " ".join(" ".join(words[i * size : (i + 1) * size]) + " " + phrase for i in range(count))


def long_and_shorts(paragraphs):
    ordered = sorted(paragraphs, key=len)
    return ordered[-1], ordered[:8]


def repetition_input(rule, words, paragraphs):
    long, shorts = long_and_shorts(paragraphs)
    if rule == "dup_para_frac":  # half the paragraphs are a repeat
        return "\n\n".join([paragraphs[0], paragraphs[1], paragraphs[0], paragraphs[0]])
    if rule == "dup_para_char_frac":  # 1 repeat in 10 paragraphs, but a long one
        return "\n\n".join([long, *shorts[:4], long, *shorts[4:]])
    if rule == "dup_line_frac":  # one paragraph of lines, half of them repeats
        return "\n".join([paragraphs[0], paragraphs[1], paragraphs[0], paragraphs[0]])
    if rule == "dup_line_char_frac":
        return "\n".join([long, *shorts[:4], long, *shorts[4:]])
    if rule == "top_2_gram":
        return chunks(words, 3, 60, "of the")
    if rule == "top_3_gram":
        return chunks(words, 5, 60, "one of the")
    if rule == "top_4_gram":
        return chunks(words, 10, 60, "in the middle of")
    if rule == "dup_5_gram":  # one 40-word passage said twice inside a single line
        return " ".join(words[:40] + words[100:140] + words[:40] + words[200:240])
    raise ValueError(rule)


REPETITION_RULES = [
    "dup_para_frac",
    "dup_para_char_frac",
    "dup_line_frac",
    "dup_line_char_frac",
    "top_2_gram",
    "top_3_gram",
    "top_4_gram",
    "dup_5_gram",
]


@pytest.mark.parametrize("rule", REPETITION_RULES)
def test_gopher_repetition_rule_fires(run_step, albedo, rule):
    """Real text repeated the way a rule measures is dropped with that rule's name."""
    kept, stats = run_step(GopherRepetition(GopherRepetitionConfig()), [repetition_input(rule, *albedo)])
    assert kept == [] and stats.dropped == {rule: 1}


def test_gopher_repetition_keeps_the_same_text_unrepeated(run_step, albedo):
    """The paragraphs those inputs are built from pass when each appears once."""
    words, paragraphs = albedo
    texts = ["\n\n".join(paragraphs[:8]), " ".join(words[:400])]
    kept, stats = run_step(GopherRepetition(GopherRepetitionConfig()), texts)
    assert len(kept) == 2 and not stats.dropped


def quality_input(rule, words, article):
    content = [w for w in words if any(c.isalnum() for c in w)]
    if rule == "too_many_bullet_lines":
        return "\n".join("- " + " ".join(content[i : i + 8]) for i in range(0, 400, 8))
    if rule == "too_many_ellipsis_lines":
        return "\n".join(" ".join(content[i : i + 8]) + ("..." if i % 16 == 0 else ".") for i in range(0, 400, 8))
    if rule == "too_few_words":
        return " ".join(content[:30])
    if rule == "too_many_words":
        titles = ["Abraham Lincoln", "Albert Einstein", "Algeria", "Afghanistan", "Alabama", "Aristotle"]
        titles += ["Anarchism", "Autism", "Alchemy", "Achilles", "Alaska", "Abortion"]
        return " ".join(map(article, titles))
    if rule == "mean_word_length_too_short":
        return " ".join(w for w in content if len(w) <= 3)
    if rule == "mean_word_length_too_long":
        return " ".join(w for w in content if len(w) >= 11)
    if rule == "too_many_hashes":
        return " ".join("#" + w if i % 5 == 0 else w for i, w in enumerate(content[:300]))
    if rule == "too_many_ellipses":  # "..." inside lines, the lines themselves end with "."
        return " ".join(w + "..." if i % 5 == 0 else w for i, w in enumerate(content[:300])) + "."
    if rule == "too_few_alphabetic_words":
        return " ".join(f"{w} {1950 + i}" for i, w in enumerate(content[:150]))
    if rule == "too_few_stop_words":
        return " ".join(w for w in content[:600] if w.lower() not in STOP_WORDS)
    raise ValueError(rule)


QUALITY_RULES = [
    "too_many_bullet_lines",
    "too_many_ellipsis_lines",
    "too_few_words",
    "too_many_words",
    "mean_word_length_too_short",
    "mean_word_length_too_long",
    "too_many_hashes",
    "too_many_ellipses",
    "too_few_alphabetic_words",
    "too_few_stop_words",
]


@pytest.mark.parametrize("rule", QUALITY_RULES)
def test_gopher_quality_rule_fires(run_step, albedo, article, rule):
    """Real words arranged to break one Gopher quality rule are dropped with its name."""
    kept, stats = run_step(GopherQuality(GopherQualityConfig()), [quality_input(rule, albedo[0], article)])
    assert kept == [] and stats.dropped == {rule: 1}


def test_stop_word_rule_is_english_only(run_step, albedo, article):
    """Text without English stop words is dropped when tagged English, kept when tagged German."""
    text = quality_input("too_few_stop_words", albedo[0], article)
    assert run_step(GopherQuality(GopherQualityConfig()), [text], lang="en")[1].dropped == {"too_few_stop_words": 1}
    assert len(run_step(GopherQuality(GopherQualityConfig()), [text], lang="de")[0]) == 1


@pytest.mark.parametrize("lang, reason", [("ja", None), ("", "mean_word_length_too_long")])
def test_word_rules_skip_unspaced_languages(run_step, _handbook_docs, lang, reason):
    """A real Japanese page reads as a few very long space-separated words: word rules drop it
    unless it is tagged ja."""
    text = next(d.text for d in _handbook_docs if d.url.endswith("/ja-JP/stable/sect.automatic-upgrades.html"))
    kept, stats = run_step(GopherQuality(GopherQualityConfig(unspaced_langs=UNSPACED)), [text], lang=lang)
    assert dict(stats.dropped) == ({reason: 1} if reason else {})


# ----------------------------------------------------------------------------- C4

PROSE = [
    "Albedo is the measure of the diffuse reflection of solar radiation out of the total solar radiation received "
    "by an astronomical body.",
    "It is dimensionless and measured on a scale from 0 to 1.",
    "Surface albedo is defined as the ratio of radiosity to the irradiance received by a surface.",
    "The proportion reflected is not only determined by properties of the surface itself, but also by the spectral "
    "and angular distribution of solar radiation reaching the Earth's surface.",
    "These factors vary with atmospheric composition, geographic location and time.",
]
NOT_PROSE = [
    "Terrestrial albedo",  # no terminal punctuation
    "Albedo of snow and ice",  # heading
    "Earth's average surface albedo is about 0.3 and",  # cut off mid sentence
    "It is.",  # fewer than 3 words
    "Please enable JavaScript to see the albedo map.",
    "By using this site you agree to the Terms of Use and Privacy Policy.",
    "Albedo values vary widely between surfaces...",  # trailing ellipsis
]


def test_c4_keeps_prose_lines_and_drops_the_rest(run_step):
    """Lines without terminal punctuation, too short, about JavaScript or policies, or ending in an
    ellipsis are removed (counted as lines_dropped); prose lines are kept, citation marks stripped."""
    lines = [PROSE[0] + "[1]", NOT_PROSE[0], PROSE[1], NOT_PROSE[1], PROSE[2] + "[citation needed]"]
    lines += [NOT_PROSE[2], PROSE[3], *NOT_PROSE[3:], PROSE[4] + "[12]"]
    kept, stats = run_step(C4Lines(C4Config(), UNSPACED), ["\n".join(lines)])
    assert len(kept) == 1 and kept[0].text == "\n".join(PROSE)
    assert stats.events == {"lines_dropped": len(NOT_PROSE)}


def test_c4_drops_line_with_overlong_word(run_step):
    """A line holding a word longer than max_word_length is removed."""
    lines = [*PROSE, "The albedo of " + "x" * 1001 + " was measured."]
    kept, stats = run_step(C4Lines(C4Config(), UNSPACED), ["\n".join(lines)])
    assert kept[0].text == "\n".join(PROSE) and stats.events == {"lines_dropped": 1}


@pytest.mark.parametrize(
    "lines, config, reason",
    [
        ([*PROSE, "Lorem ipsum dolor sit amet, consectetur adipiscing elit."], C4Config(), "lorem_ipsum"),
        (PROSE[:4], C4Config(), "too_few_sentences"),
        ([*PROSE[:3], "Terrestrial albedo", "Albedo of snow and ice"], C4Config(), "too_few_sentences"),
        ([*PROSE, "The albedo function is f(x) = {0.3 if cloudy}."], C4Config(drop_curly_bracket_docs=True), "curly_bracket"),
    ],
    ids=["lorem-ipsum", "four-sentences", "headings-do-not-count", "curly-bracket"],
)
def test_c4_document_rules(run_step, lines, config, reason):
    """Lorem ipsum, fewer than 5 prose sentences and (when enabled) curly brackets drop the document."""
    kept, stats = run_step(C4Lines(config, UNSPACED), ["\n".join(lines)])
    assert kept == [] and stats.dropped == {reason: 1}


def test_c4_curly_brackets_allowed_by_default(run_step):
    """Technical prose with braces is kept unless drop_curly_bracket_docs is on."""
    kept, _ = run_step(C4Lines(C4Config(), UNSPACED), ["\n".join([*PROSE, "The albedo function is f(x) = {0.3 if cloudy}."])])
    assert len(kept) == 1


def test_c4_counts_sentences_within_lines(run_step):
    """One line of five sentences is enough for min_sentences=5."""
    kept, _ = run_step(C4Lines(C4Config(), UNSPACED), [" ".join(PROSE)])
    assert len(kept) == 1


# ----------------------------------------------------------------------------- real articles


@pytest.mark.parametrize(
    "make_step",
    [
        lambda: GopherRepetition(GopherRepetitionConfig()),
        lambda: GopherQuality(GopherQualityConfig()),
        lambda: C4Lines(C4Config(), UNSPACED),
    ],
    ids=["gopher_repetition", "gopher_quality", "c4"],
)
def test_real_articles_mostly_pass(enwiki_docs, make_step):
    """At least 90% of the 106 real Wikipedia articles pass each filter."""
    for doc in enwiki_docs:
        doc.lang = "en"
    step = make_step()
    kept = list(step(enwiki_docs))
    assert len(kept) >= 0.9 * 106, step.stats.dropped
