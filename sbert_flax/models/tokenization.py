"""Host-side tokenization (the model's own HF fast tokenizer) and length bucketing.

Nothing here runs under jit: text -> numpy ids on the host, then fixed-shape padded batches go to
the device. Length buckets bound the number of compiled shapes of padded training batches
(inference packs sentences instead: `packing.py`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import operator
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import tokenizers

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def bucket_lengths(max_seq_length: int, buckets: Sequence[int]) -> tuple[int, ...]:
    """The buckets not longer than `max_seq_length`, which is always the last bucket."""
    out = [b for b in buckets if b < max_seq_length]
    return (*out, max_seq_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length (buckets sorted ascending; length <= buckets[-1])."""
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The token ids of n texts in one flat buffer: text i is `flat[offsets[i]:offsets[i + 1]]`.

    One int32 buffer instead of n small arrays: packing gathers from it in a few vectorised
    numpy calls (`packing.Packer.pack`), and building it costs no per-text array.

    Attributes:
      flat: int32 [total tokens].
      offsets: int64 [n + 1], ascending, offsets[0] == 0.
    """

    flat: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n], tokens per text."""
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_arrays(cls, seqs: Sequence[np.ndarray]) -> TokenIds:
        """The flat form of a list of id arrays (copies them into one buffer)."""
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, seqs), np.int64, len(seqs)), out=offsets[1:])
        flat = np.concatenate(seqs).astype(np.int32, copy=False) if len(seqs) else np.zeros(0, np.int32)
        return cls(flat, offsets)


_IDS = operator.attrgetter("ids")
# Texts per `encode_batch` call in `encode_ids`: enough to spread over the tokenizers library's
# thread pool, few enough that the GIL-holding conversions around each call take a few ms.
TOKENIZE_CHUNK = 2048


class Tokenizer:
    """Wraps a `transformers` fast tokenizer: texts -> lists of token ids with [CLS]/[SEP].

    Thread-safe: `encode` never changes shared state. Calling the HF tokenizer sets truncation and
    padding on its Rust backend every time (and `truncation_side` on the Python object), so two
    threads asking for different sides or lengths could each get the other's. Instead each
    (max_length, side) gets its own copy of the Rust tokenizer, configured once when it is first
    asked for and only read after that; `tokenizers.Tokenizer.encode_batch` on one object from
    several threads is safe. The copies are taken from `hf_tokenizer` as it is at construction.

    Args:
      hf_tokenizer: a `PreTrainedTokenizerFast`.
      lowercase_text: lowercase the text before tokenizing (sentence-transformers'
        `do_lower_case` in sentence_bert_config.json; distinct from the tokenizer's own flag).
    """

    # Distinct (max_length, side) settings kept; more than this are built per call, uncached
    # (callers use a handful: the model's length, a server's input limit, two sides).
    MAX_CACHED_BACKENDS = 32

    def __init__(self, hf_tokenizer, lowercase_text: bool = False):
        self.hf = hf_tokenizer
        self.lowercase_text = lowercase_text
        self.pad_id = int(hf_tokenizer.pad_token_id or 0)
        self.chunk = TOKENIZE_CHUNK  # texts per encode_batch call in `encode_ids`
        self._spec = hf_tokenizer.backend_tokenizer.to_str()
        self._backends: dict[tuple[int | None, str], tokenizers.Tokenizer] = {}
        self._backends_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Locks do not pickle; the backend copies are rebuilt on demand.
        state = dict(self.__dict__)
        del state["_backends_lock"], state["_backends"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._backends = {}
        self._backends_lock = threading.Lock()

    @property
    def model_max_length(self) -> int:
        return int(getattr(self.hf, "model_max_length", 512) or 512)

    def _backend(self, max_length: int | None, side: str) -> tokenizers.Tokenizer:
        """The Rust tokenizer that truncates to `max_length` on `side` (None: never)."""
        key = (max_length, side if max_length is not None else "right")
        backend = self._backends.get(key)
        if backend is not None:
            return backend
        with self._backends_lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = tokenizers.Tokenizer.from_str(self._spec)
                backend.no_padding()
                if max_length is None:
                    backend.no_truncation()
                else:
                    # What `PreTrainedTokenizerFast.set_truncation_and_padding` sets for
                    # truncation="longest_first" (stride 0).
                    backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                              direction=side)
                if len(self._backends) < self.MAX_CACHED_BACKENDS:
                    self._backends[key] = backend
        return backend

    def encode(self, texts: Sequence[str], max_length: int | None,
               truncation_side: str = "right") -> list[np.ndarray]:
        """Token ids per text (int32) with [CLS]/[SEP]; safe to call from several threads.

        Args:
          texts: the texts.
          max_length: truncate to this many tokens, keeping [CLS] and the final [SEP]; None
            does not truncate.
          truncation_side: "right" drops the end of a long text, "left" its start (TEI's
            `truncation_direction`).
        """
        return [np.asarray(e.ids, dtype=np.int32) for e in self._encodings(texts, max_length, truncation_side)]

    def encode_ids(self, texts: Sequence[str], max_length: int | None,
                   truncation_side: str = "right") -> TokenIds:
        """The ids of `encode`, in one flat buffer (`TokenIds`); safe from several threads.

        What the packed encode path reads: no per-text numpy array is built, and packing
        gathers from the flat buffer in a few vectorised calls.
        """
        if len(texts) > self.chunk:
            # In pieces: each piece's conversions to and from Python objects (encode_batch's
            # arguments and results, the id lists) hold the GIL in one stretch, and a whole
            # window's (tens of ms) would stall the thread dispatching to the devices.
            parts = [self.encode_ids(texts[i:i + self.chunk], max_length, truncation_side)
                     for i in range(0, len(texts), self.chunk)]
            sizes = np.concatenate([p.lengths for p in parts])
            offsets = np.zeros(len(sizes) + 1, np.int64)
            np.cumsum(sizes, out=offsets[1:])
            return TokenIds(np.concatenate([p.flat for p in parts]), offsets)
        encodings = self._encodings(texts, max_length, truncation_side)
        lists = list(map(_IDS, encodings))  # the one conversion the Rust side leaves to Python
        offsets = np.zeros(len(lists) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, lists), np.int64, len(lists)), out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(offsets[-1]))
        return TokenIds(flat, offsets)

    def _encodings(self, texts: Sequence[str], max_length: int | None, truncation_side: str) -> list:
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side={truncation_side!r}; expected 'right' or 'left'")
        # sentence-transformers strips surrounding whitespace before tokenizing; so do we.
        texts = [t.strip() for t in texts]
        if self.lowercase_text:
            texts = [t.lower() for t in texts]
        if not texts:
            return []
        # What the HF tokenizer's __call__ runs for a batch of single texts (its Python side only
        # sets the backend's truncation/padding and converts the result). `encode_batch` releases
        # the GIL and spreads the texts over the tokenizers library's own thread pool (rayon), so
        # calls from several threads tokenize in parallel with no lock of ours.
        return self._backend(max_length, truncation_side).encode_batch(texts, add_special_tokens=True)

    def save(self, directory: str) -> None:
        self.hf.save_pretrained(directory)


