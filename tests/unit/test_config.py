"""Pipeline configuration: strict keys and types with errors naming the dotted key, YAML loading,
and the JSON round trip plan.json relies on (integer dict keys come back as strings)."""

from __future__ import annotations

import json

import pytest

from data_tools.common import ConfigError
from data_tools.config import DedupConfig, GopherRepetitionConfig, PipelineConfig, from_dict


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"dedup": {"band": 10}}, "dedup.band", "did you mean 'dedup.bands'?"),
        (
            {"quality": {"gopher_quality": {"min_word": 10}}},
            "quality.gopher_quality.min_word",
            "did you mean 'quality.gopher_quality.min_words'?",
        ),
        ({"quality": {"gopher_qualty": {}}}, "quality.gopher_qualty", "did you mean 'quality.gopher_quality'?"),
        ({"quality": {"c5": {}}}, "quality.c5", "valid keys: gopher_repetition, gopher_quality, c4"),
        ({"langs": {"keep": ["de"]}}, "langs", "did you mean 'lang'?"),
        ({"pii": {"credit_cards": True}}, "pii.credit_cards", "valid keys: enabled, email, ip, phone"),
    ],
)
def test_unknown_key_names_dotted_key_and_nearest(data, key, hint):
    """An unknown key is a ConfigError naming its dotted path and the nearest valid key (or all of them)."""
    with pytest.raises(ConfigError) as err:
        from_dict(PipelineConfig, data, where="job.yaml")
    assert str(err.value) == f"job.yaml: unknown key '{key}'; {hint}"


@pytest.mark.parametrize(
    "data, key, expected_type",
    [
        ({"dedup": {"bands": "14"}}, "dedup.bands", "int"),
        ({"dedup": {"bands": True}}, "dedup.bands", "int"),
        ({"lang": {"threshold": "high"}}, "lang.threshold", "float"),
        ({"lang": {"keep": "de"}}, "lang.keep", "list"),
        ({"lang": {"keep": ["de", 7]}}, "lang.keep", "str"),
        ({"pii": {"email": "yes"}}, "pii.email", "bool"),
        (
            {"quality": {"gopher_repetition": {"top_ngram_max_frac": {"2": "a lot"}}}},
            "quality.gopher_repetition.top_ngram_max_frac",
            "float",
        ),
    ],
)
def test_wrong_type_names_the_key(data, key, expected_type):
    """A value of the wrong type (bools are not ints) is a ConfigError naming the key and the type."""
    with pytest.raises(ConfigError, match=f"job.yaml: '{key}' must be {expected_type}, got "):
        from_dict(PipelineConfig, data, where="job.yaml")


def test_section_must_be_a_mapping():
    """A section given as a scalar names the section."""
    with pytest.raises(ConfigError, match="job.yaml: 'quality.c4' must be a mapping"):
        from_dict(PipelineConfig, {"quality": {"c4": 3}}, where="job.yaml")


def test_values_are_applied_and_ints_widen_to_float():
    """Given values replace defaults (an int where a float is expected becomes that float); the rest keep theirs."""
    config = from_dict(PipelineConfig, {"lang": {"threshold": 1, "keep": ["de"]}, "dedup": {"bands": 20}}, where="job.yaml")
    assert config.lang.threshold == 1.0 and isinstance(config.lang.threshold, float) and config.lang.keep == ["de"]
    assert config.dedup == DedupConfig(bands=20)
    assert config.quality == PipelineConfig().quality


def test_int_dict_keys_from_json_strings():
    """JSON turns the n-gram keys of the repetition thresholds into strings; they come back as ints."""
    custom = PipelineConfig()
    custom.quality.gopher_repetition.top_ngram_max_frac = {2: 0.25, 3: 0.2}
    data = json.loads(json.dumps(custom.to_dict()))
    assert data["quality"]["gopher_repetition"]["top_ngram_max_frac"] == {"2": 0.25, "3": 0.2}
    config = from_dict(PipelineConfig, data, where="plan.json")
    assert config.quality.gopher_repetition.top_ngram_max_frac == {2: 0.25, 3: 0.2}
    assert config == custom
    assert from_dict(PipelineConfig, json.loads(json.dumps(PipelineConfig().to_dict())), where="plan.json") == PipelineConfig()
    assert GopherRepetitionConfig().dup_ngram_max_frac.keys() == config.quality.gopher_repetition.dup_ngram_max_frac.keys()


def test_from_yaml(tmp_path):
    """A YAML file loads with its values; None gives the defaults; an empty file gives the defaults."""
    path = tmp_path / "job.yaml"
    path.write_text("lang:\n  keep: [de, fr]\nquality:\n  c4:\n    enabled: false\n")
    config = PipelineConfig.from_yaml(path)
    assert config.lang.keep == ["de", "fr"] and config.quality.c4.enabled is False
    assert PipelineConfig.from_yaml(None) == PipelineConfig()
    path.write_text("")
    assert PipelineConfig.from_yaml(path) == PipelineConfig()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read (No such file or directory)"),
        ("lang: [unclosed\n", "not valid YAML"),
        ("dedup:\n  ngrams: 5\n", "unknown key 'dedup.ngrams'; did you mean 'dedup.ngram'?"),
        ("- a list\n", "expected a mapping of sections at the top level"),
    ],
    ids=["missing", "bad-yaml", "unknown-key", "not-a-mapping"],
)
def test_from_yaml_errors_name_the_file(tmp_path, content, message):
    """YAML problems are ConfigErrors that start with the config file's path."""
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_yaml(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_example_pipeline_yaml_lists_the_defaults(corpora):
    """examples/pipeline.yaml documents every key with its default: keep it true."""
    from data_tools.config import PipelineConfig

    assert PipelineConfig.from_yaml(corpora.parent / "pipeline.yaml") == PipelineConfig()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dedup": {"buckets_per_band": 0}}, "dedup.buckets_per_band 0: must be at least 1"),
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold 1.5: must be in (0, 1]"),
        ({"pack": {"shuffle_chunk": 0}}, "pack.shuffle_chunk 0: must be at least 1"),
    ],
)
def test_out_of_range_values_name_the_file_and_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(PipelineConfig, data, where="job.yaml")
    assert str(err.value).startswith(f"job.yaml: {message}") and "\n" not in str(err.value)
