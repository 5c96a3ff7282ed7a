"""Retrieval evaluation on BEIR folders (sbert_flax.retrieval.ir_evaluation) and `sbert-flax eval --retrieval`.

The reference is sentence-transformers' InformationRetrievalEvaluator, fed the same embeddings
(m3e-small's, computed once here) on a folder built from nli-zh dev: premises of entailment
pairs are the queries, every hypothesis a document.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from helpers import write_beir

from sbert_flax.cli import main as cli
from sbert_flax.retrieval.ir_evaluation import (
    ACCURACY_AT_K,
    MAP_AT_K,
    MRR_AT_K,
    NDCG_AT_K,
    PRECISION_RECALL_AT_K,
    SUMMARY_METRICS,
    evaluate_retrieval,
    load_beir,
    load_dev_beir,
)

ROWS = 900  # nli-zh dev rows used: ~300 queries, 900 documents


def build_nli_beir(root, rows: int):
    """(folder, corpus, queries, qrels) built from the first `rows` rows of nli-zh dev."""
    from sbert_flax.common.devdata import data_path

    p = data_path("nli-zh", "dev.tsv")
    if p is None:
        pytest.skip("shared/data/nli-zh/dev.tsv is absent")
    with open(p, encoding="utf-8") as f:
        lines = [line.rstrip("\n").split("\t") for line in f][1:rows + 1]
    # Ids "d0".."d899" sort as strings ("d10" < "d2"), so ties (duplicate hypotheses) are broken
    # by id order, not file order, as sentence-transformers does. Some documents get a title.
    corpus = [(f"d{i}", "标题" if i % 7 == 0 else "", b) for i, (_, b, _) in enumerate(lines)]
    qid: dict[str, str] = {}
    qrels = []
    for i, (a, _, label) in enumerate(lines):
        if label == "0":
            q = qid.setdefault(a, f"q{len(qid)}")
            qrels.append((q, f"d{i}", 1))
        elif label == "1" and a in qid:
            qrels.append((qid[a], f"d{i}", 0))  # judged non-relevant: must not count
    queries = [(q, a) for a, q in qid.items()]
    queries.append(("q_unjudged", "这个查询没有相关文档"))  # left out, as sentence-transformers
    folder = write_beir(root / "nli-zh-dev", corpus, queries, qrels)
    return folder, corpus, queries, qrels


@pytest.fixture(scope="module")
def nli_beir(tmp_path_factory):
    return build_nli_beir(tmp_path_factory.mktemp("beir"), ROWS)


class TableEncoder:
    """Serves precomputed embeddings by text, so both evaluators see the very same vectors."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.chunks = 0

    def encode(self, texts, batch_size=None, **kw) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])

    def encode_chunks(self, texts, chunk_size=100_000, batch_size=None, **kw):
        texts = list(texts)
        for s in range(0, len(texts), chunk_size):
            self.chunks += 1
            yield np.arange(s, min(s + chunk_size, len(texts))), self.encode(texts[s:s + chunk_size])


@pytest.fixture(scope="module")
def m3e_table(m3e_dir, nli_beir, one_device) -> dict[str, np.ndarray]:
    from sbert_flax import SentenceEncoder

    _, corpus, queries, _ = nli_beir
    texts = list(dict.fromkeys([*(x for _, x in queries),
                                *((t + " " + x).strip() for _, t, x in corpus)]))
    enc = SentenceEncoder.from_pretrained(m3e_dir, devices=one_device)
    return dict(zip(texts, enc.encode(texts), strict=True))


