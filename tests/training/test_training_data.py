"""sbert_flax.training.sources / pipeline / data: lazy files, formats, columns, malformed lines,
and the grain batch pipeline (plan, shards, resume, no-duplicates, length grouping)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from sbert_flax.common.devdata import data_path
from sbert_flax.models.tokenization import load_tokenizer
from sbert_flax.training.data import (
    NLI_LABELS,
    TRAIN_BUCKETS,
    BatchPlan,
    DataError,
    PipelineConfig,
    Schema,
    TrainPipeline,
    bucket_of,
    eval_batches,
    open_source,
    parse_columns,
    read_pair_tsv,
    schema_for,
    tokenize_pairs,
)
from sbert_flax.training.pipeline import BatchBuilder, no_duplicates_batches
from sbert_flax.training.sources import scan_lines

MNRL = schema_for("mnrl")


def write(tmp_path, text: str | bytes, name: str = "data.tsv") -> str:
    p = tmp_path / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return str(p)


class FakeTokenizer:
    """Whitespace words -> ids: a number is its own id, any other word is 7; [CLS]=101 [SEP]=102.

    Fast and transparent: row r of a batch names its record through the number in its text."""

    pad_id = 0

    def encode(self, texts, max_length):
        out = []
        for t in texts:
            ids = [int(w) if w.isdigit() else 7 for w in t.split()][: max_length - 2]
            out.append(np.asarray([101, *ids, 102], np.int32))
        return out


def write_pairs(tmp_path, n: int, seed: int = 0, max_words: int = 60, name: str = "pairs.tsv",
                dup_every: int = 0) -> str:
    """anchor = "<1000+i> w w ...", positive = "<5000+i> w ..."; every dup_every-th record reuses
    record 0's positive (a duplicate text)."""
    rng = np.random.default_rng(seed)
    lines = ["anchor\tpositive"]
    for i in range(n):
        la, lb = rng.integers(0, max_words, size=2)
        pos = f"{5000 + i} " + "w " * lb
        if dup_every and i % dup_every == 0:
            pos = "5000 same"
        lines.append(f"{1000 + i} " + "w " * la + "\t" + pos)
    return write(tmp_path, "\n".join(lines) + "\n", name)


def rows_of(batch) -> np.ndarray:
    """Record index of each row (-1 for pad rows), read back from the anchor ids."""
    return np.where(batch["weights"] > 0, batch["anchor_ids"][:, 1] - 1000, -1)


# ----------------------------------------------------------------------------------------------
# Reading: UER TSV (read_pair_tsv is the lazy source read eagerly)
# ----------------------------------------------------------------------------------------------


def test_reads_columns_by_name_in_any_order_with_extra_columns(tmp_path):
    path = write(tmp_path, "label\tid\ttext_b\ttext_a\n2\tx\tB1\tA1\n0\ty\tB2\tA2\n")
    d = read_pair_tsv(path)
    assert d.text_a == ["A1", "A2"] and d.text_b == ["B1", "B2"]
    assert d.labels.dtype == np.int32 and d.labels.tolist() == [2, 0]
    assert d.num_labels == 3 and d.path == path and d.skipped_lines == () and len(d) == 2


def test_num_labels_given_and_empty_text_kept(tmp_path):
    d = read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\n\tB\t1\nA\t\t0\n"), num_labels=5)
    assert d.num_labels == 5 and d.text_a == ["", "A"] and d.text_b == ["B", ""]


def test_bom_crlf_lone_cr_and_unicode_separators(tmp_path):
    path = write(tmp_path, "\ufefftext_a\ttext_b\tlabel\r\n甲\t乙\t1\r\n丙\t丁\t0\r戊\u2028己\t庚\x1c辛\t2".encode())
    d = read_pair_tsv(path)
    assert d.text_a == ["甲", "丙", "戊\u2028己"] and d.text_b == ["乙", "丁", "庚\x1c辛"]
    assert d.labels.tolist() == [1, 0, 2]


