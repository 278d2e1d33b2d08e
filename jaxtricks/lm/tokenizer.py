"""Tokenizers: UTF-8 bytes, or a byte-level BPE learned from the training split.

Both map text to int32 ids and back and have an end-of-document token (``eos_id``), which the data
pipeline puts after every document. ``token_bytes[id]`` is how many UTF-8 bytes of text a token
stands for (the end-of-document token counts as one, as the byte tokenizer counts it): the
denominator of bits per byte, which compares models whatever their tokenizer.

The BPE is Hugging Face ``tokenizers``' byte-level BPE (GPT-2's pre-tokenization, no unknown
token: every byte sequence round-trips), trained once per corpus and vocabulary size and saved as
``tokenizer.json``; a run keeps its own copy in its workdir, so resuming, ``jaxtricks sample`` and
``jaxtricks eval`` use exactly the tokenizer the model was trained with.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

BYTE_VOCAB_SIZE = 257  # bytes 0..255 and the end-of-document token
EOS_TEXT = "<|endoftext|>"  # the BPE's end-of-document token (GPT-2's)
FILE_NAME = "tokenizer.json"
MIN_BPE_VOCAB, MAX_BPE_VOCAB = 257, 1_000_000


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt or not one of ours."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus the end-of-document token 256.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    array([104, 195, 169], dtype=int32)
    >>> tok.decode([104, 195, 169, tok.eos_id])
    'hé'
    """

    name = "byte"
    vocab_size: int = BYTE_VOCAB_SIZE
    eos_id: int = 256

    def __init__(self):
        self.token_bytes = np.ones(self.vocab_size, np.int64)

    def encode(self, text: str | bytes) -> np.ndarray:
        """The UTF-8 bytes of ``text`` (str, or bytes as TFDS returns text) as int32 tokens (no
        end-of-document token)."""
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of the byte tokens in ``ids``; skips EOS (and any id outside 0..255), replaces
        invalid UTF-8 with U+FFFD."""
        ids = np.asarray(ids).ravel()
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", "replace")


class BPETokenizer:
    """A byte-level BPE (a ``tokenizers.Tokenizer``) with :data:`EOS_TEXT` as its end token."""

    name = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS_TEXT)
        if self.eos_id is None:
            raise TokenizerError(f"the tokenizer has no end-of-document token {EOS_TEXT!r}")
        # Byte-level tokens are strings of GPT-2's byte alphabet: one character per byte.
        vocab = tokenizer.get_vocab()
        self.token_bytes = np.zeros(self.vocab_size, np.int64)
        for token, index in vocab.items():
            self.token_bytes[index] = len(token)
        self.token_bytes[self.eos_id] = 1

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        """Text of ``ids``; skips the end-of-document token and ids outside the vocabulary."""
        ids = np.asarray(ids).ravel()
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & (ids != self.eos_id)]
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def to_str(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically (a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(self.to_str())
        os.replace(tmp, path)
        return path


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (the 256 bytes, :data:`EOS_TEXT` and the
    merges) learned from ``texts``; the same texts in the same order give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)


def load(path: str | Path) -> BPETokenizer:
    """The BPE saved at ``path``; :class:`TokenizerError` when it is missing or unreadable."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path} does not exist")
    try:
        return BPETokenizer(Tokenizer.from_str(path.read_text()))
    except TokenizerError:
        raise
    except Exception as e:  # tokenizers raises its own Exception for a malformed file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TokenizerError(f"{path} is not a readable tokenizer ({first_line})") from None


def padded_vocab_size(tokenizer_size: int, multiple: int = 64) -> int:
    """``tokenizer_size`` rounded up to a multiple of ``multiple`` (e.g. 257 -> 320): the
    embedding's rows, the padded ones masked out of the loss and the sampler."""
    return -(-tokenizer_size // multiple) * multiple
