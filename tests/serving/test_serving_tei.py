"""TEI parity of `sbert-flax serve`: every route text-embeddings-inference serves for a dense
embedding model, its request and response shapes and status codes, its Prometheus names, types
and labels, and OpenAI clients that send any model name.

One in-process server (uvicorn in a thread, real HTTP on 127.0.0.1) on a tiny random model; the
expected values come from the same encoder called directly.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time

import httpx
import numpy as np
import pytest
from test_serving import free_port
from test_serving_schemas import ALIASES, ROUTES, assert_tei_schema

# From TEI's source (huggingface/text-embeddings-inference: router/src/http/server.rs,
# router/src/lib.rs `ResponseMetadata::record_metrics`, core/src/infer.rs, core/src/queue.rs,
# core/src/tokenization.rs; buckets from router/src/prometheus.rs): name -> (type, label names).
TEI_METRICS = {
    "te_request_count": ("counter", {"method"}),
    "te_request_success": ("counter", {"method"}),
    "te_request_failure": ("counter", {"err"}),
    "te_request_duration": ("histogram", set()),
    "te_request_tokenization_duration": ("histogram", set()),
    "te_request_queue_duration": ("histogram", set()),
    "te_request_inference_duration": ("histogram", set()),
    "te_embed_count": ("counter", set()),
    "te_embed_success": ("counter", set()),
    "te_embed_duration": ("histogram", set()),
    "te_embed_tokenization_duration": ("histogram", set()),
    "te_embed_queue_duration": ("histogram", set()),
    "te_embed_inference_duration": ("histogram", set()),
    "te_request_input_length": ("histogram", set()),
    "te_batch_next_size": ("histogram", set()),
    "te_batch_next_tokens": ("histogram", set()),
    "te_queue_size": ("gauge", set()),
}
MAX_LEN = 32
DIM = 32


@pytest.fixture(scope="module")
def encoder(tiny_bert, one_device):
    from sbert_flax import SentenceEncoder
    from sbert_flax.models.prompts import Prompts

    # One compiled shape (1 row x 32 tokens): the warm-up compiles one program, /embed_all one.
    enc = SentenceEncoder.from_pretrained(tiny_bert(pooling="mean"), max_seq_length=MAX_LEN,
                                          devices=one_device, max_batch_tokens=MAX_LEN)
    enc.prompts = Prompts({"query": "查询："})
    return enc


@pytest.fixture(scope="module")
def url(encoder):
    import uvicorn

    from sbert_flax.serving import ServeSettings, create_app

    app = create_app(encoder, ServeSettings(model_id="tiny", served_model_name="tiny-zh",
                                            max_client_batch_size=8))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise TimeoutError("the in-process server did not turn healthy")
    yield base
    server.should_exit = True
    thread.join(30)


def post(url: str, path: str, body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _error(r: httpx.Response, status: int, error_type: str, needle: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert needle in body["error"], body


def scrape(url: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """(name -> TYPE, (sample name, labels) -> value) of GET /metrics."""
    types, samples = {}, {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
            assert m, line
            labels = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return types, samples


def test_embed_inputs_prompts_and_aliases(url, encoder):
    texts = ["那个人很开心", "天气不错"]
    want = encoder.encode(texts, normalize=True)
    single = post(url, "/embed", {"inputs": texts[0]}).json()
    assert np.allclose(single, want[:1], atol=1e-5)
    # Token ids as /tokenize gives them, alone and mixed with text: the same embeddings.
    ids = [[t["id"] for t in row] for row in post(url, "/tokenize", {"inputs": texts}).json()]
    assert np.allclose(post(url, "/embed", {"inputs": ids[0]}).json(), want[:1], atol=1e-5)
    mixed = post(url, "/embed", {"inputs": [ids[0], texts[1]]}).json()
    assert np.allclose(mixed, want, atol=1e-5)
    # prompt_name: the model's prompt, as encode(prompt_name=...).
    q = post(url, "/embed", {"inputs": texts, "prompt_name": "query", "normalize": False}).json()
    assert np.allclose(q, encoder.encode(texts, prompt_name="query"), atol=1e-5)
    _error(post(url, "/embed", {"inputs": "x", "prompt_name": "nope"}), 422, "Validation", "nope")
    # SageMaker's and the Inference API's names for /embed, and /health's aliases.
    for path in ("/", "/invocations"):
        assert np.allclose(post(url, path, {"inputs": texts}).json(), want, atol=1e-5)
    for path in ("/", "/ping"):
        assert httpx.get(url + path).status_code == 200
    # TEI's status codes: empty 400, too many or too long 422.
    _error(post(url, "/embed", {"inputs": []}), 400, "Empty")
    _error(post(url, "/embed", {"inputs": [[]]}), 400, "Empty", "inputs[0]")
    _error(post(url, "/embed", {"inputs": ["a"] * 9}), 422, "Validation", "batch size 9 > maximum")
    _error(post(url, "/embed", {"inputs": ["a", "很" * 40]}), 422, "Validation", "input 1 has 42")
    _error(post(url, "/embed", {"inputs": ["a", list(range(40))]}), 422, "Validation", "input 1")
    _error(post(url, "/embed", {"inputs": [[1, 10 ** 9]]}), 422, "Validation", "vocabulary")


def test_embed_all_is_encode_token_output(url, encoder):
    texts = ["那个人很开心", "好"]
    got = post(url, "/embed_all", {"inputs": texts}).json()
    want = encoder.encode(texts, output="token")
    assert [np.shape(g) for g in got] == [w.shape for w in want] == [(8, DIM), (3, DIM)]
    for g, w in zip(got, want, strict=True):
        assert np.allclose(g, w, atol=1e-5)
    one = post(url, "/embed_all", {"inputs": "好", "prompt_name": "query"}).json()
    assert np.allclose(one[0], encoder.encode(["好"], output="token", prompt_name="query")[0],
                       atol=1e-5)


def test_routes_a_dense_model_does_not_serve(url):
    """TEI answers these by model type: 424 "Backend" for a dense embedding model."""
    _error(post(url, "/embed_sparse", {"inputs": ["a"]}), 424, "Backend", "SPLADE")
    _error(post(url, "/embed_sparse", {"inputs": []}), 400, "Empty")  # checked first, as TEI
    _error(post(url, "/predict", {"inputs": ["a", "b"]}), 424, "Backend", "not a classifier")
    _error(post(url, "/rerank", {"query": "q", "texts": ["a"]}), 424, "Backend", "re-ranker")
    _error(post(url, "/rerank", {"query": "q", "texts": []}), 400, "Empty", "`texts`")


def test_decode_vertex_similarity_info(url, encoder):
    tokens = post(url, "/tokenize", {"inputs": "你好"}).json()[0]
    ids = [t["id"] for t in tokens]
    assert post(url, "/decode", {"ids": ids}).json() == ["你 好"]
    assert post(url, "/decode", {"ids": [ids, ids[1:2]], "skip_special_tokens": False}).json() \
        == ["[CLS] 你 好 [SEP]", "你"]
    _error(post(url, "/decode", {"ids": []}), 400, "Empty")
    # /tokenize with a prompt: the tokens of the text /embed embeds.
    prompted = post(url, "/tokenize", {"inputs": "好", "prompt_name": "query"}).json()[0]
    assert [t["id"] for t in prompted] == encoder.tokenize(["查询：好"])[0].tolist()
    vertex = post(url, "/vertex", {"instances": [{"inputs": "你好"}, {"inputs": ["a", "b"]}]})
    preds = vertex.json()["predictions"]
    assert np.allclose(preds[0], encoder.encode(["你好"], normalize=True), atol=1e-5)
    assert np.shape(preds[1]) == (2, DIM)
    sim = post(url, "/similarity", {"inputs": {"source_sentence": "你好", "sentences": ["a", "b"]},
                                    "parameters": {"prompt_name": "query"}}).json()
    e = encoder.encode(["你好", "a", "b"], prompt_name="query", normalize=True)
    assert np.allclose(sim, e[1:] @ e[0], atol=1e-5)
    info = httpx.get(url + "/info").json()
    tei_info = {"model_id", "model_sha", "model_dtype", "served_model_name", "model_type",
                "max_concurrent_requests", "max_input_length", "max_batch_tokens",
                "max_batch_requests", "max_client_batch_size", "auto_truncate",
                "tokenization_workers", "version", "sha", "docker_label"}
    assert tei_info <= set(info) and info["model_type"] == {"embedding": {"pooling": "mean"}}


def test_every_route_answers_in_tei_schemas(url):
    """The real model's answers on every route, good and refused, validate against TEI's
    published schemas (tests/serving/test_serving_schemas.py restates them)."""
    long = "很" * 40
    good = {"/embed": {"inputs": ["那个人很开心", [101, 872, 102]]},
            "/embed_all": {"inputs": ["那个人很开心", "好"]},
            "/similarity": {"inputs": {"source_sentence": "你好", "sentences": ["a", "b"]}},
            "/tokenize": {"inputs": ["你好", "ok"]}, "/decode": {"ids": [[101, 872, 102], [872]]},
            "/vertex": {"instances": [{"inputs": "你好"}]},
            "/v1/embeddings": {"input": ["你好"], "encoding_format": "base64"},
            "/embeddings": {"input": "你好"}, "/": {"inputs": "你好"},
            "/invocations": {"inputs": ["你好"]}}
    bad = [("/embed", {"inputs": []}), ("/embed", {"inputs": ["a"] * 9}),
           ("/embed", {"inputs": [long], "truncate": False}), ("/embed_all", {"inputs": {"a": 1}}),
           ("/similarity", {"inputs": {"source_sentence": "a"}}), ("/tokenize", {"inputs": 3}),
           ("/decode", {"ids": [[1, 10 ** 9]]}), ("/vertex", {"instances": [{"inputs": []}]}),
           ("/v1/embeddings", {"input": [long]}), ("/embeddings", {"input": []}),
           ("/embed_sparse", {"inputs": "a"}), ("/predict", {"inputs": "a"}),
           ("/rerank", {"query": "q", "texts": ["a"]}), ("/nope", {"inputs": "a"})]
    seen = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for path, body in good.items():
            seen.append(r := client.post(path, json=body))
            assert r.status_code == 200, (path, r.text)
        for path, body in bad:
            seen.append(r := client.post(path, json=body))
            assert 400 <= r.status_code < 500, (path, r.text)
        for path in ("/embed", "/v1/embeddings"):
            seen.append(r := client.post(path, content=b'{"inputs": [', headers={
                "content-type": "application/json"}))
            assert r.status_code == 400, (path, r.text)
            seen.append(r := client.get(path))
            assert r.status_code == 405, (path, r.text)
        for path in ("/info", "/health", "/", "/ping", "/metrics", "/v1/models"):
            seen.append(r := client.get(path))
            assert r.status_code == 200, (path, r.text)
    for r in seen:
        assert_tei_schema(r)
    assert set(ROUTES) | set(ALIASES) <= {(r.request.method, r.request.url.path) for r in seen}


def test_openai_sdk_any_model_name(url, encoder):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused")
    texts = ["那个人很开心", "天气不错"]
    # LangChain's OpenAIEmbeddings sends its own default name: accepted, as TEI does.
    res = client.embeddings.create(model="text-embedding-ada-002", input=texts)
    assert res.model == "tiny-zh" and [d.index for d in res.data] == [0, 1]
    assert np.allclose([d.embedding for d in res.data], encoder.encode(texts, normalize=True),
                       atol=1e-5)
    ids = client.embeddings.create(model="any", input=[[101, 872, 1962, 102]])
    assert len(ids.data[0].embedding) == DIM and ids.usage.prompt_tokens == 4


def test_strict_model_name_404(encoder):
    from openai import AsyncOpenAI, NotFoundError

    from sbert_flax.cli.serve import add_arguments, settings_from_args
    from sbert_flax.serving import ServeSettings, create_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--strict-model-name", "--served-model-name", "s"])
    assert settings_from_args(args).strict_model_name
    assert not settings_from_args(parser.parse_args(["--model", "m"])).strict_model_name

    # The name is checked before any work: no batcher needed (ASGI in-process, no lifespan).
    app = create_app(encoder, ServeSettings(served_model_name="tiny-zh", strict_model_name=True))

    async def call():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        client = AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http,
                             max_retries=0)
        with pytest.raises(NotFoundError, match="gpt-4") as e:
            await client.embeddings.create(model="gpt-4", input="a")
        # TEI's OpenAICompatErrorResponse on the OpenAI routes (`type` as TEI writes it,
        # `error_type` as its openapi.json names it).
        assert e.value.body == {"message": e.value.body["message"], "code": 404,
                                "type": "Validation", "error_type": "Validation"}
        await http.aclose()

    asyncio.run(call())


def test_metrics_are_tei_names_types_labels(url):
    before = scrape(url)[1]
    post(url, "/embed", {"inputs": "一"})
    post(url, "/embed", {"inputs": ["一", "二", "三"]})
    post(url, "/embed", {"inputs": ["a"] * 9})  # batch_size
    post(url, "/embed", {"inputs": 3})  # validation
    post(url, "/embed_sparse", {"inputs": "a"})  # model_type
    types, after = scrape(url)

    for name, (kind, labels) in TEI_METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))
        series = [k for k in after if k[0] == name or k[0].startswith(name + "_")]
        assert series, name
        for sample, pairs in series:
            names = {k for k, _ in pairs} - {"le"}
            assert names == labels or (not names and kind != "counter"), (sample, pairs)
    text = httpx.get(url + "/metrics").text
    assert "_total" not in text and "_created" not in text and "# HELP" not in text
    # Counts as the Rust exporter writes them: integers, no ".0".
    assert re.search(r'^te_request_count\{method="batch"\} [1-9][0-9]*$', text, re.M), text

    def delta(name: str, **labels) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    # Counted once the body parsed into TEI's types ({"inputs": 3} does not), failures too.
    assert delta("te_request_count", method="single") == 2
    assert delta("te_request_count", method="batch") == 2
    assert delta("te_request_success", method="single") == 1
    assert delta("te_request_success", method="batch") == 1
    assert delta("te_request_failure", err="batch_size") == 1
    assert delta("te_request_failure", err="validation") == 1
    assert delta("te_request_failure", err="model_type") == 1
    assert delta("te_embed_count") == 4 and delta("te_embed_success") == 4
    assert delta("te_request_duration_count") == 2
    assert delta("te_request_input_length_count") == 4

    # TEI's buckets (router/src/prometheus.rs).
    def bounds(name: str) -> list[float]:
        return sorted(float(dict(p)["le"]) for s, p in after if s == name + "_bucket"
                      and dict(p)["le"] != "+Inf")

    d = bounds("te_request_duration")
    assert len(d) == 35 and d[0] == pytest.approx(1.5e-5) and d[1] / d[0] == pytest.approx(1.5)
    assert bounds("te_batch_next_size") == [2.0 ** i for i in range(13)]
    assert bounds("te_batch_next_tokens") == [2.0 ** i for i in range(21)]
    assert bounds("te_request_input_length") == [1, 2, 4, 8, 16, 32]  # up to max input length


def test_huggingface_hub_inference_client(url, encoder, monkeypatch):
    """TEI's own Python client: `InferenceClient(model=<endpoint URL>)` posts /embed's body to the
    endpoint's root, which TEI (and this server) answers as /embed."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # conftest sets HF_HUB_OFFLINE=1, which also stops requests to 127.0.0.1; nothing here
    # reaches the Hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=url)
    got = client.feature_extraction("那个人很开心", prompt_name="query", normalize=False)
    want = encoder.encode(["那个人很开心"], prompt_name="query")
    assert np.allclose(got, want, atol=1e-5)
