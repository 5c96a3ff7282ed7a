"""Prompts as sentence-transformers has them: same embeddings, same rules, kept on save/export."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from helpers import ZH_SENTENCES

from sbert_flax import SentenceEncoder, cli
from sbert_flax.prompts import Prompts

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
    from sbert_flax.retrieval import SUMMARY_METRICS, evaluate_retrieval

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
