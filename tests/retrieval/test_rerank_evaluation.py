"""Two-stage retrieval (`retrieval.rerank_evaluation`, `sbert-flax eval --rerank-model`): the
bi-encoder's candidates reranked by a cross-encoder, scored as sentence-transformers'
`CrossEncoderRerankingEvaluator` scores the same candidates.

The reference is the evaluator itself, run on samples built from the same candidates (`query`,
`positive` = every relevant document, `documents` = the candidates in retrieval order,
`always_rerank_positives=False`) with the same cross-encoder scores: once with
sentence-transformers' CrossEncoder as the reranker on both sides, once with ours. The folder
has queries with one to three relevant documents, a judged non-relevant one and an unjudged
query; `rerank_top_k` 2 leaves relevant documents unretrieved and cuts MAP's list below some
queries' relevant count.
"""

from __future__ import annotations

import json

import cross_encoder_helpers as ceh
import helpers
import jax
import numpy as np
import pytest
from helpers import write_beir

from sbert_flax.cli import main as cli
from sbert_flax.inference.cross_encoder import CrossEncoder
from sbert_flax.inference.encoder import SentenceEncoder
from sbert_flax.retrieval.ir_evaluation import load_beir, rank_corpus
from sbert_flax.retrieval.rerank_evaluation import evaluate_reranking

st_ce = pytest.importorskip("sentence_transformers.cross_encoder")
st_eval = pytest.importorskip("sentence_transformers.cross_encoder.evaluation")


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    """36 documents (distinct texts), 10 queries with 1-3 relevant documents each."""
    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(helpers.random_zh_sentences(60, 3, 20, seed=3)))[:36]
    corpus = [(f"d{i}", "标题" if i % 9 == 0 else "", t) for i, t in enumerate(texts)]
    queries = [(f"q{i}", q) for i, q in enumerate(helpers.random_zh_sentences(10, 3, 12, seed=4))]
    qrels = []
    for i in range(10):
        for j in rng.choice(36, size=1 + i % 3, replace=False):
            qrels.append((f"q{i}", f"d{j}", 1))
    qrels.append(("q0", "d35", 0))  # judged non-relevant: not a positive
    queries.append(("q_unjudged", "没有相关文档的查询"))
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny", corpus, queries, qrels)


@pytest.fixture(scope="module")
def models(tiny_bert, tmp_path_factory, zh_vocab, one_device):
    bi = SentenceEncoder.from_pretrained(
        tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64, pooling="mean"),
        devices=one_device)
    ce_dir = ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp("ce")), num_labels=1,
                                             seed=5, max_position=64, vocab_file=zh_vocab)
    return bi, ce_dir


def _reference(folder, candidates, scorer, at_k=10) -> dict[str, float]:
    """sentence-transformers' evaluator on the candidates, reranked by `scorer`."""
    f = load_beir(folder)
    text = dict(zip(f.corpus_ids, f.corpus_texts(), strict=True))
    samples = [{"query": q, "positive": [text[c] for c in sorted(f.relevant[qid])],
                "documents": [text[c] for c in cands]}
               for qid, q, cands in zip(f.query_ids, f.query_texts, candidates, strict=True)]
    ev = st_eval.CrossEncoderRerankingEvaluator(
        samples, at_k=at_k, always_rerank_positives=False, write_csv=False)
    return ev(scorer)


def _assert_same(ours: dict, ref: dict, at_k=10) -> None:
    for m in (f"mrr@{at_k}", f"ndcg@{at_k}", "map"):
        assert ours[m] == pytest.approx(float(ref[m]), abs=1e-6), m
        assert ours[f"base_{m}"] == pytest.approx(float(ref[f"base_{m}"]), abs=1e-6), m


@pytest.mark.parametrize("top_k", [2, 20])
def test_metrics_equal_sentence_transformers_evaluator(beir, models, one_device, top_k):
    bi, ce_dir = models
    f = load_beir(beir)
    candidates = rank_corpus(bi, f, top_k)
    assert all(len(c) == top_k for c in candidates)
    relevant_missed = sum(len(f.relevant[q] - set(c))
                          for q, c in zip(f.query_ids, candidates, strict=True))
    if top_k == 2:
        assert relevant_missed > 0  # the first stage misses some: they count against the metrics

    # sentence-transformers' reranker on both sides.
    st_model = st_ce.CrossEncoder(ce_dir, device="cpu")
    ours = evaluate_reranking(bi, st_model, f, rerank_top_k=top_k)
    ref = _reference(beir, candidates, st_model)
    _assert_same(ours, ref)
    assert ours["queries"] == 10 and ours["rerank_top_k"] == top_k

    # Ours: the same metrics as the evaluator given our scores (ours match sentence-transformers'
    # to ~1e-7: tests/inference/test_cross_encoder.py).
    jax_ce = CrossEncoder(ce_dir, devices=one_device)
    mine = evaluate_reranking(bi, jax_ce, f, rerank_top_k=top_k)
    st_model.predict = lambda pairs, **kw: jax_ce.predict(pairs)
    _assert_same(mine, _reference(beir, candidates, st_model))
    # Reranking changed the order (the comparison is not of the retrieval order twice).
    assert any(mine[m] != mine[f"base_{m}"] for m in ("mrr@10", "ndcg@10", "map"))


def test_eval_cli_rerank_table_and_json(beir, models, tiny_bert, capsys):
    bi, ce_dir = models
    model = tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64,
                      pooling="mean")
    args = ["eval", "--model", model, "--retrieval", beir, "--rerank-model", ce_dir,
            "--rerank-top-k", "20"]
    assert cli.main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = out["rerank"]["tiny"]
    want = evaluate_reranking(SentenceEncoder.from_pretrained(model, devices=jax.devices()[:1]),
                              CrossEncoder(ce_dir, devices=jax.devices()[:1]), beir,
                              rerank_top_k=20)
    for m in ("mrr@10", "ndcg@10", "map", "base_mrr@10", "base_ndcg@10", "base_map"):
        assert got[m] == pytest.approx(want[m], abs=1e-6), m
    # The base order is the bi-encoder's: its ndcg@10 is the retrieval table's.
    assert got["base_ndcg@10"] == pytest.approx(out["retrieval"]["tiny"]["ndcg@10"], abs=1e-9)
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "base mrr@10" in table and table.strip().splitlines()[-1].startswith("tiny")
    assert cli.main(["eval", "--model", model, "--sts", beir, "--rerank-model", ce_dir]) == 2
    assert "--rerank-model" in capsys.readouterr().err