def load_tokenizer(path: str, lowercase_text: bool = False, do_lower_case: bool | None = None) -> Tokenizer:
    """Loads the tokenizer of a model folder (tokenizer.json or vocab.txt) or a bare vocab file.

    Args:
      path: a model directory, or a `vocab.txt`-style file (one token a line, e.g. UER-py's
        models/google_zh_vocab.txt).
      lowercase_text: see `Tokenizer`.
      do_lower_case: override the tokenizer's own lowercasing; None keeps what the folder says
        (its tokenizer_config.json; m3e-small has it off, all-MiniLM on).
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} is neither a vocab file nor a model directory")
    if os.path.isfile(path):
        kwargs = {} if do_lower_case is None else {"do_lower_case": do_lower_case}
        # transformers 5 renamed the argument to `vocab` and silently ignores `vocab_file`,
        # leaving a 5-token vocab that maps every character to [UNK]; pick the name this
        # version takes and check the vocab really loaded.
        import inspect

        arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
        try:
            hf = BertTokenizerFast(**{arg: path}, **kwargs)
            with open(path, encoding="utf-8") as f:
                want = len({line.rstrip("\n") for line in f} - {""})
        except Exception as e:
            raise ValueError(f"{path}: cannot build a WordPiece tokenizer from this vocab file ({e})") from None
        if len(hf.get_vocab()) != want:
            raise ValueError(f"{path}: the tokenizer loaded {len(hf.get_vocab())} tokens but the file "
                             f"has {want}; is it a one-token-a-line vocab.txt?")
        return Tokenizer(hf, lowercase_text)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer found (need tokenizer.json or vocab.txt); pass vocab_path= "
            "to point at a vocab file"
        )
    kwargs = {} if do_lower_case is None else {"do_lower_case": do_lower_case}
    try:
        hf = AutoTokenizer.from_pretrained(path, use_fast=True, **kwargs)
    except Exception as e:
        raise ValueError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{path}: only fast (Rust) tokenizers are supported")
    return Tokenizer(hf, lowercase_text)


def pad_batch(seqs: Sequence[np.ndarray], length: int, batch: int, pad_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Packs id sequences into fixed [batch, length] ids and mask; extra rows are all padding."""
    ids = np.full((batch, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch, length), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
