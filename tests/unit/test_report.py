"""The job report's document summary: fixed-size per task, and the same sums whatever the task layout."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from data_tools.report import BUCKET_LIMITS, DocSummary


def summarise(docs) -> DocSummary:
    summary = DocSummary()
    summary.add((len(d.text) for d in docs), (len(d.text.split()) for d in docs), (d.lang for d in docs))
    return summary


@pytest.mark.parametrize("cuts", [[1], [40, 41, 100], list(range(1, 122, 7))])
def test_task_summaries_add_up_to_the_summary_of_all_documents(handbook_docs, cuts):
    """The 122 handbook pages summarised in one task or cut into many: the merged summary is identical, holds every
    document in the bucket of its length, and a task's summary has the same size whatever its number of documents."""
    for doc in handbook_docs:
        doc.lang = doc.url.split("/")[4]  # the locale in the handbook's URL
    whole = summarise(handbook_docs)
    merged = DocSummary()
    for part in np.split(np.array(handbook_docs, dtype=object), cuts):
        merged.merge(summarise(list(part)))
    assert asdict(merged) == asdict(whole)
    chars = np.array([len(d.text) for d in handbook_docs])
    assert whole.chars.num == len(handbook_docs) == sum(whole.langs.values()) and len(whole.langs) == 12
    assert whole.chars.sum == chars.sum() and whole.chars.sum_squares == int((chars.astype(object) ** 2).sum())
    assert (whole.chars.min, whole.chars.max) == (chars.min(), chars.max())
    at_most = np.cumsum(whole.chars.counts)
    for limit, count in zip(BUCKET_LIMITS, at_most):
        assert count == (chars <= limit).sum()
    assert len(summarise(handbook_docs[:1]).chars.counts) == len(whole.tokens.counts) == len(BUCKET_LIMITS)


def test_an_empty_task_merges_as_nothing(handbook_docs):
    whole = summarise(handbook_docs)
    again = DocSummary.from_dict(json.loads(json.dumps(asdict(whole))))
    again.merge(DocSummary())
    assert asdict(again) == asdict(whole)