def test_matches_sentence_transformers_on_same_embeddings(nli_beir, m3e_table):
    torch = pytest.importorskip("torch")
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.util import cos_sim

    folder, corpus, queries, qrels = nli_beir
    enc = TableEncoder(m3e_table)
    # Three corpus chunks: the running top-k merge is exercised.
    ours = evaluate_retrieval(enc, folder, corpus_chunk_size=400)
    assert enc.chunks == 3

    # sentence-transformers' side, built from the raw lists rather than our loader.
    st_corpus = {c: (t + " " + x).strip() for c, t, x in corpus}
    relevant: dict[str, set[str]] = {}
    for q, c, s in qrels:
        if s > 0:
            relevant.setdefault(q, set()).add(c)

    class Model:
        def encode_query(self, texts, **kw):
            return torch.from_numpy(enc.encode(texts))

    ev = InformationRetrievalEvaluator(
        dict(queries), st_corpus, relevant, corpus_chunk_size=500,
        accuracy_at_k=list(ACCURACY_AT_K), precision_recall_at_k=list(PRECISION_RECALL_AT_K),
        mrr_at_k=list(MRR_AT_K), ndcg_at_k=list(NDCG_AT_K), map_at_k=list(MAP_AT_K),
        score_functions={"cosine": cos_sim})
    ref = ev.compute_all_metrics(Model(), corpus_embeddings=torch.from_numpy(
        enc.encode(list(st_corpus.values()))))["cosine"]
    flat = {f"{name[:-2]}@{k}": float(v) for name, d in ref.items() for k, v in d.items()}

    assert ours["queries"] == len(ev.queries_ids) == len(queries) - 1
    assert ours["corpus"] == ROWS
    assert set(flat) <= set(ours)
    diff = {m: abs(ours[m] - flat[m]) for m in flat}
    print("max |ours - sentence-transformers| over", len(diff), "metrics:", max(diff.values()))
    assert max(diff.values()) <= 1e-6, diff
    assert 0.3 < ours["ndcg@10"] < 1.0  # a real model retrieves entailed hypotheses


