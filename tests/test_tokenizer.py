"""Tokenizers (jaxtricks/lm/tokenizer.py), the BPE through the data pipeline, bits per byte
(training's evaluation and jaxtricks eval) and a BPE run's saved tokenizer."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtricks.lm import config as config_lib
from jaxtricks.lm import data, training
from jaxtricks.lm import tokenizer as tokenizer_lib
from jaxtricks.lm.config import DataConfig, ModelConfig
from jaxtricks.lm.model import Transformer
from jaxtricks.lm.scoring import score_text
from jaxtricks.lm.step import cross_entropy
from tests.test_data import one_epoch, stream, take, write_corpus

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé: naïve café, 日本語 and 🙂!",
         "  indented\n\ttabs and trailing spaces  ", "x" * 300, ""]


@pytest.fixture(scope="module")
def bpe():
    corpus = [t * 3 for t in TEXTS] + ["the the the fox fox dog"] * 20
    return tokenizer_lib.train_bpe(corpus, 300)


def test_bpe_round_trips_every_text_and_counts_its_bytes(bpe):
    assert bpe.vocab_size <= 300 and bpe.decode([bpe.eos_id]) == ""
    unseen = ["Ωμέγα ∑ ≠ ∞ — “quotes” ⟨brackets⟩", "\x00\x7f control\r\n", "ｆｕｌｌｗｉｄｔｈ"]
    for text in TEXTS + unseen:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and bpe.decode(ids) == text
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert len(bpe.encode("the the the fox")) < len("the the the fox")  # merges were learned


def test_training_twice_gives_the_same_tokenizer(bpe):
    again = tokenizer_lib.train_bpe([t * 3 for t in TEXTS] + ["the the the fox fox dog"] * 20, 300)
    assert again.to_str() == bpe.to_str()


def test_the_byte_tokenizer_counts_one_byte_per_token():
    tok = tokenizer_lib.ByteTokenizer()
    assert tok.token_bytes.shape == (257,) and set(tok.token_bytes) == {1}
    assert tokenizer_lib.padded_vocab_size(257) == 320 and tokenizer_lib.padded_vocab_size(64) == 64


def test_load_refuses_missing_and_corrupt_files(tmp_path, bpe):
    with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
        tokenizer_lib.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(tokenizer_lib.TokenizerError, match="is not a readable tokenizer"):
        tokenizer_lib.load(tmp_path / "tokenizer.json")
    assert tokenizer_lib.load(bpe.save(tmp_path / "ok.json")).to_str() == bpe.to_str()


def test_vocab_size_auto_pads_the_tokenizer_and_the_padding_is_masked():
    assert config_lib.load(None, ["data.tokenizer=byte"]).model.vocab_size == 320
    assert config_lib.load(None, []).model.vocab_size == 4096  # the default: a 4,096-token BPE
    cfg = config_lib.load(None, ["data.tokenizer=bpe", "data.bpe_vocab_size=1000"])
    assert cfg.model.vocab_size == 1024
    logits = np.random.default_rng(0).normal(size=(2, 3, 320)).astype(np.float32)
    logits[..., 257:] += 50.0  # the padding would dominate the softmax if it were not masked
    targets = np.array([[0, 256, 3], [9, 1, 2]], np.int32)
    valid = logits[..., :257]
    log_probs = valid - np.log(np.exp(valid - valid.max(-1, keepdims=True)).sum(-1, keepdims=True)
                               ) - valid.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), targets, 257), expected,
                               rtol=1e-6)


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOCS_PER_GROUP", 5)
    paragraphs = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds"),
                     seq_len=16, val_fraction=0.25, tokenizer="bpe", bpe_vocab_size=300)
    return cfg, paragraphs


def test_bpe_is_learned_once_from_the_training_split_and_packs_every_document(corpus):
    cfg, paragraphs = corpus
    bpe = data.tokenizer_for(cfg)
    path = data.bpe_path(cfg)
    assert path.is_file() and path.parent == Path(data._corpus_builder(cfg).data_dir)
    train_docs = [data._as_str(x["text"]) for x in data._open_split(cfg, "train")[0]]
    assert bpe.to_str() == tokenizer_lib.train_bpe(train_docs, 300).to_str()
    mtime = path.stat().st_mtime_ns
    assert data.tokenizer_for(cfg).to_str() == bpe.to_str() and path.stat().st_mtime_ns == mtime
    # One epoch of the BPE's token stream is every training document once, in full.
    tokens = stream(take(data.train_iterator(cfg, batch_size=2, seed=0, tokenizer=bpe), 80))
    ends = np.flatnonzero(tokens == bpe.eos_id)
    docs = [bpe.decode(tokens[s:e]) for s, e in zip(np.r_[0, ends[:-1] + 1], ends, strict=True)]
    epoch = one_epoch(docs)  # the stream starts with an epoch's first document
    assert sorted(epoch) == sorted(train_docs) and set(epoch) <= set(paragraphs)


# --------------------------------------------------------------------------- bits per byte


def _tiny_model(vocab_size):
    cfg = ModelConfig(vocab_size=vocab_size, num_layers=1, d_model=32, num_heads=2, d_ff=64,
                      max_seq_len=8)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _numpy_bits_per_byte(model, tokenizer, text):
    """Windows of 8 tokens scored one by one in numpy, over the documents' own UTF-8 bytes."""
    docs = [p for p in text.split("\n\n") if p.strip()]
    stream_ = np.concatenate([np.r_[tokenizer.encode(d), tokenizer.eos_id] for d in docs])
    inputs = np.r_[tokenizer.eos_id, stream_[:-1]]
    nats = 0.0
    for start in range(0, len(stream_), 8):
        x, y = inputs[start:start + 8], stream_[start:start + 8]
        logits = np.asarray(model(jnp.asarray(x[None])), np.float64)[0, :, :tokenizer.vocab_size]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nats += float((log_z - logits[np.arange(len(y)), y]).sum())
    text_bytes = sum(len(d.encode("utf-8")) + 1 for d in docs)
    return nats / math.log(2) / text_bytes, text_bytes, len(stream_)