def test_scan_lines_across_chunk_boundaries(tmp_path, monkeypatch):
    from sbert_flax.training import sources

    monkeypatch.setattr(sources, "_CHUNK", 3)  # \r\n split across reads, long lines
    raw = b"ab\r\ncdefgh\rij\n\nklm"
    with open(write(tmp_path, raw, "x.txt"), "rb") as f:
        got = list(scan_lines(f))
    assert got == [(0, b"ab"), (4, b"cdefgh"), (11, b"ij"), (14, b""), (15, b"klm")]
    assert all(raw[o: o + len(t)] == t for o, t in got)


BAD = ("text_a\ttext_b\tlabel\n"
       "ok\tok\t0\n"          # 2
       "short\t1\n"           # 3: field count
       "a\tb\tx\n"            # 4: not an integer
       "a\tb\t-1\n"           # 5: negative
       "\n"                   # 6: empty line
       "a\tb\t1\textra\n"     # 7: field count
       "a\tb\t1.0\n"          # 8: not an integer
       "fine\tfine\t2\n")     # 9


def test_malformed_lines_raise_with_locations(tmp_path):
    path = write(tmp_path, BAD)
    with pytest.raises(DataError) as e:
        read_pair_tsv(path)
    msg = str(e.value)
    assert "6 malformed line(s)" in msg and "first 5 shown" in msg
    for line in (3, 4, 5, 6, 7):
        assert f"{path}:{line}:" in msg
    assert f"{path}:8:" not in msg and "skip_bad_lines" in msg
    assert "expected 3 tab-separated fields, got 2" in msg
    assert "negative label -1" in msg and "'x' is not an integer" in msg and "empty line" in msg


def test_skip_bad_lines_records_line_numbers(tmp_path):
    d = read_pair_tsv(write(tmp_path, BAD), skip_bad_lines=True)
    assert d.skipped_lines == (3, 4, 5, 6, 7, 8)
    assert d.text_a == ["ok", "fine"] and d.labels.tolist() == [0, 2] and d.num_labels == 3
    assert d.skipped_summary(first=2).endswith("skipped 6 malformed line(s), first: 3, 4, ...; kept 2")


def test_label_limits(tmp_path):
    with pytest.raises(DataError, match=r":2: label 99999999999 is too large"):
        read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t99999999999\n"))
    path = write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t0\na\tb\t3\n", "b.tsv")
    assert read_pair_tsv(path).num_labels == 4
    with pytest.raises(DataError, match=r":3: label 3 >= num_labels 3"):
        read_pair_tsv(path, num_labels=3)


@pytest.mark.parametrize("text,missing", [
    ("text_a\tlabel\na\t1\n", "'text_b'"),
    ("sentence1\tsentence2\tscore\n", "'text_a', 'text_b', 'label'"),
])
def test_header_missing_column_names_file_and_column(tmp_path, text, missing):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match="has_header=False") as e:
        read_pair_tsv(path)
    assert path in str(e.value) and f"no {missing} column" in str(e.value)


