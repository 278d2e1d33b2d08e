"""Tests of jaxtricks.lm.data: tokenizer, packing, shuffling, sharding, resume, the three sources.

Every dataset is prepared under pytest's tmp_path; nothing is written to ~/tensorflow_datasets.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxtricks.lm import data
from jaxtricks.lm.config import DataConfig

EOS = data.EOS_ID
tok = data.ByteTokenizer()


# --------------------------------------------------------------------------- helpers


def write_corpus(folder, num_files=3, paragraphs_per_file=12, seed=0):
    """Text files of unique paragraphs (some longer than a row, some non-ASCII); returns them."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "εψιλον", "zeta", "日本", "eta", "🙂", "theta"]
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = []
    for f in range(num_files):
        paras = [f"file {f} paragraph {p}: " + " ".join(rng.choice(words, rng.integers(1, 40)))
                 for p in range(paragraphs_per_file)]
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        paragraphs += paras
    return paragraphs


def stream(batches):
    """The packed token stream behind a list of batches: row r is inputs[r] + targets[r][-1]."""
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).ravel()
                           for b in batches])


def documents(tokens):
    """The complete documents in a token stream (each ends with EOS), decoded."""
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]


def one_epoch(docs):
    """The documents before the first repeat: one epoch when all documents are distinct."""
    seen = []
    for d in docs:
        if d in seen:
            return seen
        seen.append(d)
    raise AssertionError(f"no repeat in {len(docs)} documents: take more batches")


def take(it, n):
    return [next(it) for _ in range(n)]