TEXT = "First paragraph, café.\n\nSecond one 日本 is a little longer than the context.\n\nEnd"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_score_text_is_bits_per_byte_of_the_documents(kind, bpe):
    tokenizer = tokenizer_lib.ByteTokenizer() if kind == "byte" else bpe
    model = _tiny_model(tokenizer_lib.padded_vocab_size(tokenizer.vocab_size))
    score = score_text(model, tokenizer, TEXT)
    expected, text_bytes, tokens = _numpy_bits_per_byte(model, tokenizer, TEXT)
    assert (score.bytes, score.tokens) == (text_bytes, tokens)
    assert math.isclose(score.bits_per_byte, expected, rel_tol=1e-5)
    if kind == "byte":
        assert score.tokens == score.bytes  # bits per byte is the loss per token / ln 2
    assert score_text(model, tokenizer_lib.ByteTokenizer() if kind == "bpe" else bpe,
                      TEXT).bytes == text_bytes  # the same bytes whatever the tokenizer


def test_validation_bits_per_byte_counts_the_targets_bytes(bpe):
    class Steps:  # what evaluate needs of the compiled steps: a known loss per batch
        eval = staticmethod(lambda params, batch: batch["loss"])
        put_batch = staticmethod(lambda batch: batch)

    targets = [bpe.encode("the fox, the dog"), bpe.encode("café 日本")]
    eval_set = [{"targets": t[None], "loss": np.float32(loss)}
                for t, loss in zip(targets, [2.0, 3.0], strict=True)]
    result = training.evaluate(Steps, None, eval_set, bpe)
    nats = 2.0 * len(targets[0]) + 3.0 * len(targets[1])
    assert math.isclose(result["val_loss"], nats / (len(targets[0]) + len(targets[1])))
    text_bytes = len(b"the fox, the dog") + len("café 日本".encode())
    assert math.isclose(result["val_bits_per_byte"], nats / math.log(2) / text_bytes)
    byte_set = [{"targets": np.zeros((2, 5), np.int32), "loss": np.float32(1.5)}]
    byte_result = training.evaluate(Steps, None, byte_set, tokenizer_lib.ByteTokenizer())
    assert math.isclose(byte_result["val_bits_per_byte"], 1.5 / math.log(2))


