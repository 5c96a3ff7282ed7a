"""The on-disk vector index: built (streamed) from `encode`'s outputs, searched like the exact search."""

import json
import os
import subprocess
import sys

import helpers
import numpy as np
import pytest

pytest.importorskip("faiss")

from sbert_flax.inference.embeddings_file import (  # noqa: E402
    manifest_path,
    save_embeddings,
    shard_path,
    write_manifest,
)
from sbert_flax.retrieval import vector_index as vi  # noqa: E402
from sbert_flax.retrieval.embedding_rows import EmbeddingRows  # noqa: E402
from sbert_flax.retrieval.search import semantic_search  # noqa: E402

N, DIM = 1000, 32


@pytest.fixture(scope="module")
def data():
    """(corpus [1000, 32], queries [40, 32]): clustered Gaussians, so neighbours are distinct."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, DIM)).astype(np.float32)
    corpus = centers[rng.integers(0, 50, N)] + 0.4 * rng.standard_normal((N, DIM))
    queries = centers[rng.integers(0, 50, 40)] + 0.4 * rng.standard_normal((40, DIM))
    return corpus.astype(np.float32), queries.astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, data):
    """The corpus as one .npy, as 3 shards + manifest (uneven, one empty), and its text file."""
    corpus, _ = data
    d = tmp_path_factory.mktemp("emb")
    plain = save_embeddings(str(d / "emb.npy"), corpus)
    out = str(d / "sharded.npy")
    cuts = [0, 400, 400, 1000]  # the middle shard is empty, as a process with no lines writes
    shards = []
    for i in range(3):
        p = shard_path(out, i, 3)
        save_embeddings(p, corpus[cuts[i]:cuts[i + 1]])
        shards.append((p, cuts[i + 1] - cuts[i]))
    write_manifest(out, shards, DIM)
    texts = d / "corpus.txt"
    texts.write_text("".join(f"第{i}行\n" for i in range(N)), encoding="utf-8")
    return {"plain": plain, "sharded": out, "texts": str(texts)}


def _ids(hits):
    return [[h["corpus_id"] for h in r] for r in hits]


def _assert_same(hits, exact, scale=1.0):
    """Same ids, scores within 1e-5 * scale (cosines: 1; dot products: the largest |q| |c|,
    since float32 sums in different orders differ by ulps of the terms, not of the result)."""
    assert _ids(hits) == _ids(exact)
    for a, b in zip(hits, exact, strict=True):
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], rtol=0,
                                   atol=1e-5 * scale)


def _recall(hits, exact) -> float:
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(_ids(hits), _ids(exact),
                                                                   strict=True)])


@pytest.mark.parametrize("source", ["plain", "sharded"])
@pytest.mark.parametrize("metric", ["cos", "dot"])
def test_flat_equals_exact_search(tmp_path, data, files, source, metric):
    corpus, queries = data
    # Small blocks: the rows arrive in 7 reads, across the shard boundaries.
    cfg = vi.IndexConfig(kind="flat", metric=metric, chunk_rows=150)
    info = vi.build_index(files[source], str(tmp_path / "ix"), files["texts"], cfg)
    assert (info["kind"], info["precision"], info["metric"]) == ("flat", "float32", metric)
    assert (info["count"], info["dim"]) == (N, DIM)
    assert info["bytes"] == os.path.getsize(tmp_path / "ix" / vi.VECTORS_FILE)
    assert info["bytes_per_vector"] >= DIM * 4 and info["build_seconds"] >= 0
    assert info["texts"]["lines"] == N and len(info["texts"]["sha256"]) == 64
    assert json.loads((tmp_path / "ix" / vi.INFO_FILE).read_text()) == info
    if source == "sharded":
        assert len(info["embedding_files"]) == 3
    index = vi.open_index(str(tmp_path / "ix"))
    score = "cos_sim" if metric == "cos" else "dot"
    exact = semantic_search(queries, corpus, top_k=10, score_function=score)
    scale = 1.0 if metric == "cos" else float(np.linalg.norm(queries, axis=1).max()
                                              * np.linalg.norm(corpus, axis=1).max())
    _assert_same(index.search(queries, top_k=10), exact, scale)
    # One query as [D], and top_k past the corpus size: every row once, best first, each with
    # its exact score (the order of near-ties among 1000 rows is float noise, not checked).
    (every,) = index.search(queries[0], top_k=N + 5)
    (ref,) = semantic_search(queries[:1], corpus, top_k=N, score_function=score)
    assert sorted(h["corpus_id"] for h in every) == list(range(N))
    got = [h["score"] for h in every]
    assert got == sorted(got, reverse=True)
    want = {h["corpus_id"]: h["score"] for h in ref}
    np.testing.assert_allclose(got, [want[h["corpus_id"]] for h in every], rtol=0,
                               atol=1e-5 * scale)


def test_build_streams_blocks(tmp_path, files, monkeypatch):
    seen = []
    chunks = EmbeddingRows.chunks

    def spy(self, rows):
        for start, block in chunks(self, rows):
            seen.append((start, len(block)))
            yield start, block

    monkeypatch.setattr(EmbeddingRows, "chunks", spy)
    vi.build_index(files["sharded"], str(tmp_path / "ix"), config=vi.IndexConfig(chunk_rows=256))
    assert seen == [(0, 256), (256, 144), (400, 256), (656, 256), (912, 88)]


def test_sharded_and_plain_build_the_same_index(tmp_path, data, files):
    _, queries = data
    cfg = vi.IndexConfig(kind="flat", precision="int8")  # trained: the sample reads by row id
    a = vi.build_index(files["plain"], str(tmp_path / "a"), config=cfg)
    b = vi.build_index(files["sharded"], str(tmp_path / "b"), config=cfg)
    assert a["params"] == b["params"] == {"train_rows": N}
    assert (tmp_path / "a" / vi.VECTORS_FILE).read_bytes() == \
        (tmp_path / "b" / vi.VECTORS_FILE).read_bytes()


@pytest.mark.parametrize("kind,precision,min_recall", [
    # recall@10 against exact search on this clustered data, seen (faiss 1.15, x86): flat
    # float16 1.0, flat int8 0.99, hnsw 1.0, hnsw int8 0.99, ivf-pq (6-byte codes) 0.64, binary
    # (32 sign bits) 0.62; rescored from the float rows: >= 0.997 for every one.
    ("flat", "float16", 0.99), ("flat", "int8", 0.95), ("hnsw", "float32", 0.95),
    ("hnsw", "int8", 0.95), ("ivf-pq", "float32", 0.5), ("flat", "binary", 0.5),
    ("hnsw", "binary", 0.5)])
def test_approximate_kinds(tmp_path, data, files, kind, precision, min_recall):
    corpus, queries = data
    cfg = vi.IndexConfig(kind=kind, precision=precision, nlist=8, pq_m=8, pq_bits=6)
    info = vi.build_index(files["plain"], str(tmp_path / "ix"), config=cfg)
    index = vi.open_index(str(tmp_path / "ix"))
    exact = semantic_search(queries, corpus, top_k=10)
    hits = index.search(queries, top_k=10)
    assert _recall(hits, exact) >= min_recall
    # Bytes per vector: what the precision / PQ code size says, plus the graph for hnsw.
    code = {"float32": 4 * DIM, "float16": 2 * DIM, "int8": DIM, "binary": DIM // 8}[precision]
    code = 8 * 6 // 8 if kind == "ivf-pq" else code
    assert info["bytes_per_vector"] >= code
    assert info["bytes_per_vector"] < (4 * DIM if kind != "hnsw" else 4 * DIM + 8 * 2 * 32 + 64)
    # Rescoring from the float rows gives exact cosines, and recovers the exact top-k when the
    # candidates hold it.
    rescored = index.search(queries, top_k=10, rescore=True, rescore_multiplier=10)
    exact_scores = {(q, h["corpus_id"]): h["score"]
                    for q, r in enumerate(semantic_search(queries, corpus, top_k=N)) for h in r}
    for q, r in enumerate(rescored):
        np.testing.assert_allclose([h["score"] for h in r],
                                   [exact_scores[q, h["corpus_id"]] for h in r], atol=1e-5)
        assert [h["score"] for h in r] == sorted((h["score"] for h in r), reverse=True)
    assert _recall(rescored, exact) >= 0.95


def test_search_knobs_reach_the_index(tmp_path, data, files):
    corpus, queries = data
    vi.build_index(files["plain"], str(tmp_path / "ix"),
                   config=vi.IndexConfig(kind="ivf-pq", nlist=8, pq_m=8, pq_bits=6, nprobe=1))
    index = vi.open_index(str(tmp_path / "ix"))
    exact = semantic_search(queries, corpus, top_k=10)
    one = _recall(index.search(queries, top_k=10, rescore=True, rescore_multiplier=10), exact)
    every = _recall(index.search(queries, top_k=10, nprobe=8, rescore=True,
                                 rescore_multiplier=10), exact)
    assert every > one and every >= 0.9


def test_texts_are_checked(tmp_path, files):
    texts = tmp_path / "corpus.txt"
    texts.write_text(open(files["texts"], encoding="utf-8").read(), encoding="utf-8")
    vi.build_index(files["plain"], str(tmp_path / "ix"), str(texts))
    index = vi.open_index(str(tmp_path / "ix"))
    lines = index.texts()
    assert len(lines) == N and lines[7] == "第7行"
    texts.write_text(texts.read_text(encoding="utf-8").replace("第7行", "第七行"),
                     encoding="utf-8")
    with pytest.raises(ValueError, match=f"{texts} changed since index"):
        index.texts()
    vi.build_index(files["plain"], str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="built without texts"):
        vi.open_index(str(tmp_path / "bare")).texts()


def _no_leftovers(folder) -> bool:
    return not [n for n in os.listdir(folder) if ".tmp-" in n]


def test_bad_inputs_name_the_file(tmp_path, data, files):
    corpus, _ = data
    dest = str(tmp_path / "ix")
    quantized = str(tmp_path / "int8.npy")
    np.save(quantized, (corpus * 10).astype(np.int8))
    with pytest.raises(ValueError, match=f"{quantized}: holds int8 embeddings"):
        vi.build_index(quantized, dest)
    not_npy = tmp_path / "notes.npy"
    not_npy.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{not_npy}: not a readable .npy file"):
        vi.build_index(str(not_npy), dest)
    flat3d = str(tmp_path / "3d.npy")
    np.save(flat3d, corpus.reshape(10, 100, DIM))
    with pytest.raises(ValueError, match=f"{flat3d}: embeddings must be 2-D"):
        vi.build_index(flat3d, dest)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(open(files["plain"], "rb").read()[:-100])
    with pytest.raises(ValueError, match=f"{truncated}: truncated"):
        vi.build_index(str(truncated), dest)
    short = tmp_path / "short.txt"
    short.write_text("一\n二\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{short} has 2 lines but .*emb.npy holds {N} rows"):
        vi.build_index(files["plain"], dest, str(short))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        vi.build_index(str(tmp_path / "missing.npy"), dest)
    with pytest.raises(ValueError, match="precision must be 'float32'"):
        vi.build_index(files["plain"], dest, config=vi.IndexConfig(kind="ivf-pq",
                                                                   precision="int8"))
    with pytest.raises(ValueError, match="kind='ivfpq'"):
        vi.build_index(files["plain"], dest, config=vi.IndexConfig(kind="ivfpq"))
    assert not os.path.exists(dest) and _no_leftovers(tmp_path)


def test_missing_shard_names_it(tmp_path, data):
    corpus, _ = data
    out = str(tmp_path / "emb.npy")
    shards = [(shard_path(out, i, 2), 500) for i in range(2)]
    save_embeddings(shards[0][0], corpus[:500])
    write_manifest(out, shards, DIM)
    with pytest.raises(FileNotFoundError, match=os.path.basename(shards[1][0])):
        vi.build_index(manifest_path(out), str(tmp_path / "ix"))


def test_existing_index_and_bad_folders(tmp_path, data, files):
    dest = str(tmp_path / "ix")
    vi.build_index(files["plain"], dest)
    with pytest.raises(FileExistsError, match="already exists"):
        vi.build_index(files["plain"], dest)
    info = vi.build_index(files["plain"], dest, config=vi.IndexConfig(kind="hnsw"),
                          overwrite=True)
    assert vi.open_index(dest).info == info and info["kind"] == "hnsw"
    assert _no_leftovers(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not an index folder"):
        vi.open_index(str(tmp_path))
    with pytest.raises(ValueError, match="queries have dim 7"):
        vi.open_index(dest).search(np.ones((2, 7), np.float32))


def test_missing_faiss_names_the_extra(tmp_path, files, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "sbert-flax\[index\]"'):
        vi.build_index(files["plain"], str(tmp_path / "ix"))


# ---- the CLI: `index build`, then `search --index` ---------------------------------------------

def test_cli_index_then_search_equals_exact_search(tiny_bert, tmp_path, capsys):
    from sbert_flax.cli import main as cli

    tiny = tiny_bert()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([*helpers.ZH_SENTENCES, "", "今天下雨了"]) + "\n",
                      encoding="utf-8")
    queries = tmp_path / "q.txt"
    queries.write_text("那个人很开心\n天气怎么样\n", encoding="utf-8")
    emb = tmp_path / "corpus.npy"
    assert cli.main(["encode", "--model", tiny, "--input", str(corpus), "--output",
                     str(emb)]) == 0
    capsys.readouterr()
    assert cli.main(["index", "build", "--embeddings", str(emb), "--texts", str(corpus),
                     "--index", str(tmp_path / "ix")]) == 0
    report = capsys.readouterr().out
    assert "flat" in report and "bytes" in report and "s" in report
    for extra in ([], ["--json"]):
        common = ["--model", tiny, "--queries", str(queries), "--top-k", "3", *extra]
        assert cli.main(["search", *common, "--corpus", str(corpus)]) == 0
        exact = capsys.readouterr().out
        assert cli.main(["search", *common, "--index", str(tmp_path / "ix")]) == 0
        indexed = capsys.readouterr().out
        if extra:  # the same records; scores (printed in full) from faiss vs JAX within 1e-5
            a, b = ([json.loads(x) for x in o.splitlines()] for o in (indexed, exact))
            assert [(r["query"], [(h["corpus_id"], h["text"]) for h in r["hits"]]) for r in a] \
                == [(r["query"], [(h["corpus_id"], h["text"]) for h in r["hits"]]) for r in b]
            for ra, rb in zip(a, b, strict=True):
                assert [list(h) for h in ra["hits"]] == [list(h) for h in rb["hits"]]
                np.testing.assert_allclose([h["score"] for h in ra["hits"]],
                                           [h["score"] for h in rb["hits"]], rtol=0, atol=1e-5)
            assert len(a) == 2 and all(len(r["hits"]) == 3 for r in a)
        else:  # 4 decimals: the same text
            assert indexed == exact and exact.count("\n") == 2 * 4


def test_cli_choices_match_the_library():
    from sbert_flax.cli import index as cli_index

    assert (cli_index.KINDS, cli_index.PRECISIONS, cli_index.METRICS) == \
        (vi.KINDS, vi.PRECISIONS, vi.METRICS)
    defaults = vi.IndexConfig()
    parser = __import__("argparse").ArgumentParser()
    cli_index.add_parser(parser.add_subparsers())
    args = parser.parse_args(["index", "build", "--embeddings", "e", "--index", "i"])
    for field in ("kind", "precision", "metric", "hnsw_m", "ef_construction", "ef_search",
                  "nlist", "pq_m", "nprobe"):
        assert getattr(args, field) == getattr(defaults, field), field


def test_cli_index_errors(tmp_path, capsys):
    from sbert_flax.cli import main as cli

    missing = str(tmp_path / "nope.npy")
    assert cli.main(["index", "build", "--embeddings", missing, "--index",
                     str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sbert-flax: error: ") and "nope.npy" in err and "Traceback" not in err
    assert cli.main(["search", "--queries", missing]) == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and "--index" in err


def test_cli_index_help_imports_no_jax():
    probe = ("import sys\nfrom sbert_flax.cli import main as cli\n"
             "for argv in (['index', '--help'], ['index', 'build', '--help']):\n"
             "    try:\n        cli.main(argv)\n    except SystemExit as e:\n"
             "        assert e.code == 0, argv\n"
             "print(sorted({m.partition('.')[0] for m in sys.modules} & "
             "{'jax', 'flax', 'torch', 'faiss', 'usearch'}))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                       cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