def prepared(cfg):
    """The corpora JaxtricksText has prepared under cfg.data_dir."""
    return list(Path(cfg.data_dir).glob("jaxtricks_text/*/1.0.0/dataset_info.json"))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """36 paragraphs in 3 files, 27 of them for training; documents read 5 at a time so that an
    epoch has several groups and a short last one."""
    monkeypatch.setattr(data, "DOCS_PER_GROUP", 5)
    paragraphs = write_corpus(tmp_path / "corpus")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds"),
                     seq_len=16, val_fraction=0.25)
    return cfg, paragraphs


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld — 日本語 🙂\n\ttabs"])
def test_tokenizer_round_trip(text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == text
    assert tok.decode(jnp.asarray(np.append(ids, tok.eos_id))) == text  # eos skipped, jax input


def test_tokenizer_vocabulary_and_invalid_utf8():
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([104, 105, 256, 33]) == "hi!"
    assert tok.decode([0xE6, 0x97, 104]) == "\ufffdh"  # truncated 3-byte sequence


# --------------------------------------------------------------------------- packing, shuffling


def test_packing_keeps_every_token_once_per_epoch(corpus):
    cfg, paragraphs = corpus
    batches = take(data.train_iterator(cfg, batch_size=4, seed=0), 200)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (4, cfg.seq_len)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    tokens = stream(batches)
    train_docs = one_epoch(documents(tokens))
    val_docs = one_epoch(documents(stream(data.eval_batches(cfg, batch_size=4, num_batches=40))))
    # Epoch 1 holds each training document once, validation the rest: together the source.
    assert sorted(train_docs + val_docs) == sorted(paragraphs)
    assert not set(train_docs) & set(val_docs)
    assert len(val_docs) == round(0.25 * len(paragraphs))
    # Token count: the first epoch is exactly the training documents' bytes plus one EOS each.
    epoch_tokens = sum(len(d.encode()) + 1 for d in train_docs)
    assert (tokens[:epoch_tokens] == EOS).sum() == len(train_docs)
    # The next epoch follows without a gap, in another order.
    epoch2 = documents(tokens[epoch_tokens:])[:len(train_docs)]
    assert sorted(epoch2) == sorted(train_docs) and epoch2 != train_docs


def test_shuffle_is_seeded(corpus):
    cfg, _ = corpus
    first = stream(take(data.train_iterator(cfg, batch_size=2, seed=1), 5))
    again = stream(take(data.train_iterator(cfg, batch_size=2, seed=1), 5))
    other = stream(take(data.train_iterator(cfg, batch_size=2, seed=2), 5))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_eval_batches_are_fixed_and_wrap_around(corpus):
    cfg, _ = corpus
    a = data.eval_batches(cfg, batch_size=3, num_batches=100)
    b = data.eval_batches(cfg, batch_size=3, num_batches=100)
    np.testing.assert_array_equal(stream(a), stream(b))
    docs = documents(stream(a))
    val = one_epoch(docs)
    assert docs[len(val):2 * len(val)] == val  # the split again, in the same order


@pytest.mark.parametrize("skip", [0, 1, 7, 30])  # 0: the state before any batch
def test_resume_from_state_is_exact(corpus, skip):
    cfg, _ = corpus
    it = data.train_iterator(cfg, batch_size=3, seed=0)
    take(it, skip)
    state = it.get_state()
    expected = take(it, 25)  # crosses an epoch boundary when skip=30
    for restored_state in [state, json.loads(json.dumps(state))]:  # JSON: as in checkpoints
        resumed = data.train_iterator(cfg, batch_size=3, seed=0)
        resumed.set_state(restored_state)
        np.testing.assert_array_equal(stream(take(resumed, 25)), stream(expected))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(corpus):
    cfg, _ = corpus
    expected = take(data.train_iterator(cfg, batch_size=2, seed=0), 150)  # > 2 epochs
    it = data.train_iterator(dataclasses.replace(cfg, num_workers=1), batch_size=2, seed=0)
    try:
        np.testing.assert_array_equal(stream(take(it, 150)), stream(expected))
        state = it.get_state()
        after = take(it, 2)
    finally:
        it.close()
    resumed = data.train_iterator(dataclasses.replace(cfg, num_workers=1), batch_size=2, seed=0)
    try:
        resumed.set_state(json.loads(json.dumps(state)))
        np.testing.assert_array_equal(stream(take(resumed, 2)), stream(after))
    finally:
        resumed.close()


# --------------------------------------------------------------------------- sources


def test_embedded_corpus_is_python_documentation(tmp_path):
    cfg = DataConfig(data_dir=str(tmp_path), seq_len=64)
    assert cfg.source == "embedded"
    data.check_data(cfg)
    batch = next(data.train_iterator(cfg, batch_size=8, seed=0))
    assert batch["inputs"].shape == (8, 64)
    text = tok.decode(batch["inputs"])
    assert sum(c.isascii() for c in text) > 0.95 * len(text) and " the " in text.lower()
    (info,) = prepared(cfg)
    assert info.parts[-3].startswith("embedded-")
    splits = json.loads(info.read_text())["splits"]
    sizes = {s["name"]: sum(map(int, s["shardLengths"])) for s in splits}
    assert sizes["train"] > 2000 and sizes["validation"] == round(0.05 * sum(sizes.values()))
    val = documents(stream(data.eval_batches(cfg, batch_size=8, num_batches=4)))[:-1]
    train = documents(stream(take(data.train_iterator(cfg, batch_size=8, seed=0), 40)))[:-1]
    assert val and train and not set(val) & set(train)


def test_text_source_from_file_folder_and_glob(tmp_path):
    paragraphs = write_corpus(tmp_path / "corpus", num_files=2, paragraphs_per_file=8)
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "sub" / "notes.md").write_text("nested one\n\nnested two\n")
    (tmp_path / "corpus" / "image.bin").write_bytes(b"\x00\x01binary")  # not a text file
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "skip.txt").write_text("hidden\n\nfolder\n")

    def read_all(path, val_fraction=0.5):
        cfg = DataConfig(source="text", path=str(path), data_dir=str(tmp_path / "tfds"),
                         seq_len=16, val_fraction=val_fraction)
        data.check_data(cfg)
        train = one_epoch(documents(stream(take(data.train_iterator(cfg, batch_size=2, seed=0),
                                                60))))
        val = one_epoch(documents(stream(data.eval_batches(cfg, batch_size=2, num_batches=60))))
        return sorted(train + val)

    assert read_all(tmp_path / "corpus") == sorted(paragraphs + ["nested one", "nested two"])
    assert read_all(tmp_path / "corpus" / "part1.txt") == sorted(paragraphs[8:])
    assert read_all(str(tmp_path / "corpus" / "part*.txt")) == sorted(paragraphs)
    assert read_all(str(tmp_path / "**" / "*.md")) == ["nested one", "nested two"]


