"""The corpus in a vector database (sbert_flax.retrieval.vectorstore) through Milvus Lite.

The reference is our exact search (`semantic_search`, itself tested against sentence-transformers)
and the in-memory retrieval evaluation: with a FLAT index Milvus' top-k must be the exact top-k.
Every database is a Milvus Lite file in tmp_path; `vectorstore.connect` stops its embedded server
on exit, so a subprocess can open the same file afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import helpers
import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the vectordb extra (pymilvus) is not installed")
pytest.importorskip("milvus_lite", reason="the vectordb extra (milvus-lite) is not installed")

from sbert_flax.cli import main as cli  # noqa: E402
from sbert_flax.common.errors import is_user_error  # noqa: E402
from sbert_flax.inference.embeddings_file import (  # noqa: E402
    save_embeddings,
    shard_path,
    write_manifest,
)
from sbert_flax.inference.encoder import SentenceEncoder  # noqa: E402
from sbert_flax.retrieval import vectorstore  # noqa: E402
from sbert_flax.retrieval.ir_evaluation import evaluate_retrieval, load_beir  # noqa: E402
from sbert_flax.retrieval.search import semantic_search  # noqa: E402
from sbert_flax.retrieval.vectorstore_eval import evaluate_retrieval_db  # noqa: E402

N = 240  # corpus sentences
BATCH = 16  # rows per upsert in the kill test
STALL_AFTER = 3  # batches the killed upload writes before it stalls
DRIVER = os.path.join(helpers.TESTS, "vectorstore_driver.py")


@pytest.fixture(scope="module")
def model_dir(tiny_bert) -> str:
    # std 0.3 spreads the cosine scores of random sentences over [0.1, 1] (0.1's crowd into
    # [0.86, 1]), so few exact scores lie within Milvus' float32 noise (~1e-7) of each other.
    return tiny_bert(pooling="mean", std=0.3)


@pytest.fixture(scope="module")
def enc(model_dir, one_device) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(model_dir, devices=one_device)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return helpers.random_zh_sentences(N, max_len=40, seed=1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, enc, texts):
    """(uri, collection, stats) of one uninterrupted upload of `texts`."""
    uri = str(tmp_path_factory.mktemp("clean") / "milvus.db")
    stats = vectorstore.upload(enc, texts, uri, "docs", batch_size=64, progress=False)
    return uri, "docs", stats


def read_all(uri: str, collection: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(ids, texts, vectors) of every row, by id."""
    with vectorstore.connect(uri) as client:
        client.load_collection(collection)
        rows = client.query(collection, filter="id >= 0", output_fields=["id", "text", "vector"],
                            limit=N + 100, consistency_level="Strong")
    rows = sorted(rows, key=lambda r: r["id"])
    return (np.array([r["id"] for r in rows]), [r["text"] for r in rows],
            np.array([r["vector"] for r in rows], np.float32))


def assert_same_hits(got, want, exact: np.ndarray | None = None) -> int:
    """The database's hits are the exact top-k: position by position the same id, or (where the
    two disagree) ids whose exact scores (`exact[q, id]`) are within 1e-5 of each other, a near
    tie either order answers; scores within 1e-5. Returns how many positions differ."""
    assert len(got) == len(want)
    swapped = 0
    for q, (g, w) in enumerate(zip(got, want, strict=True)):
        gi, wi = [h["corpus_id"] for h in g], [h["corpus_id"] for h in w]
        assert len(gi) == len(wi) == len(set(gi)), f"query {q}: {gi} vs {wi}"
        for a, b in zip(gi, wi, strict=True):
            if a != b:
                swapped += 1
                assert exact is not None and abs(exact[q, a] - exact[q, b]) <= 1e-5, \
                    f"query {q}: {gi} vs exact {wi}"
        np.testing.assert_allclose([h["score"] for h in g], [h["score"] for h in w], atol=1e-5,
                                   rtol=0, err_msg=f"query {q}")
    return swapped


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.astype(np.float64).T


