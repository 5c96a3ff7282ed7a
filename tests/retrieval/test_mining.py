"""Hard-negative mining (`sbert_flax.retrieval.mining`): sentence-transformers' own `mine_hard_negatives` on
m3e-small gives the same negatives, its rules hold on a toy corpus, `sbert-flax mine-negatives`
writes the TSV atomically and refuses bad input, and `train --loss mnrl` trains on its n-tuples."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import sys
import types

import jax
import numpy as np
import pytest

from sbert_flax.cli import main as main_cli
from sbert_flax.common.devdata import data_path
from sbert_flax.retrieval.mining import iter_mined, read_pairs, write_tsv
from sbert_flax.util import mine_hard_negatives


class _CachedEncoder:
    """Encodes each text once: the mining options (and both libraries) share the embeddings."""

    def __init__(self, encode):
        self._encode, self._cache = encode, {}

    def encode(self, texts, **kwargs):
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            self._cache.update(zip(new, np.asarray(self._encode(new, **kwargs)), strict=True))
        return np.stack([self._cache[t] for t in texts])


# ---- sentence-transformers' own function, without `datasets` ------------------------------------
# `mine_hard_negatives` takes and returns a `datasets.Dataset`, and `datasets` (with pyarrow and
# pandas, ~60 MB) is not a test dependency. The function only reads column names and columns,
# counts rows per anchor (`to_pandas().groupby(anchor).count()`) and builds the output with
# `Dataset.from_dict`; this stand-in provides exactly that, so ST's real code runs unchanged.

class _Columns:
    def __init__(self, cols: dict[str, list]):
        self.cols = {k: list(v) for k, v in cols.items()}

    @classmethod
    def from_dict(cls, cols: dict[str, list]) -> _Columns:
        return cls(cols)

    @property
    def column_names(self) -> list[str]:
        return list(self.cols)

    def __len__(self) -> int:
        return len(next(iter(self.cols.values())))

    def __getitem__(self, name: str) -> list:
        return self.cols[name]

    def to_pandas(self) -> _Columns:
        return self

    def groupby(self, key: str) -> types.SimpleNamespace:
        counts = collections.Counter(self.cols[key])
        per = {k: counts[k] for k in sorted(counts)}  # pandas sorts the group keys
        table = {c: per for c in self.cols if c != key}
        return types.SimpleNamespace(count=lambda: types.SimpleNamespace(to_dict=lambda: table))


@contextlib.contextmanager
def _fake_datasets():
    import sentence_transformers.util.hard_negatives as hn

    mod = types.ModuleType("datasets")
    mod.Dataset = _Columns
    saved, saved_check = sys.modules.get("datasets"), hn.is_datasets_available
    sys.modules["datasets"] = mod  # only for the call: transformers probes the real one on import
    hn.is_datasets_available = lambda: True
    try:
        yield hn.mine_hard_negatives
    finally:
        hn.is_datasets_available = saved_check
        if saved is None:
            sys.modules.pop("datasets", None)
        else:
            sys.modules["datasets"] = saved


def _nli_pairs(n: int) -> tuple[list[str], list[str]]:
    path = data_path("contrastive", "nli-zh-pairs.tsv")
    if path is None:
        pytest.skip("shared/data/contrastive/nli-zh-pairs.tsv is absent")
    anchors, positives = read_pairs(path)
    return anchors[:n], positives[:n]


# The options, each filter and each output format.
ST_CASES = [  # range_max 50 where it is free: one search program serves those cases
    {},
    {"range_min": 10, "range_max": 50, "max_score": 0.9, "output_format": "n-tuple"},
    {"relative_margin": 0.05, "num_negatives": 5, "output_format": "n-tuple"},
    {"absolute_margin": 0.0, "min_score": 0.3, "range_max": 50, "output_format": "labeled-pair"},
    {"num_negatives": 4, "range_max": 50, "output_format": "labeled-list"},
    {"range_min": 5, "range_max": 50, "sampling_strategy": "random", "output_format": "n-tuple"},
]


class _EmbeddingsModel:
    """What sentence-transformers' function uses of a SentenceTransformer, answering with the
    embeddings of another encoder: both functions then mine on the same embeddings."""

    device = "cpu"

    def __init__(self, encoder: _CachedEncoder):
        self.encoder = encoder

    def encode_query(self, texts, **kwargs):
        return self.encoder.encode(texts, normalize=True)

    encode_document = encode_query

    def similarity(self, a, b):
        from sentence_transformers.util import cos_sim

        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        from sentence_transformers.util import pairwise_cos_sim

        return pairwise_cos_sim(a, b)


def _agreement(got: dict, ref: dict) -> tuple[int, int]:
    """(rows equal in every column, rows of the reference)."""
    rows = len(ref["anchor"])
    same = sum(all(got[c][r] == ref[c][r] for c in ref)
               for r in range(min(rows, len(got["anchor"]))))
    return same, rows


# The pair sets each case runs on: ordinary pairs; symmetric pairs, where every (a, p) is also a
# (p, a) row, so every anchor is in the corpus; and a corpus given with the anchors in it.
PAIR_SETS = ("ordinary", "symmetric", "corpus-with-anchors")


@pytest.mark.parametrize("pair_set", PAIR_SETS)
def test_same_negatives_as_sentence_transformers(m3e_dir, pair_set):
    """m3e-small embeddings of 200 nli-zh pairs (plus an anchor with two positives and a repeated
    pair), mined by sentence-transformers' own function and by ours: the same rows, in the same
    order, for every option, each sampling strategy and each output format ("random" included,
    under the same seed). Where the anchors are in the corpus (symmetric pairs; a corpus holding
    them) an anchor is never its own negative: sentence-transformers drops it and searches one
    candidate wider.

    Both mine the same embeddings (ours), so the test pins the mining and not the encoders;
    m3e-small's embeddings themselves equal sentence-transformers' (test_parity_real)."""
    pytest.importorskip("sentence_transformers")

    anchors, positives = _nli_pairs(200)
    # An anchor with two positives (and one pair twice): exercises the grouping and max_positives.
    anchors += [anchors[0], anchors[1], anchors[1]]
    positives += [positives[5], positives[7], positives[7]]
    extra: dict = {}
    if pair_set == "symmetric":
        anchors, positives = anchors + positives, positives + anchors
    elif pair_set == "corpus-with-anchors":
        extra = {"corpus": anchors[100:] + positives[:50]}
    ours = _m3e_encoder(m3e_dir)
    st = _EmbeddingsModel(ours)
    with _fake_datasets() as st_mine:
        for kw in ST_CASES:
            kw = {**kw, **extra}
            random.seed(7)  # ST samples with the global `random`; ours with Random(seed)
            ref = st_mine(_Columns({"anchor": anchors, "positive": positives}), st, verbose=False,
                          **kw).cols
            got = mine_hard_negatives(ours, anchors, positives, seed=7, **kw)
            assert list(got) == list(ref), kw
            same, rows = _agreement(got, ref)
            assert len(got["anchor"]) == rows and same == rows, (kw, same, rows)
            for r, a in enumerate(got["anchor"]):  # never the anchor as its own negative
                negs = [got[c][r] for c in got if c.startswith("negative")]
                if "label" in got and got["label"][r] == 0:
                    negs.append(got["positive"][r])
                if "labels" in got:
                    negs += got["positive"][r][1:]
                assert a not in negs, (kw, r, a)


@functools.cache
def _m3e_encoder(m3e_dir: str) -> _CachedEncoder:
    from sbert_flax.inference.encoder import SentenceEncoder

    return _CachedEncoder(SentenceEncoder.from_pretrained(m3e_dir, devices=jax.devices()[:1]).encode)


# ---- the rules, on a toy encoder whose scores are known ------------------------------------------

class _ToyEncoder:
    """Text "t<k>" embeds at angle k degrees: cosine order is |k - k'| order."""

    def encode(self, texts, normalize=True, **kwargs):
        ang = np.radians([float(t.split("/")[0][1:]) for t in texts])
        return np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)


