"""sbert_flax.training.data: the UER pair TSV reader, tokenization and bucketed epoch batches."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from sbert_flax.devdata import data_path
from sbert_flax.tokenization import load_tokenizer
from sbert_flax.training.data import (
    NLI_LABELS,
    TRAIN_BUCKETS,
    DataError,
    PairData,
    TokenizedPairs,
    bucket_of,
    epoch_batches,
    eval_batches,
    iter_epoch_batches,
    read_pair_tsv,
    skip_batches,
    steps_per_epoch,
    tokenize_pairs,
)

BATCH_KEYS = {"a_ids", "a_mask", "b_ids", "b_mask", "labels", "weights"}


def write(tmp_path, text: str | bytes, name: str = "data.tsv") -> str:
    p = tmp_path / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return str(p)


def synthetic_pairs(n: int, seed: int = 0, max_len: int = 128) -> TokenizedPairs:
    """Pairs whose second token is 1000 + example index, so a batch row names its example."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for i in range(n):
        la, lb = rng.integers(3, max_len + 1, size=2)
        # Mostly short, like NLI, with a tail of long ones.
        if rng.random() < 0.7:
            la, lb = min(la, rng.integers(3, 33)), min(lb, rng.integers(3, 33))
        a.append(np.array([101, 1000 + i, *rng.integers(2000, 3000, la - 3), 102], np.int32))
        b.append(np.array([101, *rng.integers(2000, 3000, lb - 2), 102], np.int32))
    return TokenizedPairs(a=a, b=b, labels=(np.arange(n) % 3).astype(np.int32))


def row_examples(batch) -> np.ndarray:
    """Example index of each row (-1 for pad rows), read back from the synthetic ids."""
    return np.where(batch["weights"] > 0, batch["a_ids"][:, 1] - 1000, -1)


# ----------------------------------------------------------------------------------------------
# read_pair_tsv
# ----------------------------------------------------------------------------------------------


def test_reads_columns_by_name_in_any_order_with_extra_columns(tmp_path):
    path = write(tmp_path, "label\tid\ttext_b\ttext_a\n2\tx\tB1\tA1\n0\ty\tB2\tA2\n")
    d = read_pair_tsv(path)
    assert isinstance(d, PairData)
    assert d.text_a == ["A1", "A2"] and d.text_b == ["B1", "B2"]
    assert d.labels.dtype == np.int32 and d.labels.tolist() == [2, 0]
    assert d.num_labels == 3 and d.path == path and d.skipped_lines == () and len(d) == 2


def test_num_labels_given_and_empty_text_kept(tmp_path):
    path = write(tmp_path, "text_a\ttext_b\tlabel\n\tB\t1\nA\t\t0\n")
    d = read_pair_tsv(path, num_labels=5)
    assert d.num_labels == 5
    assert d.text_a == ["", "A"] and d.text_b == ["B", ""]


def test_bom_and_crlf(tmp_path):
    path = write(tmp_path, "\ufefftext_a\ttext_b\tlabel\r\n甲\t乙\t1\r\n丙\t丁\t0\r\n".encode())
    d = read_pair_tsv(path)
    assert d.text_a == ["甲", "丙"] and d.text_b == ["乙", "丁"] and d.labels.tolist() == [1, 0]


def test_unicode_line_separator_inside_text_is_not_a_line_break(tmp_path):
    path = write(tmp_path, "text_a\ttext_b\tlabel\n甲\u2028乙\t丙\x1c丁\t1\n")
    d = read_pair_tsv(path)
    assert d.text_a == ["甲\u2028乙"] and d.text_b == ["丙\x1c丁"]


BAD = ("text_a\ttext_b\tlabel\n"
       "ok\tok\t0\n"          # 2
       "short\t1\n"           # 3: field count
       "a\tb\tx\n"            # 4: not an integer
       "a\tb\t-1\n"           # 5: negative
       "\n"                   # 6: empty line
       "a\tb\t1\textra\n"     # 7: field count
       "a\tb\t1.0\n"          # 8: not an integer
       "fine\tfine\t2\n")     # 9