def test_flat_top_k_equals_exact_search(enc, texts, clean):
    uri, coll, stats = clean
    assert stats == vectorstore.UploadStats(rows=N, written=N, encoded=N, skipped=0, truncated=0)
    assert vectorstore.count_rows(uri, coll) == N
    queries = helpers.random_zh_sentences(30, max_len=20, seed=2)
    got = vectorstore.search(enc, queries, uri, coll, top_k=10)
    q, c = enc.encode(queries), enc.encode(texts)
    want = semantic_search(q, c, top_k=10)
    assert assert_same_hits(got, want, cosine(q, c)) <= 2  # swaps of near ties, if any
    assert all(h["text"] == texts[h["corpus_id"]] for qh in got for h in qh)


def test_upload_from_embeddings_files(tmp_path, enc, texts, clean):
    """A `.npy` and a sharded manifest are uploaded as they are (nothing encoded); a file whose
    rows do not match the texts is refused, naming it."""
    emb = enc.encode(texts)
    npy = save_embeddings(str(tmp_path / "emb.npy"), emb)
    sharded = str(tmp_path / "sharded.npy")
    half = N // 2
    parts = [(save_embeddings(shard_path(sharded, i, 2), emb[s]), len(emb[s]))
             for i, s in enumerate((slice(0, half), slice(half, N)))]
    write_manifest(sharded, parts, dim=emb.shape[1])
    _, _, clean_vectors = read_all(*clean[:2])
    for name, path in (("npy", npy), ("manifest", sharded)):
        uri = str(tmp_path / f"{name}.db")
        stats = vectorstore.upload(enc, texts, uri, "docs", embeddings=path, batch_size=100,
                                   progress=False)
        assert (stats.written, stats.encoded) == (N, 0)
        ids, stored, vectors = read_all(uri, "docs")
        assert ids.tolist() == list(range(N)) and stored == texts
        np.testing.assert_array_equal(vectors, emb)
        np.testing.assert_allclose(vectors, clean_vectors, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"emb\.npy: holds 240 rows, but the input has 239"):
        vectorstore.upload(enc, texts[:-1], str(tmp_path / "bad.db"), "docs", embeddings=npy,
                           progress=False)