def test_text_source_is_prepared_once_and_again_when_files_change(corpus, monkeypatch):
    cfg, _ = corpus
    calls = []
    prepare = data.JaxtricksText._split_generators
    monkeypatch.setattr(data.JaxtricksText, "_split_generators",
                        lambda self, dl: calls.append(1) or prepare(self, dl))
    first = stream(take(data.train_iterator(cfg, batch_size=2, seed=0), 3))
    data.eval_batches(cfg, batch_size=2, num_batches=1)
    again = stream(take(data.train_iterator(cfg, batch_size=2, seed=0), 3))
    same_files_by_glob = dataclasses.replace(cfg, path=cfg.path + "/*.txt")
    data.eval_batches(same_files_by_glob, batch_size=2, num_batches=1)
    assert len(calls) == 1  # prepared once, reused by every later call
    np.testing.assert_array_equal(first, again)

    changed = os.path.join(cfg.path, "part0.txt")
    with open(changed, "a", encoding="utf-8") as f:
        f.write("\na brand new paragraph\n")
    train = documents(stream(take(data.train_iterator(cfg, batch_size=4, seed=0), 80)))
    val = documents(stream(data.eval_batches(cfg, batch_size=4, num_batches=40)))
    assert len(calls) == 2
    assert "a brand new paragraph" in train + val
    assert len(prepared(cfg)) == 2


def test_another_process_preparing_first_is_fine(corpus, monkeypatch):
    """Processes sharing data_dir race to prepare: the loser's final rename fails, it reads the
    winner's copy."""
    cfg, _ = corpus
    prepare = data.JaxtricksText.download_and_prepare

    def lose_the_race(self, *args, **kwargs):
        prepare(self, *args, **kwargs)  # the other process, done first
        raise OSError("Directory not empty")  # our rename onto its copy

    monkeypatch.setattr(data.JaxtricksText, "download_and_prepare", lose_the_race)
    assert next(data.train_iterator(cfg, batch_size=2, seed=0))["inputs"].shape == (2, 16)


def test_val_fraction_changes_the_prepared_split(corpus):
    cfg, _ = corpus
    data.eval_batches(cfg, batch_size=2, num_batches=1)
    data.eval_batches(dataclasses.replace(cfg, val_fraction=0.5), batch_size=2, num_batches=1)
    assert len(prepared(cfg)) == 2


def test_tfds_source_with_mock_data(tmp_path):
    cfg = DataConfig(source="tfds", name="lm1b", val_split="test", data_dir=str(tmp_path),
                     seq_len=16)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        batches = take(data.train_iterator(cfg, batch_size=2, seed=0), 30)
        val = data.eval_batches(cfg, batch_size=2, num_batches=3)
        mocked = [ex["text"] for ex in tfds.data_source("lm1b", split="train", download=False)]
    docs = documents(stream(batches))
    assert sorted(one_epoch(docs)) == sorted(mocked)  # mock examples are distinct random strings
    assert set("".join(documents(stream(val)))) <= set(" abcdefghij")
    assert not (tmp_path / "lm1b").exists()


class TinyLines(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A text dataset with a non-default text field and splits train / test."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see JaxtricksText.code_path

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text(), "id": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 36)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"sentence": f"sentence number {i} ünïcode", "id": i}


