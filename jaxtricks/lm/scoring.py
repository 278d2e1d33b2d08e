r"""Scoring a text with a trained model: bits per UTF-8 byte, comparable across tokenizers.

The text is cut into documents as the ``text`` data source cuts it (blank-line separated
paragraphs); each is tokenized and followed by the end-of-document token, and the stream is scored
in non-overlapping windows of the model's context: every token once, the first one with an
end-of-document token as its context (as every document follows one in training), the last
partial window included.

.. math::
    \text{bits per byte} = \frac{\sum_t -\ln p(x_t \mid \text{window})}{\ln 2 \, \sum_t b_t}

with :math:`b_t` the UTF-8 bytes token :math:`t` stands for (the end-of-document token counts one,
as the byte tokenizer counts it), so the same text has the same byte count whatever the tokenizer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtricks.lm.data import DataError, paragraphs
from jaxtricks.lm.step import token_losses

WINDOWS_PER_CALL = 8  # context windows scored per compiled call (one compile per text length)


class Score(NamedTuple):
    bits_per_byte: float
    bytes: int  # UTF-8 bytes of the documents, plus one per end-of-document token
    tokens: int  # tokens scored (end-of-document tokens included)


def document_stream(text: str, tokenizer: Any) -> np.ndarray:
    """The documents of ``text`` tokenized, each followed by the end-of-document token."""
    docs = paragraphs(text)
    if not docs:
        raise DataError("the text has no document to score (only blank lines, or nothing).")
    eos = np.array([tokenizer.eos_id], np.int32)
    return np.concatenate([part for doc in docs for part in (tokenizer.encode(doc), eos)])


def score_text(model: Any, tokenizer: Any, text: str) -> Score:
    """Bits per byte of ``text`` under ``model`` (see the module's docstring)."""
    stream = document_stream(text, tokenizer)
    context = model.cfg.max_seq_len
    inputs = np.concatenate([[tokenizer.eos_id], stream[:-1]]).astype(np.int32)
    windows = -(-len(stream) // context)
    rows = -(-windows // WINDOWS_PER_CALL) * WINDOWS_PER_CALL
    padded = rows * context
    mask = np.arange(padded) < len(stream)
    inputs = np.pad(inputs, (0, padded - len(stream))).reshape(rows, context)
    targets = np.pad(stream, (0, padded - len(stream))).reshape(rows, context)
    graphdef, state = nnx.split(model)
    losses = functools.partial(_window_losses, graphdef, vocab_limit=tokenizer.vocab_size)
    nats = 0.0
    for start in range(0, rows, WINDOWS_PER_CALL):
        part = slice(start, start + WINDOWS_PER_CALL)
        window_losses = np.asarray(losses(state, inputs[part], targets[part]), np.float64)
        nats += float(window_losses.ravel()[mask.reshape(rows, context)[part].ravel()].sum())
    text_bytes = int(tokenizer.token_bytes[stream].sum())
    return Score(nats / math.log(2) / text_bytes, text_bytes, len(stream))


@functools.partial(jax.jit, static_argnums=0, static_argnames="vocab_limit")
def _window_losses(graphdef, state, inputs, targets, *, vocab_limit):
    model = nnx.merge(graphdef, state)
    return token_losses(model(jnp.asarray(inputs)), targets, vocab_limit)  # (windows, context)
