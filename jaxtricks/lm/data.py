"""Text data: TFDS data sources, read by random access and cut into training batches by grain.

Every source becomes a TFDS dataset in array_record format, opened with ``as_data_source()``:

* ``embedded`` (the default): the English text of Python's own documentation
  (``pydoc_data.topics``, shipped with every Python), so the default run downloads nothing;
* ``text``: local text files (``data.path``: a file, a folder or a glob), checked to be UTF-8
  (or read with U+FFFD for invalid bytes: ``data.encoding_errors``) and text;
* ``tfds``: any TFDS text dataset already prepared in array_record format (``lm1b``, ...).

The first two are prepared by :class:`JaxtricksText`, a TFDS builder of our own, once per corpus:
its config name is a fingerprint of the corpus, so a changed corpus is prepared anew and an
unchanged one is reused. A document is a paragraph (blank-line separated); ``data.val_fraction`` of
them are held out, deterministically, as the ``validation`` split.

From there one pipeline serves all three::

    the split's documents
    -> shuffled per epoch (numpy permutation seeded by (seed, epoch); validation is not shuffled)
    -> read DOCS_PER_GROUP at a time, tokenized, each followed by EOS            (grain MapDataset)
    -> concatenated and split into blocks of batch_size * (seq_len + 1) tokens  (grain packing)
    -> reshaped to (batch_size, seq_len + 1): inputs = [:, :-1], targets = [:, 1:]

No token is lost or repeated within an epoch and epochs follow each other without a gap. The
iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` resume exactly.

The batches are global: every process runs the same pipeline and hands the step only its own
rows (``jax.make_array_from_process_local_data`` in :mod:`jaxtricks.lm.step`). Packing documents
across rows needs the lengths of all the documents before a row, so each process reads the
global batch's documents; in exchange the sequence of batches and the iterator's state do not
depend on the number of processes, and a run resumes on another topology with the same batches.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from glob import glob
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags as absl_flags

from jaxtricks.lm import tokenizer as tokenizer_lib
from jaxtricks.lm.config import DataConfig
from jaxtricks.lm.tokenizer import BYTE_VOCAB_SIZE as VOCAB_SIZE  # noqa: F401 (the data's names)
from jaxtricks.lm.tokenizer import ByteTokenizer

EOS_ID = ByteTokenizer.eos_id  # the byte tokenizer's end-of-document token
BPE_TRAIN_DOCS = 200_000  # a BPE learns from at most this many training documents, evenly spaced

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")  # files read from a folder given as data.path
DOCS_PER_GROUP = 64  # documents read per grain element: amortizes grain's per-element overhead
CACHE_BYTES = 64 * 2**20  # decoded documents kept in memory per iterator (whole small corpora)
READ_BYTES = 2**20  # text files are read and decoded this many bytes at a time
# A text file with more than this share of characters that are neither printable nor whitespace
# (U+FFFD included) is "not text": prose has next to none, random or compressed bytes about half
# (decoded with U+FFFD for each invalid sequence), executables and UTF-16 at least half.
NOT_TEXT_SHARE = 0.3


class DataError(ValueError):
    """A data source that cannot be read; the message names what is wrong and what is allowed."""


# --------------------------------------------------------------------------- our TFDS builder


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, keeping their indentation, without empty ones."""
    return [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _too_few_paragraphs(description: str, count: int) -> DataError:
    return DataError(
        f"{description} has {count} paragraph(s); at least 2 are needed to hold out validation "
        "(paragraphs are separated by blank lines)."
    )


# Printable ASCII and ASCII whitespace, by byte; the rest of 0..127 (controls) is not text.
_TEXT_ASCII = bytes(b for b in range(128) if chr(b).isprintable() or chr(b).isspace())


@functools.cache
def _not_text_table() -> np.ndarray:
    """``table[code point]``: the character is neither printable nor whitespace, or is U+FFFD."""
    table = np.fromiter((not (c.isprintable() or c.isspace())
                         for c in map(chr, range(0x110000))), bool, 0x110000)
    table[0xFFFD] = True  # what errors='replace' makes of invalid UTF-8
    return table


def _not_text_count(text: str, raw: bytes) -> int:
    """How many characters of ``text`` (decoded from ``raw``) are neither printable nor
    whitespace, U+FFFD counted among them."""
    if text.isascii():
        return len(raw.translate(None, _TEXT_ASCII))
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    return int(np.count_nonzero(_not_text_table()[codes]))


def _decoded_text(path: Path, encoding_errors: str) -> Iterator[str]:
    """The text of the file at ``path``, decoded from UTF-8 ``READ_BYTES`` at a time.

    Raises :class:`DataError` if the file is not valid UTF-8 (with ``encoding_errors='strict'``;
    ``'replace'`` reads each invalid sequence as U+FFFD), or is not text: more than
    ``NOT_TEXT_SHARE`` of its characters neither printable nor whitespace, U+FFFD counted among
    them. Reads the whole file, except to refuse it: it stops as soon as the share is sure to be
    exceeded, and with ``'strict'`` after the block holding the first invalid sequence (the share
    of what was read then chooses the message).
    """
    size = path.stat().st_size
    invalid = None  # (byte offset, line, reason, byte) of the first invalid sequence
    chars = not_text = 0  # characters decoded so far, and how many of them are not text
    decoded = newlines = 0  # bytes decoded so far, and the newlines among them
    pending = b""  # the start of a multibyte sequence cut by the end of a block
    with path.open("rb") as f:
        while True:
            block = f.read(READ_BYTES)
            data, final = pending + block, not block
            if invalid is None:
                try:
                    text, used = codecs.utf_8_decode(data, "strict", final)
                    newlines += data.count(b"\n", 0, used)
                except UnicodeDecodeError as e:
                    line = newlines + data.count(b"\n", 0, e.start) + 1
                    invalid = (decoded + e.start, line, e.reason, data[e.start])
            if invalid is not None:
                text, used = codecs.utf_8_decode(data, "replace", final)
            chars += len(text)
            not_text += _not_text_count(text, data[:used])
            decoded += used
            pending = data[used:]
            if not_text > NOT_TEXT_SHARE * (chars + max(0, size - decoded)):
                break  # over the share, whatever the rest of the file holds
            if invalid is not None and encoding_errors == "strict":
                break
            yield text
            if final:
                break
    if not_text > NOT_TEXT_SHARE * chars:
        raise DataError(
            f"data.path file {str(path)!r} is not text: {not_text / chars:.0%} of the {chars:,} "
            "characters read are neither printable nor whitespace (U+FFFD, which stands for bytes "
            f"that are not UTF-8, counted among them); allowed: at most {NOT_TEXT_SHARE:.0%}."
        )
    if invalid is not None and encoding_errors == "strict":
        offset, line, reason, byte = invalid
        raise DataError(
            f"data.path file {str(path)!r} is not valid UTF-8: the first invalid sequence is at "
            f"byte offset {offset} (line {line}, byte {byte:#04x}: {reason}); convert the file to "
            "UTF-8, or set data.encoding_errors=replace to read each invalid sequence as U+FFFD."
        )


def _check_text_files(files: list[Path], cfg: DataConfig) -> None:
    """Refuse a file that is not UTF-8 (under data.encoding_errors=strict) or not text, and text
    files with fewer than 2 paragraphs in all. Reads every file (see :func:`_decoded_text`), and
    keeps a file's text only until 2 paragraphs are found."""
    count = 0
    for f in files:
        chunks = _decoded_text(f, cfg.encoding_errors)
        if count >= 2:
            collections.deque(chunks, maxlen=0)  # read it through: the checks run as it is read
        else:
            count += len(paragraphs("".join(chunks)))
    if count < 2:
        raise _too_few_paragraphs(_text_description(cfg, files), count)


def _text_description(cfg: DataConfig, files: list[Path]) -> str:
    return f"data.path={cfg.path!r} ({len(files)} files)"


def _embedded_topics() -> list[str]:
    from pydoc_data.topics import topics  # 79 topics, ~465 KB of English text

    return [topics[name] for name in sorted(topics)]


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    """Which corpus :class:`JaxtricksText` prepares; ``name`` carries the corpus fingerprint."""

    files: tuple[str, ...] = ()  # local text files; empty = the embedded Python documentation
    val_fraction: float = 0.05
    encoding_errors: str = "strict"  # how the files are decoded: "strict" or "replace"


class JaxtricksText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Paragraphs of local text files, or of Python's documentation, as a TFDS dataset.

    Splits ``train`` and ``validation`` (``val_fraction`` of the paragraphs, chosen by a fixed
    seed); each example is ``{'text': paragraph}``. Prepared to
    ``data_dir/jaxtricks_text/<config name>/1.0.0/``.
    """

    VERSION = tfds.core.Version("1.0.0")  # bump when the paragraphs or the split change
    # Where TFDS looks for a checksums file of the downloads; we download nothing, and the lookup
    # fails for a builder inside a package when `importlib_resources` is not installed.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Paragraphs of local text files or of Python's documentation.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        if config.files:
            # The checks of check_data again, so that a corpus is prepared only from files that
            # pass them (and check_data may skip a corpus that is prepared).
            texts = ["".join(_decoded_text(Path(f), config.encoding_errors))
                     for f in config.files]
        else:
            texts = _embedded_topics()
        docs = [p for text in texts for p in paragraphs(text)]
        if len(docs) < 2:
            raise _too_few_paragraphs(config.description, len(docs))
        num_val = min(max(1, round(config.val_fraction * len(docs))), len(docs) - 1)
        is_val = np.zeros(len(docs), bool)
        is_val[np.random.default_rng(0).permutation(len(docs))[:num_val]] = True
        return {
            "train": self._generate_examples(docs, np.flatnonzero(~is_val)),
            "validation": self._generate_examples(docs, np.flatnonzero(is_val)),
        }

    def _generate_examples(self, docs: list[str], indices: np.ndarray):
        for i in indices:
            yield int(i), {"text": docs[i]}

    # TFDS prints these two lines on stdout; the trainer has its own progress output.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Silence TFDS's absl warnings (e.g. 'Using custom data configuration') and progress bars."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.disable_progress_bar()  # TFDS has no way to read the previous setting back
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _quiet_worker(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    logging.getLogger("absl").setLevel(logging.ERROR)


def _text_files(pattern: str) -> list[Path]:
    """The files ``data.path`` names: a file, the text files in a folder (recursively), a glob."""
    if not pattern:
        raise DataError("data.path is empty; allowed: a text file, a folder or a glob.")
    path = Path(pattern).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [
            f for f in path.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        ]
        if not files:
            raise DataError(
                f"data.path={pattern!r} is a folder without text files; allowed: files ending in "
                f"{', '.join(TEXT_SUFFIXES)} (searched recursively), or name the files by a glob."
            )
    elif any(c in pattern for c in "*?["):
        files = [Path(f) for f in glob(os.path.expanduser(pattern), recursive=True)]
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"data.path={pattern!r} is a glob that matches no file.")
    else:
        raise DataError(
            f"data.path={pattern!r} does not exist; allowed: a text file, a folder or a glob."
        )
    files = sorted({f.resolve() for f in files})
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"data.path={pattern!r} names only empty files ({len(files)}).")
    return files


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _corpus_builder(cfg: DataConfig) -> JaxtricksText:
    """The builder of the embedded or local-text corpus; its config name fingerprints the corpus
    (file names, sizes and mtimes, or the documentation's text), val_fraction and, for local text,
    encoding_errors (a corpus decoded with U+FFFD is never read as one that was valid UTF-8)."""
    if cfg.source == "embedded":
        files: tuple[str, ...] = ()
        digest = hashlib.sha256("\0".join(_embedded_topics()).encode()).hexdigest()
        name = "embedded-" + _fingerprint(digest, cfg.val_fraction)
        description = "Python's documentation (pydoc_data.topics)"
    else:
        paths = _text_files(cfg.path)
        files = tuple(str(p) for p in paths)
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        name = "text-" + _fingerprint(stats, cfg.val_fraction, cfg.encoding_errors)
        description = _text_description(cfg, paths)
    config = CorpusConfig(
        name=name, description=description, files=files, val_fraction=cfg.val_fraction,
        encoding_errors=cfg.encoding_errors,
    )
    with _quiet_tfds():
        return JaxtricksText(
            config=config, data_dir=cfg.data_dir or None, file_format="array_record"
        )


# --------------------------------------------------------------------------- checks and sources


def check_data(cfg: DataConfig) -> None:
    """Raise :class:`DataError` if ``cfg`` names data that cannot be read. Prepares and writes
    nothing, so the trainer calls it before compiling anything.

    Local text files are read through once, each: a file that is not valid UTF-8 (unless
    ``data.encoding_errors=replace``) or is not text is refused, and so are files with fewer than
    two paragraphs in all. A corpus already prepared from the same files (names, sizes, mtimes)
    with the same settings passed these checks when it was prepared, and is not read again.
    """
    if cfg.source == "text":
        files = _text_files(cfg.path)
        with _quiet_tfds():
            if _corpus_builder(cfg).is_prepared():
                return
        _check_text_files(files, cfg)
    if cfg.source != "tfds":
        return  # the embedded corpus is always there
    where = f"under data.data_dir={cfg.data_dir!r}" if cfg.data_dir else (
        f"under TFDS's default data dir {tfds.core.constants.get_default_data_dir()}")
    data_dir_flag = f" --data_dir={cfg.data_dir}" if cfg.data_dir else ""
    build = f"`tfds build {cfg.name} --file_format=array_record{data_dir_flag}`"
    try:
        with _quiet_tfds():
            builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
            prepared = builder.is_prepared()
    except Exception as e:  # DatasetNotFoundError, or a malformed name
        raise DataError(
            f"data.name={cfg.name!r} is neither in the TFDS catalog nor prepared {where} "
            f"({type(e).__name__}); allowed: a catalog dataset (e.g. lm1b) prepared there with "
            f"`tfds build NAME --file_format=array_record{data_dir_flag}`, or any dataset "
            "prepared there in array_record format."
        ) from None
    if not prepared:
        raise DataError(f"data.name={cfg.name!r} is not prepared {where}; prepare it with {build}.")
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise DataError(
            f"data.name={cfg.name!r} is prepared {where} as {', '.join(sorted(formats))}, not "
            f"array_record (the format read here); prepare it with {build}."
        )
    available = ", ".join(builder.info.splits)
    for key, split in [("data.train_split", cfg.train_split), ("data.val_split", cfg.val_split)]:
        try:
            builder.info.splits[split]
        except (KeyError, ValueError):
            raise DataError(
                f"{key}={split!r} is not a split of {cfg.name}; allowed: {available} "
                "(or a slice such as 'train[:90%]')."
            ) from None
    _check_text_field(cfg, builder.info.features)


def _check_text_field(cfg: DataConfig, features: tfds.features.FeaturesDict) -> None:
    texts = [k for k, f in features.items()
             if f.shape == () and np.dtype(f.np_dtype).kind == "O"]  # Text or a scalar string
    if cfg.text_field not in texts:
        raise DataError(
            f"data.text_field={cfg.text_field!r} is not a text feature of {cfg.name}; "
            f"allowed: {', '.join(texts) or '(none)'}."
        )


def _open_split(cfg: DataConfig, split: str) -> tuple[Sequence[dict], str]:
    """One split ('train' or 'validation') as a TFDS data source, and its text feature's name.
    Prepares the embedded / local-text corpus on first use."""
    if cfg.source == "tfds":
        try:  # tfds.data_source(), minus its download, plus a choice of format
            with _quiet_tfds():
                builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
                source = builder.as_data_source(
                    cfg.train_split if split == "train" else cfg.val_split,
                    file_format="array_record",
                )
        except Exception:
            check_data(cfg)  # says what is wrong as a DataError
            raise
        _check_text_field(cfg, builder.info.features)
        return source, cfg.text_field
    builder = _corpus_builder(cfg)
    with _quiet_tfds():
        if not builder.is_prepared():
            try:
                builder.download_and_prepare()
            except OSError:  # e.g. TFDS's final rename, when another process finished first
                builder = _corpus_builder(cfg)
                if not builder.is_prepared():
                    raise
    return builder.as_data_source(split), "text"


# --------------------------------------------------------------------------- the pipeline


class _DocumentGroups:
    """``(index, group) -> {'tokens': int32 array}``, for ``MapDataset.map_with_index``: the
    ``group``-th run of ``DOCS_PER_GROUP`` documents of the epoch that ``index`` falls in, each
    followed by EOS.

    Shuffling is a numpy permutation per epoch rather than ``MapDataset.shuffle``: grain's index
    shuffle costs ~15 us per document, TFDS's decoding another ~30 us, and a batch of 32 x 129
    tokens holds ~25 documents of the embedded corpus. For the same reason decoded documents are
    kept (up to ``CACHE_BYTES``), so later epochs of a small corpus read nothing.
    """

    def __init__(self, source, text_field: str, doc_ids: np.ndarray, seed: int | None,
                 tokenizer: Any):
        self.source, self.text_field, self.doc_ids, self.seed = source, text_field, doc_ids, seed
        self.tokenizer = tokenizer
        self._eos = np.array([tokenizer.eos_id], np.int32)
        self.docs_per_group = DOCS_PER_GROUP
        self.groups_per_epoch = -(-len(doc_ids) // self.docs_per_group)
        self._epoch, self._order = -1, doc_ids
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def _order_of(self, epoch: int) -> np.ndarray:
        if self.seed is not None and epoch != self._epoch:
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.doc_ids)
        return self._order

    def _document(self, i: int) -> np.ndarray:
        tokens = self._cache.get(i)
        if tokens is None:
            tokens = self.tokenizer.encode(self.source[i][self.text_field])
            if self._cached_bytes + tokens.nbytes <= CACHE_BYTES:
                self._cache[i] = tokens
                self._cached_bytes += tokens.nbytes
        return tokens

    def __call__(self, index: int, group: int) -> dict[str, np.ndarray]:
        order = self._order_of(index // self.groups_per_epoch)
        parts = []
        for i in order[group * self.docs_per_group:(group + 1) * self.docs_per_group]:
            parts += [self._document(int(i)), self._eos]
        return {"tokens": np.concatenate(parts, dtype=np.int32)}


def _to_batch(packed: dict[str, np.ndarray], *, batch_size: int) -> dict[str, np.ndarray]:
    rows = packed["tokens"].reshape(batch_size, -1)  # (batch, seq_len + 1)
    return {"inputs": np.ascontiguousarray(rows[:, :-1]),  # (batch, seq_len)
            "targets": np.ascontiguousarray(rows[:, 1:])}  # (batch, seq_len)


def _batches(cfg: DataConfig, split: str, *, batch_size: int, seed: int | None,
             tokenizer: Any) -> grain.IterDataset:
    """Endless batches of one split (shuffled per epoch when ``seed`` is not None)."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} is out of range; allowed: an integer >= 1.")
    source, text_field = _open_split(cfg, split)
    doc_ids = np.arange(len(source))
    if not len(doc_ids):
        raise DataError(f"the {split} split has no documents; allowed: at least one.")
    groups = _DocumentGroups(source, text_field, doc_ids, seed, tokenizer or ByteTokenizer())
    ds = grain.MapDataset.range(groups.groups_per_epoch).repeat().map_with_index(groups)
    # One reader thread, a few groups ahead: decoding overlaps the train step (which releases the
    # GIL), and _DocumentGroups is never called from two threads at once.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    # Packing a whole batch at once gives the same rows as packing rows of seq_len + 1 tokens
    # and batching them, at one packing step per batch instead of batch_size.
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": batch_size * (cfg.seq_len + 1)}
    )
    return ds.map(functools.partial(_to_batch, batch_size=batch_size))


