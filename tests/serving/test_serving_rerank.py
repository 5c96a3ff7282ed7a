"""`sbert-flax serve` with a cross-encoder: TEI's /rerank and /predict, answered as TEI answers.

In-process servers (uvicorn in a thread, real HTTP on 127.0.0.1) on tiny random
`BertForSequenceClassification` folders (`cross_encoder_helpers`): a reranker alone (one label), a
classifier alone (three named labels) and an embedder with the reranker in one process. The
expected scores come from sentence-transformers' `CrossEncoder.predict` (and transformers'
model for a single text) on the same folders, within 1e-5; shapes, status codes and error bodies
are TEI's (router/src/http/server.rs, types.rs, core/src/infer.rs, core/src/tokenization.rs of
huggingface/text-embeddings-inference), and every answer validates against TEI's published
schemas (`test_serving_schemas.assert_tei_schema`). A client we did not write,
`huggingface_hub.InferenceClient.text_classification`, reads /predict.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import cross_encoder_helpers as ceh
import httpx
import numpy as np
import pytest
from test_serving import free_port
from test_serving_schemas import assert_tei_schema

st = pytest.importorskip("sentence_transformers")
torch = pytest.importorskip("torch")

TOL = 1e-5
MAX_LEN = 32  # the folders' max_position_embeddings and tokenizer length: the max input length
LABELS = ["不相关", "相关", "矛盾"]  # the classifier's id2label, written into its config.json
QUERY = "今天天气怎么样"
TEXTS = ["今天天气很好，阳光明媚", "我喜欢吃苹果", "明天可能会下雨", "天气", "",
         "很长的文本" * 12]  # the last is over MAX_LEN tokens with the query: it is truncated


@pytest.fixture(scope="module")
def ce_dirs(tmp_path_factory, zh_vocab) -> dict[str, str]:
    one = ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp("rerank")), num_labels=1,
                                          max_position=MAX_LEN, seed=3, vocab_file=zh_vocab)
    three = ceh.make_tiny_cross_encoder_dir(str(tmp_path_factory.mktemp("classify")),
                                            num_labels=3, max_position=MAX_LEN, seed=4,
                                            vocab_file=zh_vocab)
    cfg_path = os.path.join(three, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["id2label"] = {str(i): name for i, name in enumerate(LABELS)}
    cfg["label2id"] = {name: i for i, name in enumerate(LABELS)}
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return {"reranker": one, "classifier": three}


def _cross_encoder(path: str, one_device):
    from sbert_flax.inference.cross_encoder import CrossEncoder

    # One packed shape (a row of 32 tokens): one compile per model; a request's pairs take
    # several rounds, packed several to the row.
    return CrossEncoder(path, devices=one_device, max_batch_tokens=MAX_LEN)


def _start(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return base, server, thread
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the in-process server did not turn healthy")


@pytest.fixture(scope="module")
def servers(ce_dirs, tiny_bert, one_device):
    """name -> base URL: "reranker" and "classifier" alone, "both" (an embedder + the reranker)."""
    from sbert_flax import SentenceEncoder
    from sbert_flax.serving import ServeSettings, create_app

    encoder = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean"), max_seq_length=MAX_LEN,
                                              devices=one_device, max_batch_tokens=MAX_LEN)
    # Each app's worker is its model's only user: two loads of the reranker (its compiled
    # program is shared process-wide).
    apps = {
        "reranker": create_app(_cross_encoder(ce_dirs["reranker"], one_device),
                               ServeSettings(model_id="tiny-rerank", max_client_batch_size=8)),
        "classifier": create_app(_cross_encoder(ce_dirs["classifier"], one_device),
                                 ServeSettings(model_id="tiny-cls")),
        "both": create_app(encoder, ServeSettings(model_id="tiny-embed"),
                           reranker=_cross_encoder(ce_dirs["reranker"], one_device)),
    }
    started = {name: _start(app) for name, app in apps.items()}
    yield {name: s[0] for name, s in started.items()} | {"encoder": encoder}
    for _, server, thread in started.values():
        server.should_exit = True
        thread.join(30)


def post(url: str, path: str, body) -> httpx.Response:
    r = httpx.post(url + path, json=body, timeout=60)
    assert_tei_schema(r)
    return r


def _error(r: httpx.Response, status: int, error_type: str, needle: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert needle in body["error"], body


@pytest.fixture(scope="module")
def st_reranker(ce_dirs):
    return st.CrossEncoder(ce_dirs["reranker"])


def _st_scores(model, pairs, raw: bool, left: bool = False, **kw) -> np.ndarray:
    side = model.tokenizer.truncation_side
    model.tokenizer.truncation_side = "left" if left else "right"
    try:
        return np.asarray(model.predict(pairs, activation_fn=torch.nn.Identity() if raw else None,
                                        **kw), np.float32)
    finally:
        model.tokenizer.truncation_side = side


def _tei_sorted(scores: np.ndarray) -> list[int]:
    # TEI: a stable ascending sort by score, reversed.
    return sorted(range(len(scores)), key=lambda i: scores[i])[::-1]


# ---- /rerank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw_scores", [False, True])
@pytest.mark.parametrize("direction", ["right", "left"])
def test_rerank_equals_sentence_transformers(servers, st_reranker, raw_scores, direction):
    """Scores are `CrossEncoder.predict`'s (sigmoid, or the logits with raw_scores), truncated
    longest-first from either end, sorted highest first; `text` only with return_text."""
    pairs = [(QUERY, t) for t in TEXTS]
    want = _st_scores(st_reranker, pairs, raw_scores, left=direction == "left")
    for url in (servers["reranker"], servers["both"]):
        r = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "truncate": True,
                                  "truncation_direction": direction, "raw_scores": raw_scores})
        assert r.status_code == 200, r.text
        ranks = r.json()
        assert [x["index"] for x in ranks] == _tei_sorted(want)
        assert all(set(x) == {"index", "score"} for x in ranks)
        got = np.array([x["score"] for x in sorted(ranks, key=lambda x: x["index"])])
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
        if not raw_scores:
            assert ((got > 0) & (got < 1)).all()
    with_text = post(servers["reranker"], "/rerank", {"query": QUERY, "texts": TEXTS,
                                                      "truncate": True, "return_text": True})
    assert [x["text"] for x in with_text.json()] == [TEXTS[x["index"]] for x in with_text.json()]


def test_rerank_refusals(servers):
    url = servers["reranker"]
    # truncate=false (the default: no --auto-truncate) and a pair over the max input length:
    # TEI's tokenizer validation, 422 Validation.
    _error(post(url, "/rerank", {"query": QUERY, "texts": TEXTS}), 422, "Validation", "32")
    _error(post(url, "/rerank", {"query": QUERY, "texts": TEXTS[-1:], "truncate": False}), 422,
           "Validation", "maximum input length")
    _error(post(url, "/rerank", {"query": QUERY, "texts": []}), 400, "Empty",
           "`texts` cannot be empty")
    _error(post(url, "/rerank", {"query": QUERY, "texts": ["a"] * 9}), 422, "Validation",
           "batch size 9 > maximum allowed batch size 8")
    _error(post(url, "/rerank", {"query": 3, "texts": ["a"]}), 422, "Validation", "`query`")
    _error(post(url, "/rerank", {"query": "q", "texts": ["a", 1]}), 422, "Validation", "texts[1]")
    _error(post(url, "/rerank", {"query": "q", "texts": ["a"], "raw_scores": None}), 422,
           "Validation", "raw_scores")
    _error(post(url, "/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "up"}),
           422, "Validation", "truncation_direction")
    # A classifier (three labels) is not a re-ranker: TEI's 424 after the empty check.
    cls = servers["classifier"]
    _error(post(cls, "/rerank", {"query": "q", "texts": ["a"]}), 424, "Backend",
           "Backend error: model is not a re-ranker model")
    _error(post(cls, "/rerank", {"query": "q", "texts": []}), 400, "Empty", "`texts`")


# ---- /predict -----------------------------------------------------------------------------------

def _hf_single_logits(path: str, text: str) -> np.ndarray:
    """transformers' logits for one text (`[CLS] text [SEP]`), which sentence-transformers'
    predict (pairs only) does not take."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits[0].numpy()