def test_empty_missing_no_examples_invalid_utf8(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_pair_tsv(write(tmp_path, ""))
    with pytest.raises(DataError, match="file not found"):
        read_pair_tsv(str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match="no examples"):
        read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\n"))
    with pytest.raises(DataError, match=r"data.tsv:3: not valid UTF-8"):
        read_pair_tsv(write(tmp_path, b"text_a\ttext_b\tlabel\na\tb\t0\n\xff\tb\t1\n"))


def test_headerless_index_form_with_label_names(tmp_path):
    path = write(tmp_path, "id1\tP1\tH1\tneutral\nid2\tP2\tH2\tcontradiction\nid3\tP3\tH3\tmaybe\n")
    with pytest.raises(DataError, match="columns="):
        read_pair_tsv(path, has_header=False)
    with pytest.raises(DataError, match=r":3: unknown label 'maybe'"):
        read_pair_tsv(path, has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS)
    d = read_pair_tsv(path, has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS,
                      skip_bad_lines=True)
    assert d.text_a == ["P1", "P2"] and d.text_b == ["H1", "H2"] and d.labels.tolist() == [1, 2]
    assert d.num_labels == 3 and d.skipped_lines == (3,)


def test_cnli_dev_raw_malformed_count():
    path = data_path("nli-zh", "cnli_dev_raw.txt")
    if path is None:
        pytest.skip("shared/data/nli-zh/cnli_dev_raw.txt is absent")
    with open(path, encoding="utf-8", newline="") as f:
        fields = [line.rstrip("\r\n").split("\t") for line in f]
    bad = [i for i, f in enumerate(fields, 1) if len(f) != 4]
    good = [f for f in fields if len(f) == 4]
    kw = dict(has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS)
    with pytest.raises(DataError, match="176 malformed line"):
        read_pair_tsv(path, **kw)
    d = read_pair_tsv(path, skip_bad_lines=True, **kw)
    assert len(d) == 9824 and list(d.skipped_lines) == bad and len(bad) == 176
    assert d.text_a == [f[1] for f in good] and d.text_b == [f[2] for f in good]
    assert d.labels.tolist() == [NLI_LABELS[f[3]] for f in good]


# ----------------------------------------------------------------------------------------------
# Formats and columns
# ----------------------------------------------------------------------------------------------


def test_contrastive_tsv_pairs_and_triplets(tmp_path):
    pairs = open_source(write(tmp_path, "anchor\tpositive\na1\tp1\na2\tp2\n"), MNRL)
    assert pairs.columns == ("anchor", "positive") and pairs.targets is None
    assert pairs[1].texts == {"anchor": "a2", "positive": "p2"}
    trip = open_source(write(tmp_path, "negative\tanchor\tpositive\nn1\ta1\tp1\n", "t.tsv"), MNRL)
    assert trip.columns == ("anchor", "positive", "negative")
    assert trip[0].texts == {"anchor": "a1", "positive": "p1", "negative": "n1"}


def test_cosent_headerless_named_columns_and_score_scale(tmp_path):
    path = write(tmp_path, "s one\ts two\t5\nx\ty\t2.5\nbad\tline\tnan\n")
    spec = parse_columns("sentence1,sentence2,score")
    src = open_source(path, schema_for("cosent"), has_header=False, columns=spec, score_scale=5,
                      skip_bad_lines=True)
    assert src.columns == ("sentence1", "sentence2") and src.skipped_lines == (3,)
    np.testing.assert_allclose(src.targets, [1.0, 0.5])
    assert src[0].texts == {"sentence1": "s one", "sentence2": "s two"}
    with pytest.raises(DataError, match=r"data.tsv:3: score 'nan' is not finite"):
        open_source(path, schema_for("cosent"), has_header=False, columns=spec)
    # The index form names the schema's columns in order.
    src = open_source(path, schema_for("cosent"), has_header=False, columns=parse_columns("1,0,2"),
                      skip_bad_lines=True)
    assert src[0].texts == {"sentence1": "s two", "sentence2": "s one"}


def test_csv_with_quotes_and_jsonl(tmp_path):
    csv_path = write(tmp_path, 'anchor,positive\n"a, with comma",p1\nplain,"q ""quoted"""\nshort\n',
                     "d.csv")
    with pytest.raises(DataError, match=r"d.csv:4: expected 2 comma-separated fields, got 1"):
        open_source(csv_path, MNRL)
    src = open_source(csv_path, MNRL, skip_bad_lines=True)
    assert src.format == "csv" and src[0].texts["anchor"] == "a, with comma"
    assert src[1].texts["positive"] == 'q "quoted"'
    rows = [{"anchor": "a1", "positive": "p1", "negative": "n1", "extra": 1},
            {"anchor": "a2", "positive": "p2", "negative": "n2"}]
    jl = write(tmp_path, "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
               + '\n{"anchor": "a3"}\n[1]\n{"anchor": 5, "positive": "p", "negative": "n"}\n', "d.jsonl")
    with pytest.raises(DataError) as e:
        open_source(jl, MNRL)
    msg = str(e.value)
    assert "3 malformed" in msg and "d.jsonl:3: no 'positive' key" in msg
    assert "d.jsonl:4: expected a JSON object" in msg and "d.jsonl:5: 'anchor' is int" in msg
    src = open_source(jl, MNRL, skip_bad_lines=True)
    assert src.format == "jsonl" and len(src) == 2 and src.columns == ("anchor", "positive", "negative")
    assert src[1].texts == {"anchor": "a2", "positive": "p2", "negative": "n2"}
    lab = write(tmp_path, '{"text_a": "x", "text_b": "y", "label": 2}\n'
                          '{"text_a": "x", "text_b": "y", "label": "1"}\n', "l.jsonl")
    assert open_source(lab, schema_for("softmax")).targets.tolist() == [2, 1]


def test_wrong_header_for_the_loss_says_what_it_needs(tmp_path):
    with pytest.raises(DataError, match=r"no 'anchor', 'positive' column .*reads anchor, positive, negative"):
        open_source(write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t1\n"), MNRL)
    with pytest.raises(DataError, match="all names or all field indices"):
        parse_columns("anchor,1")


def test_lazy_source_reads_records_from_disk(tmp_path):
    """The index holds offsets, not texts: rewriting a record in place changes what is read."""
    path = write_pairs(tmp_path, 2000, max_words=5)
    src = open_source(path, MNRL)
    assert len(src) == 2000 and not hasattr(src, "_texts")
    assert src[1234].texts["anchor"].split()[0] == "2234"
    raw = open(path, "rb").read()
    pos = raw.index(b"2234 ")
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(b"9999")
    assert src[1234].texts["anchor"].split()[0] == "9999"
    assert src[1233].texts["anchor"].split()[0] == "2233"


# ----------------------------------------------------------------------------------------------
# The plan and the pipeline
# ----------------------------------------------------------------------------------------------


def _pipe(path, **kw) -> TrainPipeline:
    src = open_source(path, MNRL, hash_texts=kw.pop("hash_texts", False))
    cfg = PipelineConfig(**{"global_batch": 16, "seq_length": 64, "seed": 3, "epochs": 2, **kw})
    return TrainPipeline(src, FakeTokenizer(), cfg)


def test_batches_cover_every_record_once_per_epoch_with_fixed_shapes(tmp_path):
    n = 150
    pipe = _pipe(write_pairs(tmp_path, n), epochs=2)
    assert pipe.steps_per_epoch == (10, 10) and pipe.total_steps == 20
    batches = list(pipe.iterator())
    assert len(batches) == 20
    for epoch in (batches[:10], batches[10:]):
        seen = []
        for b in epoch:
            assert set(b) == {"anchor_ids", "anchor_mask", "positive_ids", "positive_mask", "weights"}
            for k in ("anchor", "positive"):  # each column: the smallest bucket holding its longest
                rows, length = b[f"{k}_ids"].shape
                assert rows == 16 and length in TRAIN_BUCKETS and b[f"{k}_mask"].shape == (16, length)
                assert length == bucket_of(int(b[f"{k}_mask"].sum(1).max()), 64)
            real = b["weights"] > 0
            assert np.all(np.diff(real.astype(int)) <= 0)  # pads last: the empty sentence
            for k in ("anchor", "positive"):
                assert (b[f"{k}_ids"][~real, :2] == [101, 102]).all() and not b[f"{k}_ids"][~real, 2:].any()
                assert (b[f"{k}_mask"][~real].sum(1) == 2).all()
            ids = rows_of(b)
            np.testing.assert_array_equal(b["positive_ids"][real, 1], 5000 + ids[real])
            seen.extend(ids[real].tolist())
        assert sorted(seen) == list(range(n))
    # One partial batch per epoch (150 = 9 x 16 + 6), padded, never dropped.
    assert [int(b["weights"].sum()) for b in batches].count(6) == 2


def test_each_column_pads_to_its_own_bucket_unless_joint(tmp_path):
    # Long anchors (~40 tokens), short positives (2-4 tokens).
    lines = ["anchor\tpositive"] + [f"{1000 + i} " + "w " * 40 + f"\t{5000 + i} " + "p " * (i % 3)
                                    for i in range(32)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    own = next(iter(_pipe(path, epochs=1).iterator()))
    assert own["anchor_ids"].shape == (16, 48) and own["positive_ids"].shape == (16, 16)
    joint = next(iter(_pipe(path, epochs=1, joint_length=True).iterator()))
    assert joint["anchor_ids"].shape == joint["positive_ids"].shape == (16, 48)
    # The same tokens, only more padding.
    np.testing.assert_array_equal(joint["positive_ids"][:, :16], own["positive_ids"])
    assert not joint["positive_mask"][:, 16:].any()


@pytest.mark.parametrize("groups", [1, 4])
def test_packed_batches_hold_every_text_at_its_row_and_slot(tmp_path, groups):
    """Packing (the embedding losses' default) keeps each text whole at its (row, slot): the same
    tokens as the padded batch of the same step, positions restarting at 0, group k's texts in
    group k's rows (r * groups + k: GradCache's mini-batch k), row counts a multiple of
    lcm(8, row_multiple)."""
    path = write_pairs(tmp_path, 150)
    padded = list(_pipe(path, epochs=1).iterator())
    packed = list(_pipe(path, epochs=1, pack=True, pack_groups=groups, row_multiple=4).iterator())
    assert len(packed) == len(padded) == 10
    for p, b in zip(packed, padded, strict=True):
        assert set(p) == {"packed_ids", "packed_segments", "packed_positions", "anchor_row",
                          "anchor_slot", "positive_row", "positive_slot", "weights"}
        rows, length = p["packed_ids"].shape
        assert length == 64 and rows % (8 * groups) == 0
        np.testing.assert_array_equal(p["weights"], b["weights"])
        seg, pos = p["packed_segments"], p["packed_positions"]
        assert not p["packed_ids"][seg == 0].any() and not pos[seg == 0].any()
        for c in ("anchor", "positive"):
            for i in range(16):
                r, slot = p[f"{c}_row"][i], p[f"{c}_slot"][i]
                at = seg[r] == slot + 1
                want = b[f"{c}_ids"][i, : b[f"{c}_mask"][i].sum()]
                np.testing.assert_array_equal(p["packed_ids"][r, at], want)
                np.testing.assert_array_equal(pos[r, at], np.arange(len(want)))
                assert r % groups == i % groups
        assert seg.max() <= 16  # the slots of a 64-token row
    if groups == 1:  # fewer token slots than padding each column to its bucket
        assert (sum(p["packed_ids"].size for p in packed)
                < 0.8 * sum(b["anchor_ids"].size + b["positive_ids"].size for b in padded))


def test_packed_process_shards_split_rows_and_texts(tmp_path):
    path = write_pairs(tmp_path, 70)
    whole = list(_pipe(path, pack=True, row_multiple=2).iterator())
    parts = [list(_pipe(path, pack=True, row_multiple=2, process_index=i, process_count=2).iterator())
             for i in range(2)]
    for j, b in enumerate(whole):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([p[j][k] for p in parts]), b[k])
    with pytest.raises(DataError, match="must divide row_multiple"):
        PipelineConfig(global_batch=16, seq_length=64, pack=True, row_multiple=3, process_count=2)


def test_deterministic_by_seed_and_epoch(tmp_path):
    path = write_pairs(tmp_path, 100)

    def order(seed):
        return [rows_of(b).tolist() for b in _pipe(path, seed=seed).iterator()]

    a = order(1)
    assert a == order(1) and a != order(2)
    assert a[:7] != a[7:]  # each epoch its own permutation
    plan = BatchPlan(100, PipelineConfig(global_batch=16, seq_length=64, seed=1, epochs=2))
    np.testing.assert_array_equal(plan.records(8), np.asarray(a[8])[np.asarray(a[8]) >= 0])


def test_random_composition_by_default_and_group_by_length(tmp_path):
    # Half the records are short (bucket 16), half long (bucket 48), interleaved in the file.
    lines = ["anchor\tpositive"] + [f"{1000 + i} " + ("w " * (40 if i % 2 else 1)) + "\tp"
                                    for i in range(256)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    mixed = list(_pipe(path, epochs=1).iterator())
    # Random samples: (almost) every batch mixes both lengths, so pads to 48.
    assert sum(b["anchor_ids"].shape[1] == 48 for b in mixed) >= len(mixed) - 1
    assert all(0 < np.mean(rows_of(b) % 2) < 1 for b in mixed)
    grouped = _pipe(path, epochs=1, group_by_length=True)
    gb = list(grouped.iterator())
    assert all(np.mean(rows_of(b) % 2) in (0.0, 1.0) for b in gb)  # one length per batch
    assert collections.Counter(b["anchor_ids"].shape[1] for b in gb) == {16: 8, 48: 8}


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(tmp_path, process_count):
    path = write_pairs(tmp_path, 70)
    whole = list(_pipe(path).iterator())
    parts = [list(_pipe(path, process_index=i, process_count=process_count).iterator())
             for i in range(process_count)]
    for j, b in enumerate(whole):
        for k in b:
            assert all(p[j][k].shape[0] == 16 // process_count for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[j][k] for p in parts]), b[k])
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        PipelineConfig(global_batch=16, seq_length=64, process_count=3)


def test_resume_from_iterator_state_equals_uninterrupted(tmp_path):
    pipe = _pipe(write_pairs(tmp_path, 90), epochs=3)
    full = list(pipe.iterator())
    it = pipe.iterator()
    for _ in range(8):  # crosses the first epoch end (6 steps/epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    assert state == {"next_index": 8}
    rest = list(_pipe(pipe.source.path, epochs=3).iterator(state))
    assert len(rest) == len(full) - 8
    for x, y in zip(rest, full[8:], strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="does not fit"):
        pipe.iterator({"next_index": 999})


def test_iterator_state_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    pipe = _pipe(write_pairs(tmp_path, 90), epochs=1)
    it = pipe.iterator()
    next(it), next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ck"), item_names=("data",))
    mngr.save(2, args=ocp.args.Composite(data=pipe.checkpoint_item(it)))
    next(it)  # moving on does not change what was saved
    mngr.wait_until_finished()
    args, holder = pipe.restore_item()
    mngr.restore(2, args=ocp.args.Composite(data=args))
    assert holder.state == {"next_index": 2}
    mngr.close()


def test_max_steps_cuts_the_run(tmp_path):
    pipe = _pipe(write_pairs(tmp_path, 90), epochs=3, max_steps=4)
    assert pipe.total_steps == 4 and len(list(pipe.iterator())) == 4


def test_no_duplicates_batches(tmp_path):
    # Every 3rd record's positive is the same text: at most one of them per batch.
    pipe = _pipe(write_pairs(tmp_path, 64, dup_every=3), hash_texts=True, no_duplicates=True,
                 epochs=2)
    batches = list(pipe.iterator())
    assert len(batches) == sum(pipe.steps_per_epoch)
    for epoch_batches in (batches[: pipe.steps_per_epoch[0]], batches[pipe.steps_per_epoch[0]:]):
        seen = []
        for b in epoch_batches:
            ids = rows_of(b)
            real = ids[ids >= 0]
            assert np.sum(real % 3 == 0) <= 1
            seen.extend(real.tolist())
        assert sorted(seen) == list(range(64))
    # Without it, a random batch of 16 from 64 almost surely holds two of the 22 duplicates.
    plain = list(_pipe(pipe.source.path).iterator())
    assert any(np.sum(rows_of(b)[rows_of(b) >= 0] % 3 == 0) > 1 for b in plain)


def test_no_duplicates_matches_sentence_transformers_sampler():
    pytest.importorskip("sentence_transformers")
    import torch
    try:
        from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.sampler import NoDuplicatesBatchSampler

    rng = np.random.default_rng(0)
    texts = [f"t{int(x)}" for x in rng.integers(0, 40, size=(100, 2)).ravel()]

    class Rows:  # the part of a datasets.Dataset the sampler reads
        column_names = ["anchor", "positive"]

        def __len__(self):
            return 100

        def __getitem__(self, i):
            return {"anchor": texts[2 * i], "positive": texts[2 * i + 1]}

    ds = Rows()
    sampler = NoDuplicatesBatchSampler(ds, batch_size=8, drop_last=False, generator=torch.Generator(),
                                       seed=5)
    st = list(iter(sampler))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5)).numpy()
    from sbert_flax.training.sources import stable_hash

    hashes = np.asarray([[stable_hash(a), stable_hash(p)] for a, p in zip(texts[0::2], texts[1::2],
                                                                          strict=True)])
    ours = no_duplicates_batches(order, hashes, 8)
    assert [b.tolist() for b in ours] == st


def test_eval_batches_index_and_real_tokenizer(tmp_path, zh_vocab):
    tok = load_tokenizer(zh_vocab)
    path = write(tmp_path, "text_a\ttext_b\tlabel\n" + "".join(
        f"我喜欢北京{i}\t今天天气很好\t{i % 3}\n" for i in range(11)))
    src = open_source(path, schema_for("softmax"))
    bs = eval_batches(src, tok, global_batch=4, seq_length=16)
    assert len(bs) == 3
    idx = np.concatenate([b["index"] for b in bs])
    assert idx.tolist() == [*range(11), -1]
    labels = np.concatenate([b["labels"] for b in bs])[:11]
    assert labels.tolist() == [i % 3 for i in range(11)]
    want = tok.encode(["我喜欢北京0"], 16)[0]
    np.testing.assert_array_equal(bs[0]["text_a_ids"][0, : len(want)], want)
    assert bs[0]["text_a_ids"].shape == (4, 16) and bs[0]["text_a_mask"][0].sum() == len(want)
    d = read_pair_tsv(path)
    p = tokenize_pairs(d, tok, 16)
    np.testing.assert_array_equal(p.a[0], want)


def test_builder_pads_partial_global_batch_on_later_processes(tmp_path):
    src = open_source(write_pairs(tmp_path, 5), MNRL)
    cfg = PipelineConfig(global_batch=8, seq_length=64, process_index=1, process_count=2)
    b = BatchBuilder(src, FakeTokenizer(), cfg, with_index=True).build(np.arange(5))
    assert b["index"].tolist() == [4, -1, -1, -1] and b["weights"].tolist() == [1, 0, 0, 0]


def test_schema_is_checked():
    with pytest.raises(ValueError, match="target"):
        Schema(("a",), target="scores")
    with pytest.raises(ValueError, match="loss 'nope'"):
        schema_for("nope")


def test_every_loss_has_a_schema():
    # The loss names live in train_config.LOSSES alone; the column schemas are keyed by them.
    from sbert_flax.training.data import SCHEMAS
    from sbert_flax.training.train_config import LOSSES

    assert set(SCHEMAS) == set(LOSSES)
