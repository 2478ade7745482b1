"""The dataset summary `toxtune data` prints: counts, invalid rows by file line, and a length
that does not grow with the rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from toxmodel.data import load_table
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.summary import SHOW_INVALID, describe, summarize


def test_summarize_lists_invalid_and_counts(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles,A,B\nCCO,1,0\nC1CC,0,\n,1,1\nc1ccccc1,0,0\n"))
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    text = summarize(table, features)
    assert "rows: 4" in text
    assert "valid SMILES: 2" in text and "invalid SMILES: 2" in text
    assert "line 3: 'C1CC'" in text and "unclosed ring" in text  # header = line 1
    assert "line 4: ''" in text and "empty SMILES" in text
    summary = describe(table, features)
    a, b = summary.tasks
    assert (a.labelled, a.positives, a.negatives) == (4, 2, 2)
    assert (b.labelled, b.positives, b.negatives) == (3, 1, 2)
    assert a.positive_rate == pytest.approx(0.5)
    own = summarize(table)  # featurizes on its own (default config) when no features are given
    assert "invalid SMILES: 2" in own and "features per molecule: 2048" in own


def test_the_summary_quotes_a_bounded_number_of_invalid_rows(
    make_csv: Callable[..., Path],
) -> None:
    """10x the invalid rows: the same number of summary lines, the counts still exact."""
    texts = []
    for n_bad in (SHOW_INVALID + 10, 10 * (SHOW_INVALID + 10)):
        body = "".join(f"bad{i}(,{i % 2}\n" for i in range(n_bad)) + "CCO,1\nCCN,0\n"
        table = load_table(make_csv("smiles,A\n" + body, f"bad{n_bad}.csv"))
        summary = describe(table, featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1))
        assert summary.n_invalid == n_bad and len(summary.invalid) == SHOW_INVALID
        text = summary.format()
        assert f"invalid SMILES: {n_bad}" in text
        assert f"... and {n_bad - SHOW_INVALID} more (write them all with --invalid-report)" in text
        texts.append(text)
    assert len(texts[0].splitlines()) == len(texts[1].splitlines())
