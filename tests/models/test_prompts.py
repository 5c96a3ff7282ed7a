"""Prompts as sentence-transformers has them: same embeddings, same rules, kept on save/export."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from helpers import ZH_SENTENCES

from sbert_flax import SentenceEncoder
from sbert_flax.cli import main as cli
from sbert_flax.models.prompts import Prompts

PROMPTS = {"query": "为这个句子生成表示以用于检索相关文章：", "passage": "", "short": "问："}


def _with_prompts(src: str, dest: str, default: str | None = None, include_prompt: bool = True) -> str:
    """A copy of a sentence-transformers folder with `prompts` in its config."""
    shutil.copytree(src, dest)
    with open(os.path.join(dest, "config_sentence_transformers.json"), "w", encoding="utf-8") as f:
        json.dump({"prompts": PROMPTS, "default_prompt_name": default}, f, ensure_ascii=False)
    if not include_prompt:
        p = os.path.join(dest, "1_Pooling", "config.json")
        cfg = json.load(open(p, encoding="utf-8"))
        json.dump({**cfg, "include_prompt": False}, open(p, "w", encoding="utf-8"))
    return dest


@pytest.fixture(scope="module")
def folder(tiny_bert, tmp_path_factory) -> str:
    src = tiny_bert(hidden=48, heads=3, layers=2, pooling="mean", max_position=64)
    return _with_prompts(src, str(tmp_path_factory.mktemp("prompts") / "model"))


@pytest.fixture(scope="module")
def st_model(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(folder, device="cpu")


@pytest.fixture(scope="module")
def enc(folder, one_device) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(folder, devices=one_device)


def test_prompts_are_read(enc, st_model):
    assert dict(enc.prompts.prompts) == PROMPTS
    # sentence-transformers >= 6 adds empty "query"/"document" prompts to every model.
    assert enc.prompts.known == st_model.prompts
    assert enc.prompts.default_prompt_name is None


@pytest.mark.parametrize("kwargs", [{"prompt_name": "query"}, {"prompt_name": "short"},
                                    {"prompt_name": "passage"}, {"prompt_name": "document"},
                                    {"prompt": "查询: "}, {}])
def test_prompted_embeddings_equal_sentence_transformers(enc, st_model, kwargs):
    want = st_model.encode(ZH_SENTENCES, **kwargs)
    got = enc.encode(ZH_SENTENCES, **kwargs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_prompt_tokens_count_against_max_seq_length(enc, st_model):
    """A prompt of 19 tokens with max_seq_length 24 leaves 3 for the sentence: truncated alike."""
    st_model.max_seq_length = 24
    try:
        want = st_model.encode(ZH_SENTENCES, prompt_name="query")
    finally:
        st_model.max_seq_length = 64
    got = enc.encode(ZH_SENTENCES, prompt_name="query", max_seq_length=24)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # Long sentences collapse to the prompt plus their first tokens.
    np.testing.assert_allclose(got[4], enc.encode(["机器学"], prompt_name="query", max_seq_length=24)[0],
                               rtol=0, atol=1e-6)


def test_default_prompt_name_applies(folder, tmp_path, one_device):
    from sentence_transformers import SentenceTransformer

    path = _with_prompts(folder, str(tmp_path / "m"), default="query")
    ours = SentenceEncoder.from_pretrained(path, devices=one_device)
    st = SentenceTransformer(path, device="cpu")
    assert st.default_prompt_name == ours.prompts.default_prompt_name == "query"
    got = ours.encode(ZH_SENTENCES)
    np.testing.assert_allclose(got, st.encode(ZH_SENTENCES), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, ours.encode(ZH_SENTENCES, prompt_name="query"), rtol=0, atol=0)
    # An explicit empty prompt turns the default off, as in sentence-transformers.
    np.testing.assert_allclose(ours.encode(ZH_SENTENCES, prompt=""), st.encode(ZH_SENTENCES, prompt=""),
                               rtol=0, atol=1e-5)


def test_prompt_beats_prompt_name_with_a_warning(enc):
    with pytest.warns(UserWarning, match="using prompt and ignoring prompt_name='query'"):
        got = enc.encode(ZH_SENTENCES[:3], prompt="问：", prompt_name="query")
    np.testing.assert_array_equal(got, enc.encode(ZH_SENTENCES[:3], prompt_name="short"))


def test_unknown_prompt_name_lists_the_known_ones(enc):
    with pytest.raises(ValueError, match=r"'nope' is not one of .*\['query', 'document', 'passage', 'short'\]"):
        enc.encode(["今天"], prompt_name="nope")


def test_bad_prompt_config_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"x\.json: default_prompt_name 'q' is not one of"):
        Prompts.from_dict({"prompts": {"query": "a"}, "default_prompt_name": "q"}, "x.json")
    with pytest.raises(ValueError, match=r"x\.json: prompt 'query' must be a string"):
        Prompts.from_dict({"prompts": {"query": 3}}, "x.json")
    # sentence-transformers reads a null prompt as "".
    assert Prompts.from_dict({"prompts": {"query": None}}, "x.json").prompts == {"query": ""}


def test_prompts_survive_save_and_export(enc, tmp_path, one_device):
    from sentence_transformers import SentenceTransformer

    enc.save(str(tmp_path / "flax"))
    back = SentenceEncoder.from_pretrained(str(tmp_path / "flax"), devices=one_device)
    assert back.prompts == enc.prompts
    back.export_pytorch(str(tmp_path / "pt"))
    st = SentenceTransformer(str(tmp_path / "pt"), device="cpu")
    assert st.prompts == enc.prompts.known and st.default_prompt_name is None
    np.testing.assert_allclose(enc.encode(ZH_SENTENCES, prompt_name="query"),
                               st.encode(ZH_SENTENCES, prompt_name="query"), rtol=0, atol=1e-5)


def test_include_prompt_false_is_kept_and_refused_with_a_prompt(folder, tmp_path, one_device, caplog):
    from sentence_transformers import SentenceTransformer

    path = _with_prompts(folder, str(tmp_path / "m"), include_prompt=False)
    ours = SentenceEncoder.from_pretrained(path, devices=one_device)
    st = SentenceTransformer(path, device="cpu")
    # Without a prompt the flag changes nothing: still the same embeddings.
    np.testing.assert_allclose(ours.encode(ZH_SENTENCES), st.encode(ZH_SENTENCES), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="include_prompt=false"):
        ours.encode(ZH_SENTENCES, prompt_name="query")
    ours.export_pytorch(str(tmp_path / "pt"))
    with caplog.at_level(logging.ERROR):
        assert SentenceTransformer(str(tmp_path / "pt"), device="cpu")[1].include_prompt is False


def test_cli_encode_prompt_name(folder, enc, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(ZH_SENTENCES[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    rc = cli.main(["encode", "--model", folder, "--input", str(src), "--output", str(out),
                   "--prompt-name", "query", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), enc.encode(ZH_SENTENCES[:4], prompt_name="query"),
                               rtol=0, atol=1e-6)
    rc = cli.main(["encode", "--model", folder, "--input", str(src), "--output", str(out),
                   "--prompt", "问：", "--no-progress"])
    assert rc == 0
    np.testing.assert_allclose(np.load(out), enc.encode(ZH_SENTENCES[:4], prompt_name="short"),
                               rtol=0, atol=1e-6)
    bad = tmp_path / "bad.npy"
    rc = cli.main(["encode", "--model", folder, "--input", str(src), "--output", str(bad),
                   "--prompt-name", "nope", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "'nope' is not one of" in err and "query" in err, err
    assert not bad.exists()


# ---- search and eval: a prompt per side ------------------------------------------------------

def test_cli_search_query_and_corpus_prompts(folder, enc, tmp_path, capsys):
    from sbert_flax.util import semantic_search

    corpus, queries = ZH_SENTENCES, ZH_SENTENCES[:3]
    (tmp_path / "c.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n", encoding="utf-8")
    base = ["search", "--model", folder, "--corpus", str(tmp_path / "c.txt"), "--queries",
            str(tmp_path / "q.txt"), "--top-k", "4", "--json"]

    def hits(*flags: str) -> list[list[tuple[int, float]]]:
        assert cli.main([*base, *flags]) == 0
        return [[(h["corpus_id"], h["score"]) for h in json.loads(line)["hits"]]
                for line in capsys.readouterr().out.splitlines()]

    want = semantic_search(enc.encode(queries, prompt_name="query"),
                           enc.encode(corpus, prompt="问："), top_k=4)
    got = hits("--query-prompt-name", "query", "--corpus-prompt", "问：")
    for g, w in zip(got, want, strict=True):
        assert [c for c, _ in g] == [h["corpus_id"] for h in w]
        np.testing.assert_allclose([s for _, s in g], [h["score"] for h in w], rtol=0, atol=1e-5)
    # --prompt-name is --query-prompt-name (mine-negatives' spelling).
    assert hits("--prompt-name", "query", "--corpus-prompt-name", "short") == got
    plain = semantic_search(enc.encode(queries), enc.encode(corpus), top_k=4)
    assert [h["score"] for r in plain for h in r] != pytest.approx([s for r in got for _, s in r])


def test_cli_eval_retrieval_prompts(folder, enc, tmp_path, capsys):
    from sbert_flax.retrieval.ir_evaluation import SUMMARY_METRICS, evaluate_retrieval

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": s} for i, s in enumerate(ZH_SENTENCES)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                               for d in docs), encoding="utf-8")
    queries = [{"_id": f"q{i}", "text": s[: max(2, len(s) // 2)]}
               for i, s in enumerate(ZH_SENTENCES)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n"
                                                for q in queries), encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs))),
        encoding="utf-8")
    rc = cli.main(["eval", "--model", folder, "--retrieval", str(root), "--json",
                   "--query-prompt-name", "query", "--corpus-prompt", "问："])
    out = capsys.readouterr()
    assert rc == 0, out.err
    got = json.loads(out.out)["retrieval"]["beir"]
    want = evaluate_retrieval(enc, str(root), query_prompt_name="query", corpus_prompt="问：")
    plain = evaluate_retrieval(enc, str(root))
    assert got == pytest.approx({m: want[m] for m in SUMMARY_METRICS}, abs=1e-9)
    assert [want[m] for m in SUMMARY_METRICS] != [plain[m] for m in SUMMARY_METRICS]


# ---- the two sides of a search follow encode_query / encode_document ---------------------------

# Folders saved by sentence-transformers itself: query and document prompts with no default, and
# a query prompt with a "passage" prompt and default_prompt_name="query" (the corpus must not
# take the query prompt).
SIDE_CASES = {"query+document": ({"query": "查询：", "document": "文档："}, None),
              "query+passage, default query": ({"query": "查询：", "passage": "段落："}, "query")}


@pytest.fixture(scope="module", params=list(SIDE_CASES))
def side_folder(request, tiny_bert, tmp_path_factory, one_device):
    from sentence_transformers import SentenceTransformer

    prompts, default = SIDE_CASES[request.param]
    src = tiny_bert(hidden=48, heads=3, layers=2, pooling="mean", max_position=64)
    st = SentenceTransformer(src, device="cpu", prompts=prompts, default_prompt_name=default)
    dest = str(tmp_path_factory.mktemp("side") / "model")
    st.save(dest)
    st = SentenceTransformer(dest, device="cpu")  # read back as a user would load it
    return dest, st, SentenceEncoder.from_pretrained(dest, devices=one_device)


def test_encode_query_and_document_equal_sentence_transformers(side_folder):
    _, st, enc = side_folder
    for side in ("encode_query", "encode_document"):
        want = getattr(st, side)(ZH_SENTENCES, convert_to_numpy=True)
        np.testing.assert_allclose(getattr(enc, side)(ZH_SENTENCES), want, rtol=0, atol=2e-5,
                                   err_msg=side)
    # An explicit prompt still wins on either side.
    np.testing.assert_allclose(enc.encode_document(ZH_SENTENCES, prompt="问："),
                               st.encode_document(ZH_SENTENCES, prompt="问："), rtol=0, atol=2e-5)


def test_retrieval_equals_information_retrieval_evaluator(side_folder, tmp_path):
    """The same metrics as sentence-transformers' evaluator on a folder whose prompts it saved:
    both encode the queries with the "query" prompt and the documents with the document one."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    from sbert_flax.retrieval.ir_evaluation import evaluate_retrieval

    _, st, enc = side_folder
    corpus = {f"d{i}": s for i, s in enumerate(ZH_SENTENCES)}
    queries = {f"q{i}": s[: max(2, len(s) // 2)] for i, s in enumerate(ZH_SENTENCES)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(len(ZH_SENTENCES))}
    from sentence_transformers.util import cos_sim

    ev = InformationRetrievalEvaluator(queries, corpus, relevant, show_progress_bar=False,
                                       score_functions={"cosine": cos_sim})
    ref = ev.compute_all_metrics(st)["cosine"]
    flat = {f"{name[:-2]}@{k}": float(v) for name, d in ref.items() for k, v in d.items()}
    folder = _beir(tmp_path, queries, corpus, relevant)
    ours = evaluate_retrieval(enc, folder)
    diff = {m: abs(ours[m] - flat[m]) for m in flat}
    print(f"max |ours - InformationRetrievalEvaluator| over {len(diff)} metrics: "
          f"{max(diff.values()):.2e}")
    assert max(diff.values()) <= 1e-6, diff
    # The prompts matter here: without them (or with the default prompt on both sides) the
    # metrics differ, so equality above is not an accident of prompts that change nothing.
    plain = evaluate_retrieval(enc, folder, query_prompt="", corpus_prompt="")
    assert any(abs(plain[m] - flat[m]) > 1e-6 for m in flat)


def test_mining_and_search_use_each_sides_prompt(side_folder):
    from sbert_flax.util import mine_hard_negatives, search_corpus, semantic_search

    _, st, enc = side_folder
    q = enc.encode(ZH_SENTENCES[:4], prompt_name="query")
    d_name = "document" if "document" in st.prompts and st.prompts["document"] else None
    d = enc.encode(ZH_SENTENCES, **({"prompt_name": d_name} if d_name else {"prompt": ""}))
    want = semantic_search(q, d, top_k=3)
    assert search_corpus(enc, ZH_SENTENCES, ZH_SENTENCES[:4], top_k=3) == want

    seen: dict[str, list] = {"query": [], "document": []}

    class Spy:
        prompts = enc.prompts

        def encode(self, texts, **kw):
            seen["query" if texts == ZH_SENTENCES[:2] else "document"].append(kw)
            return enc.encode(texts, **kw)

    mine_hard_negatives(Spy(), ZH_SENTENCES[:2], ZH_SENTENCES[2:4], corpus=ZH_SENTENCES[4:],
                        num_negatives=1)
    assert [k.get("prompt_name") for k in seen["query"]] == ["query"]
    assert [k.get("prompt_name") for k in seen["document"]] == ["document"]


def _beir(root, queries: dict, corpus: dict, relevant: dict) -> str:
    """A BEIR folder of these dicts (documents without titles)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(
        {"_id": k, "title": "", "text": v}, ensure_ascii=False) + "\n" for k, v in corpus.items()),
        encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(
        {"_id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in queries.items()),
        encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, ds in relevant.items() for d in ds), encoding="utf-8")
    return str(root)