def test_cli_eval_json_and_table(m3e_dir, tmp_path, capsys):
    folder = build_nli_beir(tmp_path, 120)[0]  # small: this checks the command, not the numbers
    sts = tmp_path / "sts.tsv"
    sts.write_text("那个人很开心\t那个人非常开心\t5\n那只猫很开心\t今天天气很好。\t0\n"
                   "他在跑步\t他在慢跑\t4\n", encoding="utf-8")
    rc = cli.main(["eval", "--model", m3e_dir, "--retrieval", folder, "--sts", str(sts), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    got = json.loads(out)
    assert set(got) == {"sts", "retrieval"}
    assert set(got["sts"][str(sts)]) == {"pairs", "spearman", "pearson"}
    assert list(got["retrieval"]) == ["nli-zh-dev"]
    r = got["retrieval"]["nli-zh-dev"]
    assert list(r) == list(SUMMARY_METRICS)
    assert all(0.0 <= v <= 1.0 for v in r.values()) and r["ndcg@10"] > 0.5

    # The table: today's STS table, then a retrieval row (programs are compiled by now).
    rc = cli.main(["eval", "--model", m3e_dir, "--retrieval", folder, "--sts", str(sts)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "pairs", "spearman"]
    row = next(line for line in lines if line.startswith("nli-zh-dev"))
    assert float(row.split()[3]) == pytest.approx(100 * r["ndcg@10"], abs=0.006)


# ---- bad input ---------------------------------------------------------------------------------

GOOD_CORPUS = [("d1", "", "文档一"), ("d2", "标题", "文档二")]
GOOD_QUERIES = [("q1", "查询一")]
GOOD_QRELS = [("q1", "d2", 1)]


def _folder(tmp_path, name="beir", corpus=GOOD_CORPUS, queries=GOOD_QUERIES, qrels=GOOD_QRELS):
    return write_beir(tmp_path / name, corpus, queries, qrels)


def test_load_beir_good_folder(tmp_path):
    f = load_beir(_folder(tmp_path))
    assert f.query_ids == ["q1"] and f.corpus_ids == ["d1", "d2"]
    assert f.relevant == {"q1": {"d2"}}
    assert list(f.corpus_texts()) == ["文档一", "标题 文档二"]


@pytest.mark.parametrize("mutate, where, needle", [
    (lambda d: _append(d, "corpus.jsonl", '{"_id": "d3", "text": \n'), "corpus.jsonl:3",
     "not valid JSON"),
    (lambda d: _append(d, "corpus.jsonl", '{"_id": "d3"}\n'), "corpus.jsonl:3", "'text'"),
    (lambda d: _append(d, "corpus.jsonl", '{"_id": "d1", "text": "x"}\n'), "corpus.jsonl:3",
     "duplicate _id 'd1'"),
    (lambda d: _append(d, "queries.jsonl", '["q2"]\n'), "queries.jsonl:2", "JSON object"),
    (lambda d: _append(d, "qrels/test.tsv", "q9\td1\t1\n"), "test.tsv:3", "query-id 'q9'"),
    (lambda d: _append(d, "qrels/test.tsv", "q1\td9\t1\n"), "test.tsv:3", "corpus-id 'd9'"),
    (lambda d: _append(d, "qrels/test.tsv", "q1\td1\n"), "test.tsv:3", "3 tab-separated"),
    (lambda d: _append(d, "qrels/test.tsv", "q1\td1\thigh\n"), "test.tsv:3", "not a number"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, mutate, where, needle):
    d = _folder(tmp_path)
    mutate(d)
    with pytest.raises(ValueError, match=needle) as e:
        load_beir(d)
    assert where in str(e.value)
    # The CLI: one line, exit 2, before the model loads (the model path does not exist), and
    # nothing on stdout although the good folder came first.
    good = _folder(tmp_path, "good")
    rc = cli.main(["eval", "--model", str(tmp_path / "no-model"), "--retrieval", good,
                   "--retrieval", d, "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("sbert-flax: error: ") and where in err and "Traceback" not in err


def _append(folder: str, rel: str, text: str) -> None:
    with open(os.path.join(folder, rel), "a", encoding="utf-8") as f:
        f.write(text)


def test_missing_split_lists_the_splits(tmp_path, capsys):
    d = _folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"qrels/dev.tsv not found.*splits here: test"):
        load_beir(d, "dev")
    rc = cli.main(["eval", "--model", str(tmp_path / "no-model"), "--retrieval", d,
                   "--split", "dev"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "dev.tsv" in err


def test_training_dev_split_prefers_dev_then_falls_back_to_test(tmp_path, caplog):
    only_test = _folder(tmp_path, "only-test")
    with caplog.at_level(logging.WARNING, logger="sbert_flax.retrieval.ir_evaluation"):
        f = load_dev_beir(only_test)
    assert f.split == "test" and "no qrels/dev.tsv" in caplog.text
    both = _folder(tmp_path, "both")
    with open(os.path.join(both, "qrels", "dev.tsv"), "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    f = load_dev_beir(both)
    assert f.split == "dev" and f.relevant == {"q1": {"d1"}}
    assert load_dev_beir(both, "test").relevant == {"q1": {"d2"}}
    # Only the default falls back: a split asked for must exist, and the message names the flag.
    with pytest.raises(FileNotFoundError, match=r"split 'train'.*splits here: dev, test.*"
                                                r"--ir_dev_split"):
        load_dev_beir(both, "train")


def test_eval_needs_sts_or_retrieval(capsys):
    rc = cli.main(["eval", "--model", "unused"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--retrieval" in err


@pytest.mark.parametrize("chunk", [15, 7])  # the corpus in one chunk, and in two
def test_equal_scores_across_the_cut_rank_by_id(tmp_path, chunk):
    """Duplicates straddling the top-k cut are cut by document id, as sentence-transformers."""
    torch = pytest.importorskip("torch")
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.util import cos_sim

    # File order d9, d8, ..., d0 (all one vector), then other documents; ids sort the other way,
    # so a cut in file order and a cut by id keep different duplicates.
    dup = [(f"d{i}", "", "重复") for i in range(9, -1, -1)]
    other = [(f"e{i}", "", f"其他{i}") for i in range(5)]
    queries = [("q1", "查询一"), ("q2", "查询二")]
    qrels = [("q1", "d0", 1), ("q2", "d9", 1), ("q2", "e3", 1)]
    folder = write_beir(tmp_path / "ties", dup + other, queries, qrels)
    rng = np.random.default_rng(0)
    table = {t: rng.standard_normal(8).astype(np.float32) for _, _, t in other}
    table["重复"] = np.ones(8, np.float32)
    table["查询一"] = np.ones(8, np.float32)
    table["查询二"] = np.ones(8, np.float32) + 0.1 * table["其他3"]
    enc = TableEncoder(table)
    ks = {"accuracy_at_k": [1, 3], "precision_recall_at_k": [1, 3, 5], "mrr_at_k": [3],
          "ndcg_at_k": [3], "map_at_k": [5]}
    ours = evaluate_retrieval(enc, folder, corpus_chunk_size=chunk, **ks)

    corpus = {c: t for c, _, t in dup + other}
    relevant = {"q1": {"d0"}, "q2": {"d9", "e3"}}

    class Model:
        def encode_query(self, texts, **kw):
            return torch.from_numpy(enc.encode(texts))

    ev = InformationRetrievalEvaluator(dict(queries), corpus, relevant,
                                       score_functions={"cosine": cos_sim}, **ks)
    ref = ev.compute_all_metrics(Model(), corpus_embeddings=torch.from_numpy(
        enc.encode(list(corpus.values()))))["cosine"]
    flat = {f"{name[:-2]}@{k}": float(v) for name, d in ref.items() for k, v in d.items()}
    assert flat["accuracy@1"] == 0.5  # q1 finds d0 first: the cut was made by id
    assert {m: ours[m] for m in flat} == pytest.approx(flat, abs=1e-12)