def test_malformed_lines_raise_with_locations_before_anything_else(tmp_path):
    path = write(tmp_path, BAD)
    with pytest.raises(DataError) as e:
        read_pair_tsv(path)
    msg = str(e.value)
    assert "6 malformed line(s)" in msg and "first 5 shown" in msg
    for line in (3, 4, 5, 6, 7):
        assert f"{path}:{line}:" in msg
    assert f"{path}:8:" not in msg  # only the first five are spelled out
    assert "skip_bad_lines" in msg
    assert "expected 3 tab-separated fields, got 2" in msg
    assert "negative label -1" in msg and "'x' is not an integer" in msg and "empty line" in msg


def test_skip_bad_lines_records_line_numbers(tmp_path):
    d = read_pair_tsv(write(tmp_path, BAD), skip_bad_lines=True)
    assert d.skipped_lines == (3, 4, 5, 6, 7, 8)
    assert d.text_a == ["ok", "fine"] and d.labels.tolist() == [0, 2] and d.num_labels == 3
    assert d.skipped_summary(first=2).endswith("skipped 6 malformed line(s), first: 3, 4, ...; kept 2")
    assert read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t0\n", "ok.tsv")).skipped_summary() == ""


def test_huge_label_is_malformed(tmp_path):
    with pytest.raises(DataError, match=r":2: label 99999999999 is too large"):
        read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t99999999999\n"))


def test_label_out_of_range_when_num_labels_given(tmp_path):
    path = write(tmp_path, "text_a\ttext_b\tlabel\na\tb\t0\na\tb\t3\n")
    assert read_pair_tsv(path).num_labels == 4
    with pytest.raises(DataError, match=r":3: label 3 >= num_labels 3"):
        read_pair_tsv(path, num_labels=3)
    assert read_pair_tsv(path, num_labels=3, skip_bad_lines=True).skipped_lines == (3,)


@pytest.mark.parametrize("text,missing", [
    ("text_a\tlabel\na\t1\n", "'text_b'"),
    ("sentence1\tsentence2\tscore\n", "'text_a', 'text_b', 'label'"),
])
def test_header_missing_column_names_file_and_column(tmp_path, text, missing):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match="has_header=False") as e:
        read_pair_tsv(path)
    assert path in str(e.value) and f"no {missing} column" in str(e.value)


def test_empty_file_missing_file_and_no_examples(tmp_path):
    with pytest.raises(DataError, match="empty file") as e:
        read_pair_tsv(write(tmp_path, ""))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="file not found"):
        read_pair_tsv(str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match="no examples"):
        read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\n"))
    with pytest.raises(DataError, match=r"no examples \(1 malformed"):
        read_pair_tsv(write(tmp_path, "text_a\ttext_b\tlabel\nx\n"), skip_bad_lines=True)


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, b"text_a\ttext_b\tlabel\na\tb\t0\n\xff\tb\t1\n")
    with pytest.raises(DataError, match=r"data.tsv:3: not valid UTF-8"):
        read_pair_tsv(path)


def test_headerless_with_label_names(tmp_path):
    path = write(tmp_path, "id1\tP1\tH1\tneutral\nid2\tP2\tH2\tcontradiction\nid3\tP3\tH3\tmaybe\n")
    with pytest.raises(DataError, match="columns="):
        read_pair_tsv(path, has_header=False)
    with pytest.raises(DataError, match=r":3: unknown label 'maybe'"):
        read_pair_tsv(path, has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS)
    d = read_pair_tsv(path, has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS,
                      skip_bad_lines=True)
    assert d.text_a == ["P1", "P2"] and d.text_b == ["H1", "H2"] and d.labels.tolist() == [1, 2]
    assert d.num_labels == 3  # from the names, although entailment never occurs
    assert d.skipped_lines == (3,)


