"""Pipeline configuration: a dataclass tree loaded from YAML with strict key and type checks.

Every threshold the steps use lives here, so a job's `plan.json` records exactly what produced
its shards. Defaults follow the published rules (Gopher, C4) and datatrove's defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.common import ConfigError, from_dict, read_yaml


@dataclass
class ExtractConfig:
    main_content: bool = True  # resiliparse: drop navigation, headers, footers
    min_chars: int = 1  # documents shorter than this after extraction are dropped as "empty"


@dataclass
class LangConfig:
    keep: list[str] = field(default_factory=list)  # empty: keep every language
    threshold: float = 0.5  # minimum lid.176 probability of the top label


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2  # applied to English only: the rule's stop words are English
    # Languages written without spaces between words: word-based rules cannot apply to them.
    unspaced_langs: list[str] = field(default_factory=lambda: ["ja", "zh", "th", "lo", "km", "my", "bo"])


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    top_ngram_max_frac: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_ngram_max_frac: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


@dataclass
class C4Config:
    enabled: bool = True
    min_words_per_line: int = 3
    max_word_length: int = 1000
    require_terminal_punct: bool = True
    min_sentences: int = 5
    drop_lorem_ipsum: bool = True
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    drop_curly_bracket_docs: bool = False  # C4 drops code-like pages; off: technical prose has braces


@dataclass
class QualityConfig:
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)


@dataclass
class PIIConfig:
    enabled: bool = True
    email: bool = True
    ip: bool = True
    phone: bool = True


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # word shingles
    # 37 bands × 3 rows = 111 permutations: a pair with Jaccard 0.5 shares a band with probability 0.993, one at 0.7
    # with 0.99999997 (28 × 4: 0.84 and 0.9995; 14 × 8: 0.05 and 0.56); the check below removes chance collisions.
    bands: int = 37
    rows_per_band: int = 3
    seed: int = 1
    # A candidate pair is a duplicate if its estimated Jaccard similarity is at least this. LSH finds nearly every
    # pair above the S-curve's midpoint (1/37)^(1/3) = 0.30; this check sets the real cut, 0.4, low enough to keep
    # near copies of true Jaccard 0.5 estimated 2 sd low from 111 values (README, "Memory and dedup").
    threshold: float = 0.4
    buckets_per_band: int = 4  # hash ranges per band: bucket tasks = (bands + 1) × this; memory per task ∝ docs / this
    # Only documents of the same detected language can be near duplicates: translations of a page that share its
    # code listings and command lines are kept (exact duplicates are found whatever the language).
    same_language: bool = True
    # extract tasks whose duplicate pairs the cluster stage holds at once (one shard of its connected components):
    # its memory ∝ this × --task-mb, whatever the corpus; fewer shards need fewer rounds of label exchange
    tasks_per_cluster_shard: int = 256

    def __post_init__(self) -> None:
        for key in ("bands", "rows_per_band", "ngram", "buckets_per_band", "tasks_per_cluster_shard"):
            _at_least_one("dedup", key, getattr(self, key))
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"dedup.threshold {self.threshold}: must be in (0, 1], the least estimated Jaccard of a duplicate")


@dataclass
class PackConfig:
    seed: int = 0
    shuffle_window: int = 8192  # rows shuffled together; larger mixes more and costs memory
    rows_per_shard: int = 8192
    rows_per_sample: int = 256  # rows per `.npy` block inside a shard
    shuffle_chunk: int = 1024  # rows kept together by the first, corpus-wide shuffle level (then windows mix chunks)

    def __post_init__(self) -> None:
        for key in ("shuffle_window", "rows_per_shard", "rows_per_sample", "shuffle_chunk"):
            _at_least_one("pack", key, getattr(self, key))


def _at_least_one(section: str, key: str, value: int) -> None:
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"{section}.{key} {value}: must be at least 1")


@dataclass
class PipelineConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    lang: LangConfig = field(default_factory=LangConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> PipelineConfig:
        if path is None:
            return cls()
        return from_dict(cls, read_yaml(path), where=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