def test_rules_on_a_toy_corpus():
    enc = _ToyEncoder()
    anchors = ["t0/a", "t50/a", "t50/a"]
    positives = ["t1", "t49", "t52"]
    corpus = ["t2", "t3", "t4", "t48", "t47", "t1", "t90"]
    out = mine_hard_negatives(enc, anchors, positives, corpus=corpus, num_negatives=2,
                              output_format="n-tuple")
    # Own positives are never negatives; the other anchor's positive may be one.
    assert out == {"anchor": ["t0/a", "t50/a", "t50/a"], "positive": ["t1", "t49", "t52"],
                   "negative_1": ["t2", "t48", "t48"], "negative_2": ["t3", "t47", "t47"]}
    # Corpus defaults to the deduplicated positives.
    out = mine_hard_negatives(enc, ["t0/a", "t10/a"], ["t1", "t9"], num_negatives=1)
    assert out == {"anchor": ["t0/a", "t10/a"], "positive": ["t1", "t9"], "negative": ["t9", "t1"]}
    # range_min skips the best survivors; max_score drops candidates first.
    out = mine_hard_negatives(enc, ["t0/a"], ["t1"], corpus=corpus, range_min=1, range_max=4,
                              num_negatives=1)
    assert out["negative"] == ["t3"]
    cos3 = float(np.cos(np.radians(3)))
    out = mine_hard_negatives(enc, ["t0/a"], ["t1"], corpus=corpus, max_score=cos3 + 1e-6,
                              num_negatives=2)
    assert out["negative"] == ["t3", "t4"]
    # absolute_margin 0: nothing closer to the anchor than its positive (t1, 2 degrees away):
    # t2, t3 and t4 go, t47 and t48 are the negatives.
    out = mine_hard_negatives(enc, ["t3/a"], ["t1"], corpus=corpus, absolute_margin=0.0,
                              num_negatives=2, output_format="labeled-pair")
    assert out == {"anchor": ["t3/a"] * 3, "positive": ["t1", "t47", "t48"], "label": [1, 0, 0]}
    # Too few candidates: n-tuple drops the row, triplet keeps what there is.
    kw = {"corpus": ["t2"], "num_negatives": 2, "range_max": 3}
    assert mine_hard_negatives(enc, ["t0/a"], ["t1"], output_format="n-tuple", **kw)["anchor"] == []
    assert mine_hard_negatives(enc, ["t0/a"], ["t1"], **kw)["negative"] == ["t2"]
    with pytest.raises(ValueError, match="range_min must be smaller"):
        mine_hard_negatives(enc, ["t0/a"], ["t1"], range_min=5, range_max=5)
    with pytest.raises(ValueError, match="2 anchors and 1 positives"):
        mine_hard_negatives(enc, ["t0/a", "t1/a"], ["t1"])
    with pytest.raises(ValueError, match="output_format"):
        mine_hard_negatives(enc, ["t0/a"], ["t1"], output_format="pairs")