def test_cnli_dev_raw_malformed_count():
    path = data_path("nli-zh", "cnli_dev_raw.txt")
    if path is None:
        pytest.skip("shared/data/nli-zh/cnli_dev_raw.txt is absent")
    # Independent count: a line is good iff it has exactly 4 tab-separated fields.
    with open(path, encoding="utf-8", newline="") as f:
        fields = [line.rstrip("\r\n").split("\t") for line in f]
    bad = [i for i, f in enumerate(fields, 1) if len(f) != 4]
    good = [f for f in fields if len(f) == 4]
    assert (len(fields), len(bad), len(good)) == (10000, 176, 9824)

    kw = dict(has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS)
    with pytest.raises(DataError, match="176 malformed line"):
        read_pair_tsv(path, **kw)
    d = read_pair_tsv(path, skip_bad_lines=True, **kw)
    assert len(d) == 9824 and list(d.skipped_lines) == bad and d.num_labels == 3
    assert d.skipped_summary() == (f"{path}: skipped 176 malformed line(s), first: "
                                   f"{', '.join(map(str, bad[:5]))}, ...; kept 9824")
    assert d.text_a == [f[1] for f in good] and d.text_b == [f[2] for f in good]
    assert d.labels.tolist() == [NLI_LABELS[f[3]] for f in good]


@pytest.mark.parametrize("split,rows", [("train", 19804), ("dev", 2950), ("test", 9824)])
def test_nli_tsv_splits(split, rows):
    path = data_path("nli-zh", f"{split}.tsv")
    if path is None:
        pytest.skip(f"shared/data/nli-zh/{split}.tsv is absent")
    d = read_pair_tsv(path)
    assert len(d) == rows and d.num_labels == 3 and d.skipped_lines == ()
    with open(path, encoding="utf-8") as f:
        next(f)
        want = collections.Counter(int(line.rstrip("\n").split("\t")[2]) for line in f)
    assert collections.Counter(d.labels.tolist()) == want


def test_cnli_test_tsv_is_the_good_raw_lines():
    raw, tsv = data_path("nli-zh", "cnli_dev_raw.txt"), data_path("nli-zh", "test.tsv")
    if raw is None or tsv is None:
        pytest.skip("shared/data/nli-zh files are absent")
    a = read_pair_tsv(raw, has_header=False, columns=(1, 2, 3), label_names=NLI_LABELS,
                      skip_bad_lines=True)
    b = read_pair_tsv(tsv)
    assert a.text_a == b.text_a and a.text_b == b.text_b
    np.testing.assert_array_equal(a.labels, b.labels)


# ----------------------------------------------------------------------------------------------
# tokenize_pairs
# ----------------------------------------------------------------------------------------------


def test_tokenize_pairs_each_side_alone(zh_vocab):
    tok = load_tokenizer(zh_vocab)
    d = PairData(text_a=["我喜欢北京。", "", "长" * 100], text_b=["今天天气很好", "你好", "短"],
                 labels=np.array([0, 1, 2], np.int32), num_labels=3, path="mem")
    p = tokenize_pairs(d, tok, seq_length=16)
    cls, sep = tok.hf.cls_token_id, tok.hf.sep_token_id
    for side, texts in ((p.a, d.text_a), (p.b, d.text_b)):
        for ids, want in zip(side, tok.encode(texts, 16), strict=True):
            assert ids.dtype == np.int32 and ids[0] == cls and ids[-1] == sep
            np.testing.assert_array_equal(ids, want)
    assert p.a[1].tolist() == [cls, sep]  # empty text -> [CLS] [SEP]
    assert len(p.a[2]) == 16  # truncated to seq_length, final [SEP] kept
    assert p.labels.tolist() == [0, 1, 2] and p.pad_id == tok.pad_id == 0
    assert p.lengths().tolist() == [max(len(x), len(y)) for x, y in zip(p.a, p.b, strict=True)]


def test_tokenize_real_nli_and_batch(zh_vocab):
    path = data_path("nli-zh", "dev.tsv")
    if path is None:
        pytest.skip("shared/data/nli-zh/dev.tsv is absent")
    d = read_pair_tsv(path)
    p = tokenize_pairs(d, load_tokenizer(zh_vocab), seq_length=64)
    assert len(p) == len(d) and max(map(len, p.a + p.b)) <= 64
    batches = epoch_batches(p, global_batch=32, seq_length=64, seed=0, epoch=0)
    assert len(batches) == steps_per_epoch(p, 32, 64)
    assert {b["a_ids"].shape for b in batches} <= {(32, 32), (32, 64)}
    assert sum(b["weights"].sum() for b in batches) == len(d)