class _JsonSafeIterator(grain.DatasetIterator):
    """The pipeline's iterator, restorable from a state that went through JSON (as in grain's and
    Orbax's checkpoints): grain's packing (0.2.18) compares its slices with a tuple, which JSON
    turns into a list, so without this a restored iterator would drop tokens."""

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                else _slices_as_tuples(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


def train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, tokenizer: Any = None
                   ) -> grain.DatasetIterator:
    """Endless training batches ``{'inputs', 'targets'}: int32 (batch_size, seq_len)``, the
    global batch (the same on every process). Documents are reshuffled every epoch from
    ``seed``; ``get_state()`` / ``set_state()`` resume exactly (with the same ``batch_size`` and
    ``num_workers``). ``tokenizer``: default the byte tokenizer (:func:`tokenizer_for` gives the
    config's). Prepares the embedded / local-text corpus on first use.

    >>> it = train_iterator(DataConfig(seq_len=16), batch_size=2, seed=0)  # doctest: +SKIP
    >>> next(it)["inputs"].shape  # doctest: +SKIP
    (2, 16)
    """
    ds = _batches(cfg, "train", batch_size=batch_size, seed=seed, tokenizer=tokenizer)
    if cfg.num_workers > 0:
        # grain 0.2.18 reads an absl flag in mp_prefetch, which fails unless absl parsed the
        # command line (google/grain#1355, fixed upstream): take the flags' defaults instead.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                            worker_init_fn=_quiet_worker)
    return _JsonSafeIterator(iter(ds))