# One range_max for all: one search width, so the cases share their compiled kernels.
@pytest.mark.parametrize("kw", [{"output_format": "triplet", "num_negatives": 3},
                                {"output_format": "labeled-list", "sampling_strategy": "random",
                                 "num_negatives": 3},
                                {"output_format": "labeled-pair", "absolute_margin": 0.001,
                                 "range_min": 2}])
def test_streamed_blocks_and_corpus_chunks_mine_the_same(tmp_path, kw):
    # Small blocks of anchors and a corpus read back from a scratch file 7 rows at a time give
    # what one block over the whole corpus in memory gives: ties across chunk borders (equal
    # angles under different texts) rank by lower corpus id either way.
    rng = np.random.default_rng(3)
    anchors = [f"t{k}/a{i}" for i, k in enumerate(rng.integers(0, 90, 40))]
    anchors += anchors[:5]  # repeated anchors: several positives
    positives = [f"t{k}/p{i}" for i, k in enumerate(rng.integers(0, 90, len(anchors)))]
    corpus = [f"t{k}/c{i}" for i, k in enumerate(rng.integers(0, 90, 60))]
    enc = _ToyEncoder()
    kw = {**kw, "range_max": 12}
    whole = mine_hard_negatives(enc, anchors, positives, corpus=corpus, seed=5, **kw)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    streamed = mine_hard_negatives(enc, anchors, positives, corpus=corpus, seed=5,
                                   anchors_per_block=6, corpus_chunk_size=7,
                                   scratch_dir=str(scratch), **kw)
    assert streamed == whole and len(whole["anchor"]) >= 40
    assert os.listdir(scratch) == []  # the scratch file is gone
    blocks = list(iter_mined(enc, anchors, positives, corpus=corpus, seed=5, anchors_per_block=6,
                             corpus_chunk_size=7, **kw))
    assert len(blocks) == 7 and all(list(b) == list(whole) for b in blocks)
    out = tmp_path / "mined.tsv"
    assert write_tsv(str(out), iter(blocks)) == len(whole["anchor"])
    assert out.read_text(encoding="utf-8").count("\n") == len(whole["anchor"]) + 1


