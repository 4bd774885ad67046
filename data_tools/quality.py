"""Quality filters: Gopher repetition and quality rules (Rae et al. 2021) and C4 line rules
(Raffel et al. 2020), with datatrove's default thresholds. Each drop is named by its rule.

Word rules assume spaces between words; for languages written without them (`unspaced_langs`)
only the language-agnostic rules (line, paragraph and character based) apply.
"""

from __future__ import annotations

import re
from collections import Counter

from data_tools.config import C4Config, GopherQualityConfig, GopherRepetitionConfig
from data_tools.doc import Doc, Step

PARAGRAPHS = re.compile(r"\n{2,}")
LINES = re.compile(r"\n+")
PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”„‘’…·–—¡¿。、，！？：；（）「」『』【】")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
TERMINAL_PUNCT = (".", "?", "!", '"', "'", "。", "！", "？", "؟", "।", "」", "”")
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
SENTENCE_END = re.compile(r"[.!?。！？؟]+(?:\s|$)")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, characters in repeats) counting every occurrence after the first."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def _duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by n-grams seen before, skipping past each repeat (Gopher's definition)."""
    seen: set[tuple[str, ...]] = set()
    chars = idx = 0
    while idx < len(words) - n + 1:
        gram = tuple(words[idx : idx + n])
        if gram in seen:
            chars += sum(map(len, gram))
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return chars


class GopherRepetition(Step):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig) -> None:
        super().__init__()
        self.c = config

    def apply(self, doc: Doc) -> str | None:
        c, text = self.c, doc.text
        paragraphs = PARAGRAPHS.split(text.strip())
        dup, dup_chars = _duplicates(paragraphs)
        if dup / len(paragraphs) > c.max_dup_para_frac:
            return "dup_para_frac"
        if dup_chars / len(text) > c.max_dup_para_char_frac:
            return "dup_para_char_frac"
        lines = LINES.split(text)
        dup, dup_chars = _duplicates(lines)
        if dup / len(lines) > c.max_dup_line_frac:
            return "dup_line_frac"
        if dup_chars / len(text) > c.max_dup_line_char_frac:
            return "dup_line_char_frac"
        words = text.split()
        for n, limit in c.top_ngram_max_frac.items():
            grams = _ngrams(words, n)
            if grams:
                gram, count = Counter(grams).most_common(1)[0]
                if len(gram) * count / len(text) > limit:
                    return f"top_{n}_gram"
        for n, limit in c.dup_ngram_max_frac.items():
            if _duplicated_ngram_chars(words, n) / len(text) > limit:
                return f"dup_{n}_gram"
        return None


class GopherQuality(Step):
    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig) -> None:
        super().__init__()
        self.c = config
        self.unspaced = set(config.unspaced_langs)

    def apply(self, doc: Doc) -> str | None:
        c, text = self.c, doc.text
        lines = text.splitlines() or [""]
        if sum(line.lstrip().startswith(("•", "-", "*")) for line in lines) / len(lines) > c.max_bullet_lines_ratio:
            return "too_many_bullet_lines"
        if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return "too_many_ellipsis_lines"
        if doc.lang in self.unspaced:
            return None
        words = text.split()
        if not words:
            return "too_few_words"
        content_words = [w for w in words if any(ch not in PUNCTUATION for ch in w)]
        if len(content_words) < c.min_words:
            return "too_few_words"
        if len(content_words) > c.max_words:
            return "too_many_words"
        mean_length = sum(map(len, content_words)) / len(content_words)
        if mean_length < c.min_mean_word_length:
            return "mean_word_length_too_short"
        if mean_length > c.max_mean_word_length:
            return "mean_word_length_too_long"
        if text.count("#") / len(words) > c.max_symbol_word_ratio:
            return "too_many_hashes"
        if (text.count("...") + text.count("…")) / len(words) > c.max_symbol_word_ratio:
            return "too_many_ellipses"
        if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < c.min_alpha_words_ratio:
            return "too_few_alphabetic_words"
        if doc.lang == "en" and sum(w.lower() in STOP_WORDS for w in words) < c.min_stop_words:
            return "too_few_stop_words"
        return None


class C4Lines(Step):
    """Keeps lines that look like prose; drops the document if too few sentences remain."""

    name = "c4"

    def __init__(self, config: C4Config, unspaced_langs: list[str]) -> None:
        super().__init__()
        self.c = config
        self.unspaced = set(unspaced_langs)

    def apply(self, doc: Doc) -> str | None:
        c = self.c
        spaced = doc.lang not in self.unspaced
        kept, sentences = [], 0
        for line in doc.text.splitlines():
            line = CITATION.sub("", line.strip())
            words = line.split()
            if not words:
                continue
            lower = line.lower()
            if c.drop_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if c.drop_curly_bracket_docs and "{" in line:
                return "curly_bracket"
            if (
                any(len(w) > c.max_word_length for w in words)
                or (c.require_terminal_punct and (not line.endswith(TERMINAL_PUNCT) or line.endswith("...")))
                or (spaced and len(words) < c.min_words_per_line)
                or (c.drop_javascript_lines and "javascript" in lower)
                or (c.drop_policy_lines and any(p in lower for p in POLICY))
            ):
                self.stats.events["lines_dropped"] += 1
                continue
            sentences += max(1, len(SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < c.min_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept)
        return None