@pytest.fixture
def tiny_lines(tmp_path):
    """TinyLines prepared in array_record under tmp_path, read by name only (from its files)."""
    tfds.disable_progress_bar()
    TinyLines(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    return DataConfig(source="tfds", name="tiny_lines", data_dir=str(tmp_path),
                      text_field="sentence", val_split="test", seq_len=16)


def test_tfds_source_from_prepared_array_record(tiny_lines):
    cfg = tiny_lines
    data.check_data(cfg)
    train = one_epoch(documents(stream(take(data.train_iterator(cfg, batch_size=2, seed=0), 60))))
    val = one_epoch(documents(stream(data.eval_batches(cfg, batch_size=2, num_batches=20))))
    assert sorted(train) == sorted(f"sentence number {i} ünïcode" for i in range(30))
    assert sorted(val) == sorted(f"sentence number {i} ünïcode" for i in range(30, 36))
    half = dataclasses.replace(cfg, train_split="train[:50%]")
    data.check_data(half)
    assert len(one_epoch(documents(stream(take(
        data.train_iterator(half, batch_size=2, seed=0), 40))))) == 15


# --------------------------------------------------------------------------- errors


def test_text_errors(tmp_path):
    def error(path, **kw):
        cfg = DataConfig(source="text", path=str(path), data_dir=str(tmp_path / "tfds"), **kw)
        with pytest.raises(data.DataError) as checked:
            data.check_data(cfg)
        with pytest.raises(data.DataError) as drawn:  # train_iterator explains the same way
            next(data.train_iterator(cfg, batch_size=2, seed=0))
        assert str(drawn.value) == str(checked.value)
        return str(checked.value)

    assert "data.path is empty" in error("")
    assert "does not exist" in error(tmp_path / "missing.txt")
    assert "glob that matches no file" in error(tmp_path / "*.nothing")
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\x00")
    assert "folder without text files" in error(tmp_path / "binaries")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    assert "only empty files" in error(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("   \n\n  \n")
    assert "0 paragraph(s); at least 2" in error(tmp_path / "blank.txt")
    (tmp_path / "one.txt").write_text("just one paragraph\nover two lines\n")
    assert "1 paragraph(s); at least 2" in error(tmp_path / "one.txt")
    assert not prepared(DataConfig(data_dir=str(tmp_path / "tfds")))


# French prose, so that Latin-1 makes a few invalid bytes in otherwise readable text.
PROSE = [f"Paragraphe {i}: le café de la gare ouvre à sept heures, et on y lit le journal "
         "pendant que la pluie tombe sur les quais." for i in range(40)]


def latin1_file(path):
    """``PROSE`` encoded as Latin-1 (é and à are single bytes, invalid UTF-8); its bytes."""
    raw = ("\n\n".join(PROSE) + "\n").encode("latin-1")
    path.write_bytes(raw)
    return raw


def random_file(path, size=1 << 16):
    path.write_bytes(np.random.default_rng(0).bytes(size))


def text_error(cfg):
    """check_data's DataError message for cfg, after checking that check_data wrote nothing and
    that the pipeline says the same (and prepares nothing)."""
    existed = os.path.exists(cfg.data_dir)
    with pytest.raises(data.DataError) as checked:
        data.check_data(cfg)
    assert os.path.exists(cfg.data_dir) == existed
    before = prepared(cfg)
    with pytest.raises(data.DataError) as drawn:
        next(data.train_iterator(cfg, batch_size=2, seed=0))
    assert str(drawn.value) == str(checked.value)
    assert prepared(cfg) == before
    return str(checked.value)


def test_latin1_file_is_refused_unless_encoding_errors_replace(tmp_path):
    path = tmp_path / "latin1.txt"
    raw = latin1_file(path)
    offset = raw.index("é".encode("latin-1"))
    cfg = DataConfig(source="text", path=str(path), data_dir=str(tmp_path / "tfds"), seq_len=16)
    assert text_error(cfg) == (
        f"data.path file {str(path)!r} is not valid UTF-8: the first invalid sequence is at byte "
        f"offset {offset} (line 1, byte 0xe9: invalid continuation byte); convert the "
        "file to UTF-8, or set data.encoding_errors=replace to read each invalid sequence as "
        "U+FFFD.")

    replace = dataclasses.replace(cfg, encoding_errors="replace")
    data.check_data(replace)
    train = documents(stream(take(data.train_iterator(replace, batch_size=2, seed=0), 200)))
    val = documents(stream(data.eval_batches(replace, batch_size=2, num_batches=100)))
    expected = [p.replace("é", "\ufffd").replace("à", "\ufffd") for p in PROSE]
    assert sorted(set(train + val)) == sorted(expected)
    # Prepared under replace, never reused as if strict: the strict config is still refused.
    assert "is not valid UTF-8" in text_error(cfg)


def test_random_bytes_are_not_text_under_either_setting(tmp_path):
    path = tmp_path / "random.txt"
    random_file(path)
    for errors in ["strict", "replace"]:
        cfg = DataConfig(source="text", path=str(path), data_dir=str(tmp_path / "tfds"),
                         encoding_errors=errors)
        message = text_error(cfg)
        assert message.startswith(f"data.path file {str(path)!r} is not text: ")
        share = float(message.split("is not text: ")[1].split("%")[0]) / 100
        assert data.NOT_TEXT_SHARE < share < 0.6  # about half the bytes become U+FFFD
        assert "neither printable nor whitespace" in message and "allowed: at most 30%" in message


@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_not_text_share_and_u_fffd(tmp_path, errors):
    def check(text):
        path = tmp_path / "file.txt"
        path.write_text(text, encoding="utf-8")
        data.check_data(DataConfig(source="text", path=str(path), data_dir=str(tmp_path / "tfds"),
                                   encoding_errors=errors))

    body = "words and spaces\n\n" + "x" * 82  # 100 characters
    control = "\x01\x02\x1b\u200b\ufeff\ue000"  # controls, zero-width space, BOM, private use
    check(body[:70] + "".join(control[i % 6] for i in range(30)))  # 30%: text still
    with pytest.raises(data.DataError, match="is not text: 31% of the 100 characters read"):
        check(body[:69] + "".join(control[i % 6] for i in range(31)))
    with pytest.raises(data.DataError, match="is not text: 40% of the 100 characters read"):
        check(body[:60] + "\ufffd" * 40)  # valid UTF-8, but a replacement character is no text
    check(body[:60] + "\n\t \u00a0\u3000" * 8)  # whitespace of every kind is text
    check("日本語の文章です。\n\nΚείμενο στα ελληνικά 🙂\n")


def test_decoding_across_blocks_offsets_and_early_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 5)  # multibyte characters cut by blocks
    text = "héllo wörld\n日本語 🙂 ok\n\nsecond paragraph, 🙂🙂\n"
    path = tmp_path / "f.txt"
    path.write_text(text, encoding="utf-8")
    assert "".join(data._decoded_text(path, "strict")) == text
    raw = text.encode() + b"ok then\n\xff\xfe and more text after it, all of it printable\n"
    path.write_bytes(raw)
    with pytest.raises(data.DataError, match=(
            rf"at byte offset {len(text.encode()) + 8} \(line 6, byte 0xff: invalid start byte\)")):
        "".join(data._decoded_text(path, "strict"))
    assert "".join(data._decoded_text(path, "replace")) == raw.decode("utf-8", "replace")
    path.write_bytes(text.encode() + "日".encode()[:2])  # cut short at the end of the file
    with pytest.raises(data.DataError, match=rf"offset {len(text.encode())} \(line 5, byte "
                                             r"0xe6: unexpected end of data\)"):
        "".join(data._decoded_text(path, "strict"))
    # A file that starts with 10 KB of zero bytes is refused before the rest is read.
    monkeypatch.setattr(data, "READ_BYTES", 1024)
    path.write_bytes(b"\0" * 10240 + b"text " * 2048)
    with pytest.raises(data.DataError, match="is not text: 100% of the 7,168 characters read"):
        "".join(data._decoded_text(path, "strict"))


def test_every_file_is_checked(tmp_path):
    write_corpus(tmp_path / "corpus")  # part0..2.txt: many paragraphs before the last file
    latin1_file(tmp_path / "corpus" / "zz_last.txt")
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"), data_dir=str(tmp_path / "tfds"))
    assert f"file {str(tmp_path / 'corpus' / 'zz_last.txt')!r} is not valid UTF-8" in (
        text_error(cfg))
    (tmp_path / "corpus" / "sub").mkdir()
    random_file(tmp_path / "corpus" / "sub" / "noise.md", size=4096)
    assert "noise.md' is not text" in text_error(cfg)  # sub/ sorts before zz_last.txt
    assert "noise.md' is not text" in text_error(dataclasses.replace(cfg,
                                                                     encoding_errors="replace"))


def test_a_prepared_corpus_is_not_read_again_by_check_data(corpus, monkeypatch):
    cfg, _ = corpus
    reads = []
    decoded_text = data._decoded_text
    monkeypatch.setattr(data, "_decoded_text",
                        lambda path, errors: reads.append(path) or decoded_text(path, errors))
    data.check_data(cfg)
    assert len(reads) == 3  # every file
    data.eval_batches(cfg, batch_size=2, num_batches=1)  # prepares it, reading each file again
    assert len(reads) == 6
    data.check_data(cfg)
    assert len(reads) == 6  # prepared from these very files under these settings: checked then
    replace = dataclasses.replace(cfg, encoding_errors="replace")
    data.check_data(replace)
    assert len(reads) == 9  # another setting, another corpus
    data.eval_batches(replace, batch_size=2, num_batches=1)
    assert len(prepared(cfg)) == 2


def test_encoding_errors_config_key():
    from jaxtricks.lm import config as config_lib

    assert config_lib.load(None, ["data.encoding_errors=replace"]).data.encoding_errors == (
        "replace")
    assert DataConfig().encoding_errors == "strict"
    with pytest.raises(config_lib.ConfigError, match="data.encoding_errors='ignore' is not "
                                                     "allowed; choose one of strict, replace"):
        config_lib.load(None, ["data.encoding_errors=ignore"])


TINY_RUN = ["data.tokenizer=byte",  # bytes: smaller and quicker than the default BPE
            "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
            "model.max_seq_len=32", "data.seq_len=32", "train.batch_size=4", "train.steps=3",
            "train.log_every=1", "train.eval_every=100", "train.eval_batches=1",
            "train.checkpoint_every=100", "train.sample_tokens=0", "optimizer.warmup_steps=0"]


@pytest.mark.slow
def test_train_py_refuses_latin1_and_random_bytes_and_trains_with_replace(tmp_path, python):
    latin1 = tmp_path / "latin1.txt"
    offset = latin1_file(latin1).index("é".encode("latin-1"))
    noise = tmp_path / "noise.bin"
    random_file(noise)
    tfds_dir = tmp_path / "tfds"

    def train(path, workdir, *overrides):
        return python.run("train.py", "--workdir", str(workdir), *TINY_RUN, "data.source=text",
                          f"data.path={path}", f"data.data_dir={tfds_dir}", *overrides)

    for path, message in [
        (latin1, f"data.path file {str(latin1)!r} is not valid UTF-8: the first invalid sequence "
                 f"is at byte offset {offset} (line 1, byte 0xe9: invalid continuation byte)"),
        (noise, f"data.path file {str(noise)!r} is not text: "),
    ]:
        done = train(path, tmp_path / "refused")
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith(f"error: {message}"), done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not (tmp_path / "refused").exists() and not tfds_dir.exists()  # nothing written
    done = train(noise, tmp_path / "refused", "data.encoding_errors=replace")
    assert done.returncode == 2 and "is not text" in done.stderr, done.stderr
    assert not (tmp_path / "refused").exists() and not tfds_dir.exists()

    done = train(latin1, tmp_path / "run", "data.encoding_errors=replace")
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps
    assert len(prepared(DataConfig(data_dir=str(tfds_dir)))) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"][
        "encoding_errors"] == "replace"


