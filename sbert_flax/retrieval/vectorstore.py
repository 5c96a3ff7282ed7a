"""A corpus in a vector database: Milvus, embedded (Milvus Lite) or a server, through one API.

`uri` says where: a local path ending in `.db` (`"./milvus.db"`) is Milvus Lite, embedded in this
process with nothing to start; `"http://host:19530"` (with `token` where the server wants one) is
a Milvus server or cluster. The same calls work on both, so a corpus uploaded to a file on a
laptop moves to a cluster by changing the URI.

A collection has three fields: `id` (INT64 primary key, no auto id: the 0-based line number of
the text, or the caller's `ids`), `vector` (FLOAT_VECTOR of the model's dim) and `text` (VARCHAR,
the full text when its UTF-8 fits Milvus' 65,535-byte limit, else cut there at a character
boundary, with a warning). The metric is COSINE: Milvus normalises both sides itself, so scores
equal `search.semantic_search`'s cosine scores whether or not the model (or the embeddings file)
normalises, and the default FLAT index is exact, so its top-k is the exact top-k.

The model that made the vectors is recorded in the collection's properties (`sbert_flax.*` keys):
properties are persisted by Milvus Lite and by the server alike and read back by
`describe_collection`, whereas Milvus Lite drops the collection description, and a metadata row
would be a point that searches could return. Uploading or searching with another model, dim,
pooling or normalisation is refused with an error naming both (`CollectionMismatch`).

Uploads are resumable: each batch first asks which of its ids the collection already holds
(`get`), encodes only the missing texts and upserts them, so re-running after a kill skips what
is there, re-encodes nothing twice and duplicates nothing. A stored row whose text differs from
the input's is refused: the collection was filled from another corpus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from sbert_flax.models.prompts import side_prompt_kwargs

logger = logging.getLogger(__name__)

ID, VECTOR, TEXT = "id", "vector", "text"
TEXT_MAX_BYTES = 65535  # Milvus' VARCHAR limit (the server counts UTF-8 bytes)
METRIC = "COSINE"
DEFAULT_INDEX = "FLAT"  # exact: Milvus' top-k equals `semantic_search`'s
MAX_WINDOW = 16384  # Milvus: most rows one query or search returns, most ids one `get` takes
QUERY_CHUNK = 1024  # queries per search request
PROPERTY_PREFIX = "sbert_flax."
INSTALL_HINT = 'pip install "sbert-flax[vectordb]"'


class CollectionMismatch(ValueError):
    """A collection holds vectors of another model (or was not made by sbert-flax)."""


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What made a collection's vectors, kept in its properties.

    Attributes:
      model: the model's name: a hub id, or the absolute path of a local folder.
      dim: vector dimension.
      pooling: "cls" | "mean" | "max".
      normalize: whether the model L2-normalises its embeddings.
      document_prompt: the text prepended to every uploaded document ("" for none).
    """

    model: str
    dim: int
    pooling: str
    normalize: bool
    document_prompt: str = ""

    @classmethod
    def of(cls, encoder: Any, document_prompt: str = "", model_name: str | None = None
           ) -> ModelRecord:
        """The record of `encoder` (`model_name` overrides the name it was loaded under)."""
        if model_name is None:
            loaded = getattr(encoder, "model", None)
            source = str(getattr(loaded, "source", "") or "")
            # "./m" and "/abs/m" are one model; a hub id stays as given.
            model_name = os.path.abspath(source) if source and os.path.exists(source) else source
        pooling = getattr(encoder, "pooling", None)
        return cls(model=model_name, dim=int(encoder.dim),
                   pooling=str(getattr(pooling, "mode", "")),
                   normalize=bool(getattr(pooling, "normalize", False)),
                   document_prompt=document_prompt)

    def to_properties(self) -> dict[str, str]:
        return {PROPERTY_PREFIX + "model": self.model, PROPERTY_PREFIX + "dim": str(self.dim),
                PROPERTY_PREFIX + "pooling": self.pooling,
                PROPERTY_PREFIX + "normalize": str(self.normalize).lower(),
                PROPERTY_PREFIX + "document_prompt": self.document_prompt}

    @classmethod
    def from_properties(cls, props: dict[str, Any]) -> ModelRecord | None:
        """The record in a collection's properties; None if it has none."""
        p = {k[len(PROPERTY_PREFIX):]: str(v) for k, v in props.items()
             if k.startswith(PROPERTY_PREFIX)}
        if "model" not in p or "dim" not in p:
            return None
        return cls(model=p["model"], dim=int(p["dim"]), pooling=p.get("pooling", ""),
                   normalize=p.get("normalize") == "true",
                   document_prompt=p.get("document_prompt", ""))

    def describe(self, prompt: bool = False) -> str:
        text = (f"model {self.model!r} (dim {self.dim}, pooling {self.pooling}, normalize "
                f"{str(self.normalize).lower()}")
        return text + (f", document prompt {self.document_prompt!r})" if prompt else ")")