def eval_batches(cfg: DataConfig, *, batch_size: int, num_batches: int, tokenizer: Any = None
                 ) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` global batches of the validation split, in stored order (no
    shuffle; wraps around if the split is shorter): the same on every call and process."""
    if num_batches < 1:
        raise DataError(f"num_batches={num_batches} is out of range; allowed: an integer >= 1.")
    it = iter(_batches(cfg, "validation", batch_size=batch_size, seed=None, tokenizer=tokenizer))
    return [next(it) for _ in range(num_batches)]


# --------------------------------------------------------------------------- tokenizers


def tokenizer_for(cfg: DataConfig) -> Any:
    """The tokenizer ``data.tokenizer`` names: bytes, or the BPE of ``data.bpe_vocab_size`` tokens
    learned from the training split (at most :data:`BPE_TRAIN_DOCS` documents, evenly spaced),
    once: it is saved beside the prepared data and read from there afterwards."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = bpe_path(cfg)
    if path.is_file():
        return tokenizer_lib.load(path)
    source, text_field = _open_split(cfg, "train")  # the training split only
    ids = np.unique(np.linspace(0, len(source) - 1, min(len(source), BPE_TRAIN_DOCS)).astype(int))
    texts = (_as_str(source[int(i)][text_field]) for i in ids)
    bpe = tokenizer_lib.train_bpe(texts, cfg.bpe_vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    bpe.save(path)  # atomic: another process training the same BPE writes the same file
    return bpe


def documents(cfg: DataConfig, split: str) -> list[str]:
    """The documents of ``split`` (``"train"`` or ``"validation"``) as text, in stored order;
    e.g. the held-out documents, for ``jaxtricks eval``::

        text = "\\n\\n".join(documents(cfg, "validation"))
    """
    source, text_field = _open_split(cfg, split)
    return [_as_str(source[i][text_field]) for i in range(len(source))]


def bpe_path(cfg: DataConfig) -> Path:
    """Where the BPE of ``cfg``'s corpus and vocabulary size lives: beside the prepared data."""
    if cfg.source == "tfds":
        with _quiet_tfds():
            builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
        where = Path(builder.data_dir) / ("jaxtricks-" + re.sub(r"[^\w.-]", "_", cfg.train_split))
    else:
        where = Path(_corpus_builder(cfg).data_dir)
    return where / f"bpe-{cfg.bpe_vocab_size}-{tokenizer_lib.FILE_NAME}"


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text