def test_predict_one_pair_a_batch_and_one_text(servers, st_reranker, ce_dirs):
    url = servers["reranker"]
    pair = ["今天天气很好", "阳光明媚"]
    want = _st_scores(st_reranker, [tuple(pair)], raw=False)[0]
    r = post(url, "/predict", {"inputs": pair})
    assert r.status_code == 200 and len(r.json()) == 1, r.text
    assert r.json()[0]["label"] == "LABEL_0"
    np.testing.assert_allclose(r.json()[0]["score"], want, rtol=0, atol=TOL)
    # A batch of pairs and single texts: [[...]] in input order.
    single = "我喜欢吃苹果"
    batch = [pair, [single], [QUERY, TEXTS[-1]]]
    r = post(url, "/predict", {"inputs": batch, "raw_scores": True, "truncate": True})
    assert r.status_code == 200, r.text
    got = [p[0]["score"] for p in r.json()]
    raw = _st_scores(st_reranker, [tuple(pair), (QUERY, TEXTS[-1])], raw=True)
    np.testing.assert_allclose([got[0], got[2]], raw, rtol=0, atol=TOL)
    np.testing.assert_allclose(got[1], _hf_single_logits(ce_dirs["reranker"], single)[0],
                               rtol=0, atol=TOL)
    # One text, alone: a string or a list of one string.
    sig = 1 / (1 + np.exp(-got[1]))
    for inputs in (single, [single]):
        r = post(url, "/predict", {"inputs": inputs})
        assert r.status_code == 200 and len(r.json()) == 1, r.text
        np.testing.assert_allclose(r.json()[0]["score"], sig, rtol=0, atol=TOL)
    for bad, needle in (([], "empty"), (["a", "b", "c"], "3 strings"), ([["a"], "b"], "inputs[1]"),
                        ({"a": 1}, "`inputs`"), ([["a", 2]], "inputs[0][1]")):
        _error(post(url, "/predict", {"inputs": bad}), 422, "Validation", needle)
    _error(post(url, "/predict", {"inputs": [["a"]] * 9}), 422, "Validation", "batch size 9")
    _error(post(url, "/predict", {"inputs": [QUERY, TEXTS[-1]]}), 422, "Validation",
           "maximum input length")