def test_streamed_write_stops_on_a_late_bad_text_and_writes_nothing(tmp_path):
    good = {"anchor": ["a"], "positive": ["p"], "negative": ["n"]}
    bad = {"anchor": ["a"], "positive": ["p"], "negative": ["n\tx"]}
    out = tmp_path / "mined.tsv"
    with pytest.raises(ValueError, match="row 3, column 'negative'"):
        write_tsv(str(out), iter([good, good, bad]))
    assert os.listdir(tmp_path) == []


# ---- the command line, then training on its output ------------------------------------------------

def test_cli_mines_n_tuples_that_mnrl_trains_on(tmp_path, tiny_bert, capsys):
    from sbert_flax.training.train_config import TrainConfig
    from sbert_flax.training.trainer import Trainer

    model = tiny_bert(hidden=32, layers=1, heads=4, intermediate=64, max_position=64,
                      pooling="mean")
    rng = np.random.default_rng(0)
    chars = list("天地人你我他上下左右大小多少日月水火山石田土")
    sent = lambda: "".join(rng.choice(chars, int(rng.integers(3, 10))))  # noqa: E731
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"{sent()}\t{sent()}\n" for _ in range(40)),
                     encoding="utf-8")
    out = tmp_path / "mined.tsv"
    args = ["mine-negatives", "--model", model, "--input", str(pairs), "--output", str(out),
            "--num-negatives", "3", "--range-min", "1", "--range-max", "12", "--max-score", "0.999",
            "--sampling-strategy", "top", "--output-format", "n-tuple"]
    assert main_cli.main(args) == 0, capsys.readouterr().err
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "anchor\tpositive\tnegative_1\tnegative_2\tnegative_3"
    assert len(lines) > 30 and all(len(x.split("\t")) == 5 for x in lines[1:])
    for line in lines[1:]:  # never the anchor's own positive
        a, p, *negs = line.split("\t")
        assert p not in negs

    # Bad input stops with file:line and writes nothing.
    bad = tmp_path / "bad.tsv"
    bad.write_text("query\tanswer\nx\ty\n", encoding="utf-8")
    dest = tmp_path / "never.tsv"
    assert main_cli.main([*args[:4], str(bad), "--output", str(dest)]) == 2
    assert f"{bad}:1: header has no 'anchor' or 'positive' column" in capsys.readouterr().err
    bad.write_text("anchor\tpositive\nx\ty\nonly-one-field\n", encoding="utf-8")
    assert main_cli.main([*args[:4], str(bad), "--output", str(dest)]) == 2
    assert f"{bad}:3: expected 2 tab-separated fields" in capsys.readouterr().err
    assert not dest.exists() and not [p for p in os.listdir(tmp_path) if "never" in p]

    # `train --loss mnrl` reads the n-tuples as they are: three negative columns in every batch.
    run = tmp_path / "run"
    cfg = TrainConfig(pretrained_model_path=model, train_path=str(out), loss="mnrl", batch_size=8,
                      seq_length=32, epochs_num=1, max_steps=2, learning_rate=1e-3, export=False,
                      progress_bar=False, log_every_steps=1, output_dir=str(run))
    trainer = Trainer(cfg, devices=jax.devices()[:1])  # one device: sharding is proven elsewhere
    assert trainer.train_src.columns == ("anchor", "positive", "negative_1", "negative_2",
                                         "negative_3")
    batch = trainer.pipeline.builder(0)
    assert all(f"negative_{i}_row" in batch for i in (1, 2, 3))
    trainer.run()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