def test_kill_and_rerun(tmp_path, monkeypatch, model_dir, enc, texts, clean):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    uri, log = str(tmp_path / "milvus.db"), tmp_path / "encoded.log"
    proc = subprocess.Popen([sys.executable, DRIVER, model_dir, str(corpus), uri, "docs", str(log),
                             str(BATCH), str(STALL_AFTER)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The stalled batch is logged once the ones before it are upserted.
        def batches_logged() -> int:
            return len(log.read_text().split()) if log.exists() else 0

        helpers.wait_for(lambda: batches_logged() > STALL_AFTER or proc.poll() is not None,
                         timeout=300)
        if batches_logged() <= STALL_AFTER or proc.poll() is not None:  # a ceiling, or it died
            proc.kill()
            pytest.fail(f"the upload did not reach batch {STALL_AFTER + 1}: "
                        f"{proc.communicate()[0].decode()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = vectorstore.count_rows(uri, "docs")
    assert 0 < before < N, before

    encoded: list[int] = []
    encode = enc.encode

    def counting_encode(batch, **kwargs):
        encoded.append(len(batch))
        return encode(batch, **kwargs)

    monkeypatch.setattr(enc, "encode", counting_encode)
    stats = vectorstore.upload(enc, texts, uri, "docs", batch_size=BATCH, progress=False)
    # Only the rows the killed run did not write were encoded again.
    assert sum(encoded) == N - before
    assert (stats.skipped, stats.written, stats.encoded) == (before, N - before, N - before)
    # A third run finds everything there.
    encoded.clear()
    stats = vectorstore.upload(enc, texts, uri, "docs", batch_size=BATCH, progress=False)
    assert (sum(encoded), stats.skipped, stats.written) == (0, N, 0)

    ids, stored, vectors = read_all(uri, "docs")
    clean_ids, clean_texts, clean_vectors = read_all(*clean[:2])
    assert vectorstore.count_rows(uri, "docs") == N
    assert ids.tolist() == clean_ids.tolist() == list(range(N))
    assert stored == clean_texts == texts
    np.testing.assert_allclose(vectors, clean_vectors, atol=1e-5, rtol=0)


def test_mismatched_model_is_refused(tiny_bert, one_device, enc, texts, clean):
    uri, coll, _ = clean
    recorded = os.path.abspath(enc.model.source)
    wider = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean", hidden=48),
                                            devices=one_device)
    other = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean", seed=1), devices=one_device)
    assert other.dim == enc.dim
    for offered in (wider, other):
        name = os.path.abspath(offered.model.source)
        with pytest.raises(vectorstore.CollectionMismatch) as e:
            vectorstore.upload(offered, texts, uri, coll, progress=False)
        msg = str(e.value)
        assert f"collection 'docs' at {uri}" in msg
        assert f"model {recorded!r} (dim {enc.dim}," in msg
        assert f"model {name!r} (dim {offered.dim}," in msg
        assert is_user_error(e.value)
        with pytest.raises(vectorstore.CollectionMismatch, match="refusing to search it with"):
            vectorstore.search(offered, ["查询"], uri, coll)
    # The same model with another corpus: refused at the first stored row that differs.
    with pytest.raises(ValueError, match="filled from another corpus"):
        vectorstore.upload(enc, ["另一个语料"] + texts[1:], uri, coll, progress=False)
    assert vectorstore.count_rows(uri, coll) == N


def test_missing_pymilvus_says_which_extra(monkeypatch, tmp_path, enc):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # `import pymilvus` now fails
    with pytest.raises(ModuleNotFoundError, match=r'pip install "sbert-flax\[vectordb\]"') as e:
        vectorstore.upload(enc, ["一"], str(tmp_path / "x.db"), "docs", progress=False)
    assert str(e.value).count("\n") == 0 and is_user_error(e.value)
    monkeypatch.delitem(sys.modules, "pymilvus")
    monkeypatch.setitem(sys.modules, "milvus_lite", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs milvus-lite.*sbert-flax\[vectordb\]"):
        vectorstore.count_rows(str(tmp_path / "x.db"), "docs")


def test_long_text_is_cut_at_a_character_boundary():
    text = "汉" * 30000  # 90,000 bytes of UTF-8
    cut = vectorstore.fit_text(text)
    assert len(cut.encode("utf-8")) <= vectorstore.TEXT_MAX_BYTES and text.startswith(cut)
    assert len(cut) == vectorstore.TEXT_MAX_BYTES // 3
    assert vectorstore.fit_text("短") == "短"


# ---- retrieval evaluation and the CLI ------------------------------------------------------------

def write_beir(root, texts: list[str]) -> str:
    """A small BEIR folder over `texts`: 25 queries (halves of documents), each relevant to its
    document and the next, plus two duplicated documents whose equal scores rank by id."""
    os.makedirs(root / "qrels")
    docs = texts[:120] + texts[:2]  # d120, d121 duplicate d0, d1
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(docs):
            title = "标题" if i % 7 == 0 else ""
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": t}, ensure_ascii=False)
                    + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in range(25):
            t = texts[4 * q]
            f.write(json.dumps({"_id": f"q{q}", "text": t[:max(1, len(t) // 2)]},
                               ensure_ascii=False) + "\n")
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{q}\td{4 * q + j}\t1\n" for q in range(25) for j in (0, 1))
    return str(root)


def test_retrieval_evaluation_through_the_database(tmp_path, monkeypatch, enc, texts):
    folder = write_beir(tmp_path / "tiny-beir", texts)
    f = load_beir(folder)
    # The data has no near ties at a relevant document (but for its duplicate), where float32
    # noise could order two documents differently in the two searches.
    scores = cosine(enc.encode(f.query_texts), enc.encode(list(f.corpus_texts())))
    rows = {cid: i for i, cid in enumerate(f.corpus_ids)}
    for qi, qid in enumerate(f.query_ids):
        for cid in f.relevant[qid]:
            r = rows[cid]
            dup = {0: 120, 1: 121}.get(r)  # d120, d121 repeat d0, d1
            others = [j for j in range(len(rows)) if j not in (r, dup)]
            assert np.abs(scores[qi, others] - scores[qi, r]).min() > 1e-5, (qid, cid)
    want = evaluate_retrieval(enc, folder)
    uri = str(tmp_path / "milvus.db")
    got = evaluate_retrieval_db(enc, folder, uri)
    assert got == want
    assert vectorstore.count_rows(uri, "tiny_beir") == 122
    # A second evaluation reuses the uploaded corpus.
    encoded: list[int] = []
    encode = enc.encode

    def counting_encode(batch, **kwargs):
        encoded.append(len(batch))
        return encode(batch, **kwargs)

    monkeypatch.setattr(enc, "encode", counting_encode)
    assert evaluate_retrieval_db(enc, f, uri) == want
    assert sum(encoded) == len(f.query_ids)  # the queries only


def cli_run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_upload_then_search_equals_exact_search(tmp_path, capsys, model_dir, enc, texts):
    corpus, queries = tmp_path / "corpus.txt", tmp_path / "queries.txt"
    corpus.write_text("".join(t + "\n" for t in texts[:100]), encoding="utf-8")
    query_texts = helpers.random_zh_sentences(8, max_len=20, seed=3)
    queries.write_text("".join(t + "\n" for t in query_texts), encoding="utf-8")
    uri = str(tmp_path / "milvus.db")
    rc, out, err = cli_run(capsys, "upload", "--uri", uri, "--collection", "docs", "--input",
                           str(corpus), "--model", model_dir, "--batch-size", "32",
                           "--no-progress")
    assert rc == 0, err
    assert "100 written (100 encoded)" in out
    common = ("--queries", str(queries), "--model", model_dir, "--top-k", "5", "--json")
    rc, db_out, err = cli_run(capsys, "search", "--uri", uri, "--collection", "docs", *common)
    assert rc == 0, err
    rc, exact_out, err = cli_run(capsys, "search", "--corpus", str(corpus), *common)
    assert rc == 0, err
    db = [json.loads(line) for line in db_out.splitlines()]
    exact = [json.loads(line) for line in exact_out.splitlines()]
    assert [r["query"] for r in db] == [r["query"] for r in exact]
    assert all(h["text"] == texts[h["corpus_id"]] for r in db for h in r["hits"])
    assert_same_hits([r["hits"] for r in db], [r["hits"] for r in exact],
                     cosine(enc.encode(query_texts), enc.encode(texts[:100])))

    # --uri and --corpus are one or the other; a missing collection is one line, exit 2.
    rc, _, err = cli_run(capsys, "search", "--uri", uri, "--collection", "nope", *common)
    assert rc == 2 and "collection 'nope' not found" in err and "Traceback" not in err


def test_cli_eval_through_the_database(tmp_path, capsys, model_dir, texts):
    folder = write_beir(tmp_path / "tiny-beir", texts)
    uri = str(tmp_path / "milvus.db")
    common = ("--retrieval", folder, "--model", model_dir, "--json")
    rc, db_out, err = cli_run(capsys, "eval", *common, "--uri", uri)
    assert rc == 0, err
    rc, mem_out, err = cli_run(capsys, "eval", *common)
    assert rc == 0, err
    assert json.loads(db_out) == json.loads(mem_out)
    assert vectorstore.count_rows(uri, "tiny_beir") == 122