@pytest.mark.parametrize("raw_scores", [False, True])
def test_predict_classifier_labels_and_softmax(servers, ce_dirs, raw_scores):
    """Three labels: softmax over them (or the logits), every label named from id2label, sorted
    highest first per input, as TEI."""
    ref = st.CrossEncoder(ce_dirs["classifier"])
    pairs = [("今天天气很好", "阳光明媚"), (QUERY, "明天可能会下雨")]
    want = _st_scores(ref, pairs, raw=True, apply_softmax=not raw_scores)  # [2, 3]
    r = post(servers["classifier"], "/predict", {"inputs": [list(p) for p in pairs],
                                                 "raw_scores": raw_scores})
    assert r.status_code == 200, r.text
    for row, preds in zip(want, r.json(), strict=True):
        assert [p["label"] for p in preds] == [LABELS[k] for k in _tei_sorted(row)]
        got = {p["label"]: p["score"] for p in preds}
        np.testing.assert_allclose([got[name] for name in LABELS], row, rtol=0, atol=TOL)
    if not raw_scores:
        assert abs(sum(p["score"] for p in r.json()[0]) - 1) < 1e-5


def test_huggingface_hub_text_classification_reads_predict(servers, ce_dirs, monkeypatch):
    """`InferenceClient.text_classification` posts `{"inputs": text}` to the URL it is given
    and reads TEI's /predict answer for one input: a list of {label, score}, of which it returns
    the first (TEI sorts it: the top label)."""
    hub = pytest.importorskip("huggingface_hub")
    # The tests' HF_HUB_OFFLINE blocks every request of huggingface_hub's session, this server's
    # on 127.0.0.1 included; the client reaches nothing else (its model is this URL).
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    text = "今天天气很好"
    logits = _hf_single_logits(ce_dirs["classifier"], text)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    client = hub.InferenceClient(model=servers["classifier"] + "/predict")
    out = client.text_classification(text)
    top = out[0] if isinstance(out, list) else out
    assert top.label == LABELS[int(np.argmax(probs))]
    np.testing.assert_allclose(top.score, probs.max(), rtol=0, atol=TOL)


# ---- routing: which model answers -------------------------------------------------------------

def test_reranker_alone_routes_as_tei(servers):
    url = servers["reranker"]
    _error(post(url, "/embed", {"inputs": "a"}), 424, "Backend",
           "Backend error: Model is not an embedding model")
    for path, body in (("/embed_all", {"inputs": "a"}),
                       ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}})):
        _error(post(url, path, body), 424, "Backend", "Model is not an embedding model")
    r = post(url, "/v1/embeddings", {"input": "a", "model": "x"})
    assert r.status_code == 424, r.text
    assert r.json()["message"] == "Backend error: Model is not an embedding model"
    assert r.json()["type"] == "Backend" and r.json()["code"] == 424
    # POST / and /invocations are /rerank on a reranker (TEI's router).
    ranked = httpx.post(url + "/", json={"query": QUERY, "texts": TEXTS[:3]}, timeout=60).json()
    assert sorted(x["index"] for x in ranked) == [0, 1, 2]
    # /vertex: a rerank instance reranks, any other is a /predict request (TEI's vertex route).
    vertex = httpx.post(url + "/vertex", json={"instances": [
        {"query": QUERY, "texts": ["天气"]}, {"inputs": "天气"}]}, timeout=60).json()
    assert [set(p[0]) for p in vertex["predictions"]] == [{"index", "score"}, {"label", "score"}]
    info = httpx.get(url + "/info").json()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"},
                                               "label2id": {"LABEL_0": 0}}}
    assert info["max_input_length"] == MAX_LEN and info["model_id"] == "tiny-rerank"
    toks = post(url, "/tokenize", {"inputs": "天气"}).json()  # the cross-encoder's tokenizer
    assert [t["text"] for t in toks[0]] == ["[CLS]", "天", "气", "[SEP]"]
    # A classifier alone: POST / is /predict.
    cls = servers["classifier"]
    preds = httpx.post(cls + "/invocations", json={"inputs": "天气"}, timeout=60).json()
    assert sorted(p["label"] for p in preds) == sorted(LABELS)
    assert set(httpx.get(cls + "/info").json()["model_type"]) == {"classifier"}