def _pymilvus():
    """pymilvus, or a one-line hint naming the extra that installs it."""
    try:
        import pymilvus
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "pymilvus":
            raise
        raise ModuleNotFoundError(f"the vector database needs pymilvus, which is not installed: "
                                  f"{INSTALL_HINT}", name="pymilvus") from None
    return pymilvus


def is_local(uri: str) -> bool:
    """A Milvus Lite file (a path ending in `.db`) rather than a server URL."""
    return "://" not in uri and uri.endswith(".db")


@contextlib.contextmanager
def connect(uri: str, token: str | None = None) -> Iterator[Any]:
    """A `pymilvus.MilvusClient` for `uri`, closed on exit.

    For a Milvus Lite file the embedded server is stopped on exit too: it holds the file's lock,
    which another process (a resumed upload, the next command) needs. So do not hold another
    client of the same file open across this context in the same process.

    Raises:
      ModuleNotFoundError: pymilvus (or, for a `.db` path, milvus-lite) is not installed; the
        message says `pip install "sbert-flax[vectordb]"`.
      ValueError: `uri` is neither a `.db` path nor an http(s)/tcp/unix URL.
      FileNotFoundError: the folder of a `.db` path does not exist.
      ConnectionError: the server cannot be reached (names the URI).
    """
    pymilvus = _pymilvus()
    local = is_local(uri)
    if local:
        if importlib.util.find_spec("milvus_lite") is None:
            raise ModuleNotFoundError(f"a local database ({uri}) needs milvus-lite, which is not "
                                      f"installed: {INSTALL_HINT}", name="milvus_lite")
        folder = os.path.dirname(os.path.abspath(uri))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{uri}: the folder {folder} does not exist")
    elif not uri.startswith(("http://", "https://", "tcp://", "unix:")):
        raise ValueError(f"uri {uri!r}: expected a local file ending in .db (Milvus Lite) or a "
                         "server URL such as http://localhost:19530")
    try:
        # dedicated: close() really closes this client's channel (shared ones outlive it).
        client = pymilvus.MilvusClient(uri=uri, token=token or "", dedicated=True)
    except pymilvus.MilvusException as e:
        raise ConnectionError(f"cannot connect to Milvus at {uri}: {e}") from None
    try:
        yield client
    finally:
        client.close()
        if local:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def _not_unimplemented(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


@contextlib.contextmanager
def _quiet_unimplemented() -> Iterator[None]:
    """Drops grpc's traceback for an RPC that Milvus Lite does not implement: pymilvus calls
    AllocTimestamp while waiting for a new index and ignores "unimplemented", but the embedded
    server's grpc thread logs it as an error first."""
    log = logging.getLogger("grpc._server")
    log.addFilter(_not_unimplemented)
    try:
        yield
    finally:
        log.removeFilter(_not_unimplemented)


def _check_fields(desc: dict[str, Any], collection: str, uri: str) -> None:
    types = {f["name"]: f["type"].name for f in desc.get("fields", [])}
    want = {ID: "INT64", VECTOR: "FLOAT_VECTOR", TEXT: "VARCHAR"}
    if any(types.get(k) != v for k, v in want.items()):
        raise CollectionMismatch(f"collection {collection!r} at {uri} has fields {types}, not "
                                 f"{want}: it was not made by sbert-flax; use another collection")


def open_collection(client: Any, uri: str, collection: str, record: ModelRecord, *,
                    create: bool, check_prompt: bool = False, index_type: str = DEFAULT_INDEX,
                    index_params: dict[str, Any] | None = None) -> None:
    """Checks that `collection` holds vectors of `record`'s model (creating it if `create`).

    Args:
      client: from `connect`.
      uri: for messages.
      collection: the collection name.
      record: the model about to write or search.
      create: create a missing collection (FLAT or `index_type`, COSINE) recording `record`;
        without it a missing collection is an error.
      check_prompt: also require the same document prompt (an upload adds documents).
      index_type, index_params: the vector index of a new collection (an existing one keeps its
        own), e.g. "HNSW" with {"M": 16, "efConstruction": 200}.

    Raises:
      CollectionMismatch: another model, dim, pooling, normalisation (or prompt), or a collection
        that sbert-flax did not make; the message names the collection, both models and dims.
      ValueError: a missing collection and not `create`.
    """
    if not client.has_collection(collection):
        if not create:
            names = ", ".join(client.list_collections()) or "none"
            raise ValueError(f"collection {collection!r} not found at {uri} (collections there: "
                             f"{names}); upload a corpus first: sbert-flax upload --uri {uri} "
                             f"--collection {collection} --input FILE")
        pymilvus = _pymilvus()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=record.dim)
        schema.add_field(TEXT, pymilvus.DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
        index = client.prepare_index_params()
        index.add_index(VECTOR, index_type=index_type, metric_type=METRIC,
                        params=dict(index_params or {}))
        with _quiet_unimplemented():
            client.create_collection(collection, schema=schema, index_params=index,
                                     properties=record.to_properties(), consistency_level="Strong")
        return
    desc = client.describe_collection(collection)
    _check_fields(desc, collection, uri)
    have = ModelRecord.from_properties(desc.get("properties") or {})
    if have is None:
        raise CollectionMismatch(f"collection {collection!r} at {uri} records no sbert-flax model "
                                 "(no sbert_flax.* properties); use another collection")
    same = (have.model, have.dim, have.pooling, have.normalize) == \
        (record.model, record.dim, record.pooling, record.normalize)
    if not same or (check_prompt and have.document_prompt != record.document_prompt):
        doing = "add embeddings of" if check_prompt else "search it with"
        raise CollectionMismatch(
            f"collection {collection!r} at {uri} holds embeddings of "
            f"{have.describe(check_prompt)}; refusing to {doing} {record.describe(check_prompt)}: "
            "use what it records, or another collection (or drop this one to re-upload)")
    client.load_collection(collection)  # a no-op when loaded; a reopened Lite file needs it


@dataclasses.dataclass(frozen=True)
class UploadStats:
    """What one `upload` call did.

    Attributes:
      rows: input texts.
      written: rows this call upserted.
      encoded: texts this call embedded (0 with `embeddings=`).
      skipped: rows already in the collection (a resumed upload).
      truncated: texts stored cut to TEXT_MAX_BYTES.
    """

    rows: int
    written: int
    encoded: int
    skipped: int
    truncated: int


def fit_text(text: str) -> str:
    """`text`, cut at a character boundary to at most TEXT_MAX_BYTES of UTF-8."""
    raw = text.encode("utf-8")
    if len(raw) <= TEXT_MAX_BYTES:
        return text
    return raw[:TEXT_MAX_BYTES].decode("utf-8", "ignore")  # drops a split last character


def _stored_texts(client: Any, collection: str, keys: Sequence[int]) -> dict[int, str]:
    rows = client.get(collection, ids=list(keys), output_fields=[ID, TEXT])
    return {int(r[ID]): r[TEXT] for r in rows}


def upload(encoder: Any, texts: Iterable[str], uri: str, collection: str, *,
           token: str | None = None, batch_size: int = 512, ids: Sequence[int] | None = None,
           prompt_name: str | None = None, prompt: str | None = None,
           embeddings: str | None = None, progress: bool = True, model_name: str | None = None,
           encode_batch_size: int | None = None, index_type: str = DEFAULT_INDEX,
           index_params: dict[str, Any] | None = None) -> UploadStats:
    """Embeds `texts` and upserts them into `collection`, resuming where an earlier run stopped.

    Args:
      encoder: a `SentenceEncoder` (its name, dim, pooling are recorded in the collection).
      texts: the documents (a list, or any iterable: it is read one batch at a time).
      uri: a `.db` path (Milvus Lite) or a server URL (see the module docstring).
      collection: created on the first upload.
      token: the server's token ("user:password" or an API key).
      batch_size: rows per existence check and upsert (at most 16,384).
      ids: primary keys, one per text (default: 0, 1, 2, ... the line numbers).
      prompt_name, prompt: the documents' prompt; without them the model's "document" prompt,
        as sentence-transformers' `encode_document`. With `embeddings`, the prompt they were
        encoded with (it is recorded, not applied).
      embeddings: what `sbert-flax encode` wrote (a `.npy`, or the path whose sharded manifest
        exists): its rows are uploaded instead of encoding; one row per text.
      progress: a tqdm bar in texts.
      model_name: the name to record instead of the encoder's own (e.g. a model moved on disk).
      encode_batch_size: `encode`'s batch_size.
      index_type, index_params: the vector index of a new collection (default FLAT, exact).

    Returns:
      `UploadStats`.

    Raises:
      CollectionMismatch: the collection holds another model's vectors (see `open_collection`).
      ValueError: a stored row's text differs from the input's (another corpus), the embeddings
        file's rows or dim do not match, or `ids` are not one unique int per text.
    """
    from sbert_flax.inference.embeddings_file import load_embeddings

    if not 1 <= batch_size <= MAX_WINDOW:
        raise ValueError(f"batch_size={batch_size}: expected 1..{MAX_WINDOW}")
    n = len(texts) if isinstance(texts, Sequence) else None
    if ids is not None:
        ids = [int(i) for i in ids]
        if n is not None and len(ids) != n:
            raise ValueError(f"ids: {len(ids)} given for {n} texts; expected one per text")
        if len(set(ids)) != len(ids):
            raise ValueError("ids: not unique; each text needs its own primary key")
    kwargs = side_prompt_kwargs(encoder, "document", prompt, prompt_name)
    prompts = getattr(encoder, "prompts", None)
    doc_prompt = prompts.resolve(**kwargs) if prompts is not None else (prompt or "")
    record = ModelRecord.of(encoder, doc_prompt, model_name)
    emb = None
    if embeddings is not None:
        emb = load_embeddings(embeddings)
        if emb.ndim != 2 or emb.shape[1] != record.dim:
            raise ValueError(f"{embeddings}: embeddings of shape {emb.shape}, but the model's dim "
                             f"is {record.dim}")
        if n is not None and len(emb) != n:
            raise ValueError(f"{embeddings}: holds {len(emb)} rows, but the input has {n} texts; "
                             "encode this input again (one row per line)")
        n = len(emb) if n is None else n

    from tqdm.auto import tqdm

    written = encoded = skipped = truncated = 0
    it = iter(texts)
    with connect(uri, token) as client, \
            tqdm(total=n, unit="text", desc=f"upload {collection}", disable=not progress) as bar:
        open_collection(client, uri, collection, record, create=True, check_prompt=True,
                        index_type=index_type, index_params=index_params)
        start = 0
        while chunk := list(itertools.islice(it, batch_size)):
            end = start + len(chunk)
            if emb is not None and end > len(emb):
                raise ValueError(f"{embeddings}: holds {len(emb)} rows, but the input has more "
                                 f"texts (text {len(emb)} has no row)")
            if ids is not None and end > len(ids):
                raise ValueError(f"ids: {len(ids)} given, but the input has more texts")
            keys = ids[start:end] if ids is not None else list(range(start, end))
            cut = [fit_text(t) for t in chunk]
            truncated += sum(c is not t for c, t in zip(cut, chunk, strict=True))
            stored = _stored_texts(client, collection, keys)
            for j, k in enumerate(keys):
                if k in stored and stored[k] != cut[j]:
                    raise ValueError(
                        f"collection {collection!r} at {uri}: id {k} holds {stored[k][:40]!r}, "
                        f"but input text {start + j} (line {start + j + 1}) is "
                        f"{cut[j][:40]!r}: the collection was filled from another corpus; "
                        "upload into another collection")
            todo = [j for j, k in enumerate(keys) if k not in stored]
            if todo:
                if emb is not None:
                    vecs = np.asarray(emb[start + np.asarray(todo)], np.float32)
                else:
                    vecs = np.asarray(encoder.encode([chunk[j] for j in todo], prompt=doc_prompt,
                                                     batch_size=encode_batch_size), np.float32)
                    encoded += len(todo)
                client.upsert(collection, [{ID: keys[j], VECTOR: v.tolist(), TEXT: cut[j]}
                                           for j, v in zip(todo, vecs, strict=True)])
            written += len(todo)
            skipped += len(keys) - len(todo)
            bar.update(len(chunk))
            start = end
        if emb is not None and start != len(emb):
            raise ValueError(f"{embeddings}: holds {len(emb)} rows, but the input has {start} "
                             "texts; encode this input again (one row per line)")
        client.flush(collection)
    if truncated:
        logger.warning("%d of %d texts were longer than %d bytes of UTF-8: stored cut to that "
                       "(their vectors embed the whole text, up to the model's max_seq_length)",
                       truncated, start, TEXT_MAX_BYTES)
    return UploadStats(rows=start, written=written, encoded=encoded, skipped=skipped,
                       truncated=truncated)


def search_vectors(client: Any, collection: str, query_embeddings: Any, top_k: int = 10, *,
                   with_text: bool = True, search_params: dict[str, Any] | None = None
                   ) -> list[list[dict[str, Any]]]:
    """Top-k of each query vector in an open, checked collection (see `search`)."""
    if not 1 <= top_k <= MAX_WINDOW:
        raise ValueError(f"top_k={top_k}: expected 1..{MAX_WINDOW}")
    q = np.asarray(query_embeddings, np.float32)
    q = q[None] if q.ndim == 1 else q
    params = {"metric_type": METRIC, "params": dict(search_params or {})}
    out: list[list[dict[str, Any]]] = []
    for s in range(0, len(q), QUERY_CHUNK):
        res = client.search(collection, data=q[s:s + QUERY_CHUNK].tolist(), limit=top_k,
                            output_fields=[TEXT] if with_text else [], search_params=params,
                            consistency_level="Strong")
        for hits in res:
            rows = [{"corpus_id": int(h[ID]), "score": float(h["distance"]),
                     **({"text": h["entity"][TEXT]} if with_text else {})} for h in hits]
            # As semantic_search: score descending, equal scores by ascending id.
            out.append(sorted(rows, key=lambda r: (-r["score"], r["corpus_id"])))
    return out


def search(encoder: Any, queries: Sequence[str], uri: str, collection: str, top_k: int = 10, *,
           token: str | None = None, prompt_name: str | None = None, prompt: str | None = None,
           batch_size: int | None = None, with_text: bool = True, model_name: str | None = None,
           search_params: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
    """The top-k documents of `collection` for each query, as `search.semantic_search`.

    Args:
      encoder: the model the collection was uploaded with (checked against its record).
      queries: the query texts.
      uri, collection, token: as `upload`.
      top_k: results per query (at most 16,384).
      prompt_name, prompt: the queries' prompt; without them the model's "query" prompt, as
        sentence-transformers' `encode_query`.
      batch_size: `encode`'s batch_size.
      with_text: add each hit's stored text.
      model_name: as `upload`'s.
      search_params: index search parameters (e.g. {"ef": 64} for HNSW; none for FLAT).

    Returns:
      Per query, `[{"corpus_id": int, "score": float, "text": str}, ...]`, score descending
      (cosine), equal scores by ascending id. With FLAT this is the exact top-k, except that
      which of several equal scores straddling the cut Milvus keeps is its own choice.
    """
    queries = list(queries)
    with connect(uri, token) as client:
        open_collection(client, uri, collection, ModelRecord.of(encoder, model_name=model_name),
                        create=False)
        q = encoder.encode(queries, batch_size=batch_size,
                           **side_prompt_kwargs(encoder, "query", prompt, prompt_name))
        return search_vectors(client, collection, q, top_k, with_text=with_text,
                              search_params=search_params)


def count_rows(uri: str, collection: str, token: str | None = None) -> int:
    """Rows in `collection` (an exact count, not the server's lagging statistics)."""
    with connect(uri, token) as client:
        client.load_collection(collection)  # a reopened Milvus Lite file starts released
        res = client.query(collection, filter="", output_fields=["count(*)"],
                           consistency_level="Strong")
        return int(res[0]["count(*)"])