# ----------------------------------------------------------------------------------------------
# epoch_batches / eval_batches
# ----------------------------------------------------------------------------------------------


def test_epoch_batches_cover_each_example_once_with_fixed_shapes():
    p = synthetic_pairs(300)
    batches = epoch_batches(p, global_batch=16, seq_length=128, seed=3, epoch=0)
    assert len(batches) == steps_per_epoch(p, 16, 128)
    seen = []
    for b in batches:
        assert set(b) == BATCH_KEYS
        rows, length = b["a_ids"].shape
        assert rows == 16 and length in TRAIN_BUCKETS
        for k in ("a_ids", "a_mask", "b_ids", "b_mask"):
            assert b[k].dtype == np.int32 and b[k].shape == (16, length)
        assert b["labels"].dtype == np.int32 and b["weights"].dtype == np.float32
        ex = row_examples(b)
        real = ex >= 0
        # Real rows first, pad rows after: ids/mask/label/weight all zero.
        assert np.all(np.diff(real.astype(int)) <= 0)
        pad = ~real
        assert not b["a_ids"][pad].any() and not b["a_mask"][pad].any()
        assert not b["b_ids"][pad].any() and not b["b_mask"][pad].any()
        assert not b["labels"][pad].any() and not b["weights"][pad].any()
        for r in np.flatnonzero(real):
            i = ex[r]
            la, lb = len(p.a[i]), len(p.b[i])
            assert length == bucket_of(max(la, lb), 128)  # smallest bucket that fits
            np.testing.assert_array_equal(b["a_ids"][r, :la], p.a[i])
            np.testing.assert_array_equal(b["b_ids"][r, :lb], p.b[i])
            assert b["a_mask"][r].sum() == la and b["b_mask"][r].sum() == lb
            assert not b["a_ids"][r, la:].any() and not b["b_ids"][r, lb:].any()
            assert b["labels"][r] == p.labels[i]
        seen.extend(ex[real].tolist())
    assert sorted(seen) == list(range(300))
    # At most one partial (padded) batch per bucket.
    partial = collections.Counter(b["a_ids"].shape[1] for b in batches if b["weights"].min() == 0)
    assert all(v == 1 for v in partial.values())