def test_embedder_and_reranker_in_one_server(servers, st_reranker):
    """/embed goes to the embedder, /rerank and /predict to the cross-encoder, concurrently
    through the one batcher; /info reports the embedder and names the reranker."""
    url, encoder = servers["both"], servers["encoder"]
    texts = ["那个人很开心", "天气不错", "我喜欢吃苹果"]
    want_emb = encoder.encode(texts, normalize=True)
    want_scores = _st_scores(st_reranker, [(QUERY, t) for t in texts], raw=False)

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            calls = []
            for _ in range(4):
                calls.append(client.post("/embed", json={"inputs": texts}))
                calls.append(client.post("/rerank", json={"query": QUERY, "texts": texts}))
            return await asyncio.gather(*calls)

    for r in asyncio.run(burst()):
        assert r.status_code == 200, r.text
        if r.request.url.path == "/embed":
            np.testing.assert_allclose(r.json(), want_emb, rtol=0, atol=TOL)
        else:
            got = np.array([x["score"] for x in sorted(r.json(), key=lambda x: x["index"])])
            np.testing.assert_allclose(got, want_scores, rtol=0, atol=TOL)
    root = httpx.post(url + "/", json={"inputs": texts[0]}, timeout=60).json()  # /embed here
    np.testing.assert_allclose(root, want_emb[:1], rtol=0, atol=TOL)
    info = httpx.get(url + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["rerank_model"]["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"},
                                                               "label2id": {"LABEL_0": 0}}}
    assert httpx.get(url + "/health").status_code == 200


# ---- the backend and the command ----------------------------------------------------------------

def test_launch_cuts_padding_rows_and_keeps_token_types(ce_dirs, st_reranker, one_device):
    """A round of three full rows is packed into four and cut to 2 + 1 rows (`trim_rows`); each
    part keeps its own rows' token types, so the logits stay sentence-transformers'."""
    from sbert_flax.inference.cross_encoder import CrossEncoder
    from sbert_flax.serving.rerank_backend import RerankBackend

    backend = RerankBackend(CrossEncoder(ce_dirs["reranker"], devices=one_device,
                                         max_batch_tokens=4 * MAX_LEN))
    pairs = [(QUERY + "吗" * k, TEXTS[-1]) for k in range(3)]  # each truncated to a full row
    items = backend.tokenize_pairs(pairs, truncate=True, direction="right")
    assert [len(x) for x in items] == [MAX_LEN] * 3
    assert all(x.token_types[0] == 0 and x.token_types[-1] == 1 for x in items)
    launched = backend.launch(items)
    assert [part.shape[0] for part, _ in launched.parts] == [2, 1]
    np.testing.assert_allclose(launched.result()[:, 0], _st_scores(st_reranker, pairs, raw=True),
                               rtol=0, atol=TOL)


def test_serve_command_detects_a_cross_encoder(ce_dirs, tiny_bert, tmp_path, st_reranker):
    """`serve --model R` serves a cross-encoder alone; `--rerank-model R` beside an embedder;
    a sentence-transformers CrossEncoder folder counts as one; the wrong pairings are refused."""
    import argparse

    from sbert_flax.cli.serve import add_arguments, load_models
    from sbert_flax.serving.rerank_backend import RerankBackend, is_cross_encoder_dir

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    st_dir = str(tmp_path / "st-cross-encoder")
    st_reranker.save(st_dir)
    assert is_cross_encoder_dir(st_dir) and not is_cross_encoder_dir(tiny_bert(pooling="mean"))
    encoder, reranker = load_models(parser.parse_args(["--model", st_dir,
                                                       "--max-input-length", "16"]))
    assert encoder is None and isinstance(reranker, RerankBackend)
    assert reranker.model_type == "reranker" and reranker.max_seq_length == 16
    encoder, reranker = load_models(parser.parse_args([
        "--model", tiny_bert(pooling="mean"), "--rerank-model", ce_dirs["classifier"]]))
    assert encoder.dim == 32 and reranker.model_type == "classifier" and reranker.labels == LABELS
    with pytest.raises(ValueError, match="is not a cross-encoder"):
        load_models(parser.parse_args(["--model", tiny_bert(pooling="mean"),
                                       "--rerank-model", tiny_bert(pooling="mean")]))
    with pytest.raises(ValueError, match="is a cross-encoder"):
        load_models(parser.parse_args(["--model", st_dir, "--rerank-model", st_dir]))