def test_check_data_writes_nothing(tmp_path):
    write_corpus(tmp_path / "corpus")
    data.check_data(DataConfig(source="text", path=str(tmp_path / "corpus"),
                               data_dir=str(tmp_path / "tfds")))
    data.check_data(DataConfig(data_dir=str(tmp_path / "tfds")))
    assert not (tmp_path / "tfds").exists()


def test_tfds_errors(tmp_path, tiny_lines):
    def error(**kw):
        cfg = dataclasses.replace(tiny_lines, **kw)
        with pytest.raises(data.DataError) as e:
            data.check_data(cfg)
        with pytest.raises(data.DataError) as e2:  # train_iterator explains the same way
            next(data.train_iterator(cfg, batch_size=2, seed=0))
        assert str(e2.value) == str(e.value)
        return str(e.value)

    empty = str(tmp_path / "empty")
    message = error(name="lm1b", data_dir=empty)
    assert "not prepared" in message
    assert f"`tfds build lm1b --file_format=array_record --data_dir={empty}`" in message
    assert not os.path.exists(empty)  # nothing written
    assert "neither in the TFDS catalog" in error(name="no_such_dataset_xyz")
    assert "data.train_split='validation' is not a split of tiny_lines; allowed: train, test" in (
        error(train_split="validation"))
    with pytest.raises(data.DataError, match="data.val_split='dev' is not a split"):
        data.check_data(dataclasses.replace(tiny_lines, val_split="dev"))
    assert "data.text_field='text' is not a text feature of tiny_lines; allowed: sentence" in (
        error(text_field="text"))
    assert "allowed: sentence" in error(text_field="id")  # an int64 feature is not text

    parquet = tmp_path / "parquet"
    TinyLines(data_dir=str(parquet), file_format="parquet").download_and_prepare()
    assert "as parquet, not array_record" in error(data_dir=str(parquet))


def test_argument_errors(tiny_lines):
    cfg = tiny_lines
    with pytest.raises(data.DataError, match="batch_size=0 is out of range"):
        data.train_iterator(cfg, batch_size=0, seed=0)
    with pytest.raises(data.DataError, match="num_batches=0 is out of range"):
        data.eval_batches(cfg, batch_size=2, num_batches=0)