def test_epoch_batches_deterministic_per_seed_and_epoch():
    p = synthetic_pairs(200)

    def order(seed, epoch):
        bs = epoch_batches(p, global_batch=8, seq_length=128, seed=seed, epoch=epoch)
        return [row_examples(b).tolist() for b in bs]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    for seed, epoch in ((1, 0), (2, 5)):
        assert len(order(seed, epoch)) == steps_per_epoch(p, 8, 128)


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_slices_reassemble_the_global_batches(process_count):
    p = synthetic_pairs(150)
    kw = dict(global_batch=16, seq_length=128, seed=7, epoch=2)
    whole = epoch_batches(p, **kw)
    parts = [epoch_batches(p, process_index=i, process_count=process_count, **kw)
             for i in range(process_count)]
    assert all(len(part) == len(whole) for part in parts)
    for j, b in enumerate(whole):
        for k in b:
            assert all(part[j][k].shape[0] == 16 // process_count for part in parts)
            np.testing.assert_array_equal(np.concatenate([part[j][k] for part in parts]), b[k])


def test_process_errors():
    p = synthetic_pairs(10)
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        epoch_batches(p, global_batch=16, seq_length=128, seed=0, epoch=0, process_count=3)
    with pytest.raises(DataError, match="out of range"):
        eval_batches(p, global_batch=16, seq_length=128, process_index=2, process_count=2)


def test_unshuffled_keeps_order_within_buckets_and_sorts_buckets():
    p = synthetic_pairs(100)
    bs = epoch_batches(p, global_batch=8, seq_length=128, seed=0, epoch=0, shuffle=False)
    lengths = [b["a_ids"].shape[1] for b in bs]
    assert lengths == sorted(lengths)
    flat = np.concatenate([row_examples(b) for b in bs])
    by_bucket = collections.defaultdict(list)
    for i in flat[flat >= 0]:
        by_bucket[bucket_of(int(p.lengths()[i]), 128)].append(int(i))
    assert all(v == sorted(v) for v in by_bucket.values())
    # Independent of seed/epoch.
    again = epoch_batches(p, global_batch=8, seq_length=128, seed=9, epoch=4, shuffle=False)
    assert [row_examples(b).tolist() for b in again] == [row_examples(b).tolist() for b in bs]


def test_eval_batches_index_restores_order():
    p = synthetic_pairs(77)
    bs = eval_batches(p, global_batch=8, seq_length=128)
    assert len(bs) == steps_per_epoch(p, 8, 128)
    pred = np.full(77, -1)
    for b in bs:
        assert set(b) == BATCH_KEYS | {"index"} and b["index"].dtype == np.int32
        np.testing.assert_array_equal(b["index"], row_examples(b))
        keep = b["index"] >= 0
        pred[b["index"][keep]] = b["labels"][keep]
    np.testing.assert_array_equal(pred, p.labels)
    # Process slices carry the global example indices.
    parts = [eval_batches(p, global_batch=8, seq_length=128, process_index=i, process_count=2)
             for i in range(2)]
    for j, b in enumerate(bs):
        np.testing.assert_array_equal(np.concatenate([parts[0][j]["index"], parts[1][j]["index"]]),
                                      b["index"])


def test_buckets_capped_at_seq_length():
    p = synthetic_pairs(60, max_len=48)
    bs = epoch_batches(p, global_batch=8, seq_length=48, seed=0, epoch=0)
    assert {b["a_ids"].shape[1] for b in bs} <= {32, 48}
    q = synthetic_pairs(20, max_len=20)
    assert {b["a_ids"].shape[1] for b in eval_batches(q, global_batch=8, seq_length=20)} == {20}
    with pytest.raises(DataError, match="> seq_length 32"):
        epoch_batches(p, global_batch=8, seq_length=32, seed=0, epoch=0)


def test_steps_per_epoch_counts_partial_batches_per_bucket():
    # Lengths 3 (bucket 32) x5 and 40 (bucket 64) x3; batch 4 -> 2 + 1 batches.
    a = [np.arange(3, dtype=np.int32)] * 5 + [np.arange(40, dtype=np.int32)] * 3
    p = TokenizedPairs(a=a, b=[np.arange(3, dtype=np.int32)] * 8, labels=np.zeros(8, np.int32))
    assert steps_per_epoch(p, 4, 128) == 3
    assert steps_per_epoch(p, 8, 128) == 2
    assert steps_per_epoch(p, 1, 128) == 8


def test_skip_batches():
    assert skip_batches([1, 2, 3, 4], 3) == [4]
    assert skip_batches([1, 2], 5) == []
    assert list(skip_batches(iter(range(5)), 2)) == [2, 3, 4]
    with pytest.raises(ValueError):
        skip_batches([1], -1)


def test_iter_epoch_batches_is_epoch_batches_from_start():
    p = synthetic_pairs(90)
    kw = dict(global_batch=8, seq_length=128, seed=4, epoch=1, process_index=1, process_count=2)
    whole = epoch_batches(p, **kw)
    for start in (0, 3, len(whole), len(whole) + 2):
        lazy = list(iter_epoch_batches(p, start=start, **kw))
        assert len(lazy) == len(whole[start:])
        for x, y in zip(lazy, whole[start:], strict=True):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(DataError, match="not divisible"):  # raised at the call, not lazily
        iter_epoch_batches(p, global_batch=9, seq_length=128, seed=0, epoch=0, process_count=2)


def test_no_buckets_is_uer_batching():
    # buckets=() pads everything to seq_length: ceil(n / batch) batches, like UER-py's loader.
    p = synthetic_pairs(50)
    bs = epoch_batches(p, global_batch=8, seq_length=128, seed=0, epoch=0, buckets=())
    assert len(bs) == steps_per_epoch(p, 8, 128, buckets=()) == 7
    assert {b["a_ids"].shape for b in bs} == {(8, 128)}
    assert sum(b["weights"].sum() for b in bs) == 50