# --------------------------------------------------------------------------- a BPE run (slow)

RUN = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
       "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=4", "optimizer.warmup_steps=0",
       "train.eval_every=5", "train.checkpoint_every=5", "train.sample_tokens=8",
       "data.tokenizer=bpe", "data.bpe_vocab_size=300", "data.source=text"]


@pytest.mark.slow
def test_a_bpe_run_keeps_its_tokenizer(python, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: the fox and the dog, café {i * i}"
                                  for i in range(60)) + "\n")
    workdir = tmp_path / "run"
    common = ["--workdir", str(workdir), *RUN, f"data.path={corpus}",
              f"data.data_dir={tmp_path / 'tfds'}"]
    done = python.run("train.py", *common, "train.steps=5")
    assert done.returncode == 0, done.stderr
    saved = (workdir / "tokenizer.json").read_text()
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bits_per_byte" in m for m in metrics)
    # The training text changes: resume, sample and eval still use the run's tokenizer.
    corpus.write_text("\n\n".join(f"völlig anderer Text {i}: Ζ日本🙂" for i in range(60)) + "\n")
    done = python.run("train.py", *common, "train.steps=10")
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert (workdir / "tokenizer.json").read_text() == saved
    config = config_lib.from_saved(json.loads((workdir / "config.json").read_text()))
    assert training.load_tokenizer(config, workdir).to_str() == saved
    text = tmp_path / "eval.txt"
    text.write_text("the fox and the dog\n\ncafé 9\n")
    out = python.run("-m", "jaxtricks", "eval", str(workdir), str(text), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bytes"] == len(b"the fox and the dog") + len("café 9".encode()) + 2
    assert result["step"] == 10 and result["tokens"] < result["bytes"]
    sample = python.run("-m", "jaxtricks", "sample", str(workdir), "--max-new-tokens", "5")
    assert sample.returncode == 0, sample.stderr
    # A corrupt or missing tokenizer.json: one error line, exit 2, for training, eval and sample.
    (workdir / "tokenizer.json").write_text("{not json")
    for command in [["train.py", *common, "train.steps=15"],
                    ["-m", "jaxtricks", "eval", str(workdir), str(text)],
                    ["-m", "jaxtricks", "sample", str(workdir)]]:
        result = python.run(*command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "tokenizer" in lines[0], lines
    (workdir / "tokenizer.json").unlink()
    result = python.run("train.py", *common, "train.steps=15")
    assert result.returncode == 2 and "tokenizer.json is missing" in result.stderr


def test_lm1b_bpe_config_loads(tmp_path):
    config = config_lib.load(Path(__file__).parents[1] / "configs" / "lm1b_bpe.yaml")
    assert (config.data.tokenizer, config.data.bpe_vocab_size) == ("bpe", 32768)
    assert config.model.vocab_size == 32768 and config.data.name == "lm1b"


@pytest.mark.slow
def test_lm1b_bpe_config_runs_two_steps_on_mock_data(python, tmp_path):
    script = f"""
import sys
import tensorflow_datasets as tfds
sys.argv = ["train.py", "--config", "configs/lm1b_bpe.yaml", "--workdir", {str(tmp_path / 'run')!r},
            "train.steps=2", "optimizer.warmup_steps=0", "train.eval_every=2",
            "train.eval_batches=1", "train.batch_size=2", "data.seq_len=64",
            "model.max_seq_len=64", "model.num_layers=1", "model.d_model=64", "model.num_heads=2",
            "model.d_ff=128", "model.dtype=float32", "data.bpe_vocab_size=512",
            "train.sample_tokens=4", "data.data_dir={tmp_path / 'tfds'}"]
from unittest import mock
import train
# mock_data serves the data source but leaves lm1b unprepared in TFDS's eyes (no splits, no
# array_record files), which check_data would refuse: that check alone is skipped here.
with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE), \\
        mock.patch("jaxtricks.lm.data.check_data"):
    sys.exit(train.main())
"""
    result = python.run("-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 2: val_loss" in result.stdout

