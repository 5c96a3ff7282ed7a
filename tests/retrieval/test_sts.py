"""sbert_flax.retrieval.sts: correlations against scipy, the STS reader, and evaluate_sts end to end."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from sbert_flax.common.devdata import data_path
from sbert_flax.retrieval import sts as evaluation


@pytest.mark.parametrize("seed", range(4))
def test_spearman_and_pearson_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    if seed % 2:  # heavy ties, like integer STS gold scores
        x, y = np.round(x), rng.integers(0, 6, size=200).astype(float)
    assert evaluation.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert evaluation.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_rankdata_averages_ties_like_scipy():
    x = [3.0, 1.0, 3.0, 2.0, 3.0, 1.0]
    np.testing.assert_array_equal(evaluation.rankdata(x), scipy.stats.rankdata(x))


def test_correlation_edge_cases():
    assert evaluation.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert evaluation.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(evaluation.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="different lengths"):
        evaluation.pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.spearman([1], [1])
    with pytest.raises(ValueError, match="finite"):
        evaluation.pearson([1, np.nan, 3], [1, 2, 3])


def test_read_sts(tmp_path):
    p = tmp_path / "sts.tsv"
    p.write_text("\ufeff句子一\t句子二\t4\r\n\nA\tB\t0.5\n", encoding="utf-8")
    s1, s2, scores = evaluation.read_sts(str(p))
    assert s1 == ["句子一", "A"] and s2 == ["句子二", "B"]
    np.testing.assert_array_equal(scores, [4.0, 0.5])
    p.write_text("text_a\ttext_b\tlabel\nA\tB\t1\n", encoding="utf-8")
    assert evaluation.read_sts(str(p))[0] == ["A"]  # header skipped


@pytest.mark.parametrize("body, line, problem", [
    ("a\tb\t1\na\tb\n", 2, "expected 3 tab-separated fields"),
    ("a\tb\t1\na\tb\t1\tx\n", 2, "got 4"),
    ("a\tb\t1\n\na\tb\thigh\n", 3, "'high' is not a number"),
    ("a\tb\tnan\n", 1, "not finite"),
])
def test_read_sts_malformed_line_names_file_and_line(tmp_path, body, line, problem):
    p = tmp_path / "bad.tsv"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.tsv:{line}: .*{problem}"):
        evaluation.read_sts(str(p))


def test_read_sts_bad_utf8_and_empty(tmp_path):
    p = tmp_path / "latin.tsv"
    p.write_bytes(b"a\tb\t1\n\xe9t\xe9\tb\t2\n")
    with pytest.raises(ValueError, match="latin.tsv:2: not valid UTF-8"):
        evaluation.read_sts(str(p))
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no sentence pairs"):
        evaluation.read_sts(str(p))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        evaluation.read_sts(str(tmp_path / "missing.tsv"))


class _BagOfCharsEncoder:
    """A stand-in encoder (character counts), enough to check evaluate_* wiring."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, sentences, batch_size=64):
        self.calls.append(list(sentences))
        emb = np.zeros((len(sentences), 64))
        for i, s in enumerate(sentences):
            for c in s:
                emb[i, ord(c) % 64] += 1
        return emb


def test_evaluate_sts_matches_direct_computation(tmp_path):
    pairs = [("abc", "abd", 4), ("abc", "xyz", 0), ("aaa", "aab", 3), ("xyz", "xyw", 2)]
    p = tmp_path / "sts.tsv"
    p.write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs), encoding="utf-8")
    enc = _BagOfCharsEncoder()
    r = evaluation.evaluate_sts(enc, str(p), batch_size=2)
    assert enc.calls == [["abc", "aaa", "xyz", "abd", "aab", "xyw"]]  # each sentence once
    e = enc.encode([a for a, _, _ in pairs]), enc.encode([b for _, b, _ in pairs])
    cos = np.sum(e[0] * e[1], 1) / np.linalg.norm(e[0], axis=1) / np.linalg.norm(e[1], axis=1)
    gold = [s for _, _, s in pairs]
    assert r["pairs"] == 4
    assert r["spearman"] == pytest.approx(scipy.stats.spearmanr(cos, gold).statistic)
    assert r["pearson"] == pytest.approx(scipy.stats.pearsonr(cos, gold).statistic)


def test_read_sts_on_stsb_zh_test():
    path = data_path("stsb-zh", "test.tsv")
    if path is None:
        pytest.skip("shared data stsb-zh/test.tsv is absent")
    s1, s2, scores = evaluation.read_sts(path)
    assert len(s1) == len(s2) == len(scores) == 1361
    assert scores.min() >= 0 and scores.max() <= 5
