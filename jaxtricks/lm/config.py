"""Typed configuration: frozen dataclasses, YAML files, ``key.sub=value`` overrides, validation.

Every error raised here is a :class:`ConfigError` whose message names the key, the value and what is
allowed, so ``train.py`` can print it as one line and exit before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import optax
import yaml

import jaxtricks
from jaxtricks.lm.tokenizer import BYTE_VOCAB_SIZE, MAX_BPE_VOCAB, MIN_BPE_VOCAB, padded_vocab_size


class ConfigError(ValueError):
    """A configuration value or key that is not allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the decoder-only transformer."""

    # Rows of the embedding: "auto" is the tokenizer's size rounded up to a multiple of 64 (the
    # byte tokenizer's 257 -> 320); the padded rows' logits are masked out of loss and sampling.
    vocab_size: int | Literal["auto"] = "auto"
    num_layers: int = 3
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512  # hidden width of the MLP
    max_seq_len: int = 128  # the model's context: the longest sequence it can read
    dropout: float = 0.0
    position: Literal["learned", "rope"] = "learned"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    # How causal attention is computed: "xla" is jax.nn.dot_product_attention's XLA path, "cudnn"
    # cuDNN's fused kernel (a GPU, bfloat16 or float16); "auto" takes cuDNN where it applies and on
    # a CPU the blocked attention of jaxtricks/lm/cpu.py (the masked blocks are never computed).
    attention: Literal["auto", "xla", "cudnn"] = "auto"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into training sequences."""

    source: Literal["embedded", "text", "tfds"] = "embedded"
    path: str = ""  # source=text: a file, a folder or a glob of text files
    name: str = ""  # source=tfds: a dataset prepared in array_record format, e.g. "lm1b"
    train_split: str = "train"
    val_split: str = "validation"  # source=tfds: e.g. "test" for lm1b
    text_field: str = "text"
    # byte: UTF-8 bytes (257 tokens with the end-of-document token); bpe: a byte-level BPE of
    # bpe_vocab_size tokens learned from the training split (Hugging Face tokenizers).
    tokenizer: Literal["byte", "bpe"] = "bpe"
    bpe_vocab_size: int = 4096
    data_dir: str = ""  # where TFDS datasets live ("" = TFDS's default, ~/tensorflow_datasets)
    seq_len: int = 128  # tokens per training sequence (<= model.max_seq_len)
    val_fraction: float = 0.05  # source=embedded/text: share of documents held out for validation
    # source=text: files must be UTF-8 ("strict"); "replace" reads each invalid byte sequence as
    # U+FFFD instead. Either way a file that is mostly not printable is refused as not text.
    encoding_errors: Literal["strict", "replace"] = "strict"
    num_workers: int = 0  # grain worker processes (0 = read in the main process)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and every training trick of the library; 0 or null switches a trick off."""

    name: Literal["sgd", "momentum", "adam", "adamw"] = "adamw"
    learning_rate: float = 3e-3  # peak learning rate
    schedule: Literal[
        "constant", "cosine", "linear", "exponential", "polynomial", "wsd", "inverse_sqrt"
    ] = "cosine"
    warmup_steps: int = 50
    end_value: float = 0.0  # learning rate at the end of the decay
    decay_rate: float = 0.0  # schedule=exponential: lr * exp(-decay_rate * t)
    power: float = 1.0  # schedule=polynomial
    decay_fraction: float = 0.2  # schedule=wsd: share of the run spent decaying
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # schedule=wsd
    momentum: float = 0.9  # name=momentum
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # clip by global norm
    l1: float = 0.0  # strength of strength * sum |w|
    l2: float = 0.0  # strength of strength * sum w**2
    weight_decay: float = 0.0  # decoupled (AdamW-style) decay rate
    decay_all: bool = False  # false: regularize only matrices and embeddings (decay_mask)
    skip_nonfinite: bool = True  # a NaN/inf gradient leaves parameters and state untouched


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how often to log, evaluate and save."""

    steps: int = 900
    batch_size: int = 16  # global: split across all devices
    # Gradient accumulation: each device's batch in this many parts, one update from their mean
    # gradient. Scanned (memory: one part's activations) unless unrolled (XLA may run the parts
    # side by side: no memory saved, a fuller CPU).
    microbatches: int = 1
    unroll_microbatches: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 10  # stop after this many non-finite steps in a row
    sample_prompt: str = "The "
    sample_tokens: int = 200  # length of the text sampled at the end (0 = none)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How parallelism=mesh lays out the devices of all processes: data x fsdp x tensor devices,
    their product the global device count; one of the three may be -1 (the devices left)."""

    data: int = -1  # data parallel: the batch is split, parameters and optimizer state replicated
    fsdp: int = 1  # fully sharded data parallel: the batch, parameters and optimizer state split
    tensor: int = 1  # tensor parallel: attention heads and the MLP's hidden width split


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several processes (hosts) in one run, through jax.distributed.initialize. All unset: one
    process, unless a cluster is detected (a Cloud TPU VM slice, a SLURM job of several tasks)."""

    coordinator: str = ""  # host:port of process 0, reachable from every process
    num_processes: int | None = None  # processes in the run
    process_id: int | None = None  # this process: 0 .. num_processes - 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # mesh: one jitted step over a device mesh (the `mesh` keys); single: that step on one device;
    # pmap: jax.pmap of the same step over this process's devices (data parallel, one process);
    # auto: mesh when there is more than one device, else single.
    parallelism: Literal["auto", "single", "pmap", "mesh"] = "auto"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    cpu_devices: int | None = None  # split a CPU host into this many devices (None: JAX's default)

    def __post_init__(self):
        if self.model.vocab_size == "auto":  # the tokenizer's size, padded: known from the config
            size = BYTE_VOCAB_SIZE if self.data.tokenizer == "byte" else self.data.bpe_vocab_size
            model = dataclasses.replace(self.model, vocab_size=padded_vocab_size(size))
            object.__setattr__(self, "model", model)


# --------------------------------------------------------------------------- building from dicts


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed: {', '.join(sorted(allowed))}."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}."
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for option in inner:  # e.g. int | Literal["auto"]
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        allowed = [", ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                   else {int: "an integer", float: "a number"}.get(a, a.__name__) for a in inner]
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {' or '.join(allowed)}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string.")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not user input


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'." + _suggest(key, list(fields)))
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts."""
    config = _build(Config, data)
    validate(config)
    return config


# Keys of older versions, dropped when a saved config is read (a run made before can resume).
RETIRED_KEYS = (("model", "attention_blocks"),)  # replaced by model.attention


# Keys whose default changed, with the value a config saved before they existed meant.
EARLIER_DEFAULTS = (("data", "tokenizer", "byte"),)


def from_saved(data: dict[str, Any]) -> Config:
    """:func:`from_dict` for a config saved with a checkpoint, without :data:`RETIRED_KEYS` and
    with :data:`EARLIER_DEFAULTS` where it predates them."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key in RETIRED_KEYS:
        data.get(section, {}).pop(key, None)
    for section, key, value in EARLIER_DEFAULTS:
        data.setdefault(section, {}).setdefault(key, value)
    return from_dict(data)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to nested dicts; values are parsed as YAML scalars."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    valid = _all_keys()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} must look like key.sub=value, e.g. train.steps=100."
            )
        if key not in valid:
            raise ConfigError(f"unknown config key '{key}'." + _suggest(key, valid))
        value = yaml.safe_load(raw) if raw.strip() else ""
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{p}' must be a mapping.")
        node[leaf] = value
    return data


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (the defaults when ``path`` is None), apply overrides and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    return from_dict(apply_overrides(data, list(overrides)))


# --------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}.")


def validate(c: Config) -> None:
    """Reject out-of-range values before anything is built; each message names key and range."""
    m, d, o, t = c.model, c.data, c.optimizer, c.train
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.d_model", m.d_model), ("model.num_heads", m.num_heads), ("model.d_ff", m.d_ff),
        ("model.max_seq_len", m.max_seq_len),
        ("data.seq_len", d.seq_len),
        ("train.steps", t.steps), ("train.batch_size", t.batch_size),
        ("train.microbatches", t.microbatches),
        ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
        ("train.eval_batches", t.eval_batches), ("train.checkpoint_every", t.checkpoint_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.max_consecutive_skips", t.max_consecutive_skips),
    ]:
        _check(value >= 1, key, value, "an integer >= 1")
    _check(MIN_BPE_VOCAB <= d.bpe_vocab_size <= MAX_BPE_VOCAB, "data.bpe_vocab_size",
           d.bpe_vocab_size, f"{MIN_BPE_VOCAB} to {MAX_BPE_VOCAB:,} (the 256 bytes, the "
           "end-of-document token and the merges)")
    if d.tokenizer == "byte":
        _check(m.vocab_size >= BYTE_VOCAB_SIZE, "model.vocab_size", m.vocab_size,
               ">= 257 (the byte tokenizer's 256 bytes and the end-of-document token), or auto")
    else:
        _check(m.vocab_size >= d.bpe_vocab_size, "model.vocab_size", m.vocab_size,
               f">= data.bpe_vocab_size={d.bpe_vocab_size} (the tokenizer's size), or auto")
    _check(m.d_model % m.num_heads == 0, "model.d_model", m.d_model,
           f"a multiple of model.num_heads={m.num_heads}")
    _check(m.position != "rope" or (m.d_model // m.num_heads) % 2 == 0, "model.position",
           m.position, "'rope' only with an even head dimension (d_model / num_heads)")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "0 <= dropout < 1")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
           f"<= model.max_seq_len={m.max_seq_len} (the model's context)")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 < fraction < 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _check(t.batch_size % t.microbatches == 0, "train.batch_size", t.batch_size,
           f"a multiple of train.microbatches={t.microbatches}")
    _check(c.cpu_devices is None or c.cpu_devices >= 1, "cpu_devices", c.cpu_devices,
           "an integer >= 1, or null for JAX's default")
    _validate_parallelism(c)
    if d.source == "text":
        _check(bool(d.path), "data.path", d.path, "a file, folder or glob when data.source=text")
    if d.source == "tfds":
        _check(bool(d.name), "data.name", d.name,
               "a prepared TFDS dataset name (e.g. lm1b) when data.source=tfds")
    for key, value in [("optimizer.learning_rate", o.learning_rate), ("optimizer.eps", o.eps)]:
        _check(math.isfinite(value) and value > 0, key, value, "a finite number > 0")
    for key, value in [("optimizer.end_value", o.end_value), ("optimizer.l1", o.l1),
                       ("optimizer.l2", o.l2), ("optimizer.weight_decay", o.weight_decay),
                       ("optimizer.decay_rate", o.decay_rate)]:
        _check(math.isfinite(value) and value >= 0, key, value, "a finite number >= 0")
    _check(o.end_value <= o.learning_rate, "optimizer.end_value", o.end_value,
           f"<= optimizer.learning_rate={o.learning_rate}")
    _check(o.power > 0, "optimizer.power", o.power, "a number > 0")
    _check(0.0 < o.decay_fraction <= 1.0, "optimizer.decay_fraction", o.decay_fraction,
           "0 < fraction <= 1")
    for key, value in [("optimizer.momentum", o.momentum), ("optimizer.b1", o.b1),
                       ("optimizer.b2", o.b2)]:
        _check(0.0 <= value < 1.0, key, value, "0 <= value < 1")
    _check(o.clip_norm is None or (math.isfinite(o.clip_norm) and o.clip_norm > 0),
           "optimizer.clip_norm", o.clip_norm, "a number > 0, or null to switch clipping off")
    _check(0 <= o.warmup_steps < t.steps, "optimizer.warmup_steps", o.warmup_steps,
           f"0 <= warmup_steps < train.steps={t.steps}")
    if o.schedule == "inverse_sqrt":
        _check(o.warmup_steps >= 1, "optimizer.warmup_steps", o.warmup_steps,
               ">= 1 with schedule=inverse_sqrt")


def _validate_parallelism(c: Config) -> None:
    """The mesh and distributed keys on their own (against the devices: in the trainer's
    preflight, :func:`jaxtricks.lm.sharding.plan`)."""
    mesh, dist = c.mesh, c.distributed
    sizes = {"mesh.data": mesh.data, "mesh.fsdp": mesh.fsdp, "mesh.tensor": mesh.tensor}
    for key, value in sizes.items():
        _check(value >= 1 or value == -1, key, value, "an integer >= 1, or -1 for the devices left")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(
            "mesh.data, mesh.fsdp and mesh.tensor: at most one of them may be -1 (got "
            + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")."
        )
    if c.parallelism in ("single", "pmap"):
        for key in ("mesh.fsdp", "mesh.tensor"):
            _check(sizes[key] == 1, key, sizes[key],
                   f"1 with parallelism={c.parallelism} (sharding needs parallelism=mesh or auto)")
    given = [dist.coordinator != "", dist.num_processes is not None, dist.process_id is not None]
    if any(given) and not all(given):
        raise ConfigError(
            "distributed.coordinator, distributed.num_processes and distributed.process_id are set "
            f"together or not at all (got coordinator={dist.coordinator!r}, "
            f"num_processes={dist.num_processes!r}, process_id={dist.process_id!r})."
        )
    if all(given):
        host, _, port = dist.coordinator.rpartition(":")
        _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed.coordinator",
               dist.coordinator, "host:port of process 0, e.g. 10.0.0.1:1234")
        _check(dist.num_processes >= 1, "distributed.num_processes", dist.num_processes,
               "an integer >= 1")
        _check(0 <= dist.process_id < dist.num_processes, "distributed.process_id",
               dist.process_id, f"0 <= process_id < distributed.num_processes={dist.num_processes}")
        _check(c.parallelism in ("auto", "mesh") or dist.num_processes == 1, "parallelism",
               c.parallelism, "auto or mesh with several processes (single and pmap run within "
               "one process)")


# --------------------------------------------------------------------------- config -> optimizer


def schedule_from_config(cfg: Any, total_steps: int) -> jaxtricks.Schedule:
    """The learning-rate schedule of an ``OptimizerConfig`` for a run of ``total_steps`` updates.

    ``cfg.warmup_steps`` of linear warmup from 0 to ``cfg.learning_rate``, then the chosen decay
    over the remaining ``R = total_steps - warmup_steps`` steps:

    - ``constant``: the peak;
    - ``cosine``: :func:`jaxtricks.cosine_decay` to ``end_value`` over ``R``;
    - ``linear``: :func:`jaxtricks.polynomial_decay` with power 1 to ``end_value`` over ``R``;
    - ``polynomial``: :func:`jaxtricks.polynomial_decay` with ``power`` to ``end_value`` over ``R``;
    - ``exponential``: :func:`jaxtricks.exponential_decay` with ``decay_rate``, floored at
      ``end_value``;
    - ``wsd``: :func:`jaxtricks.warmup_stable_decay` whose decay lasts ``decay_fraction`` of the
      whole run
      (``round(decay_fraction * total_steps)``, at least 1, at most ``R``) with ``decay_shape``;
    - ``inverse_sqrt``: :func:`jaxtricks.inverse_sqrt` with the warmup as its ``W`` (needs
      ``warmup_steps >= 1``).

    Optax's convention: update ``i`` (from 0) uses ``schedule(i)``; the decays reach
    ``end_value`` at step ``total_steps``, one past the last update.

    Args:
      cfg: a :class:`jaxtricks.lm.config.OptimizerConfig`.
      total_steps: the number of updates in the run (``train.steps``), > ``cfg.warmup_steps``.

    Returns:
      ``schedule(step) -> float32 array``.

    Example:
      >>> from jaxtricks.lm.config import OptimizerConfig
      >>> import jaxtricks
      >>> cfg = OptimizerConfig(learning_rate=1.0, schedule="linear", warmup_steps=2)
      >>> schedule = schedule_from_config(cfg, total_steps=6)
      >>> [float(schedule(t)) for t in range(7)]
      [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}.")
    warmup = cfg.warmup_steps
    if not 0 <= warmup < total_steps:
        raise ValueError(
            f"warmup_steps must be < total_steps={total_steps}, got {cfg.warmup_steps!r}."
        )
    remaining = total_steps - warmup
    peak, end = cfg.learning_rate, cfg.end_value
    kind = cfg.schedule
    if kind == "wsd":
        decay = min(remaining, max(1, round(cfg.decay_fraction * total_steps)))
        return jaxtricks.warmup_stable_decay(
            peak, warmup, remaining - decay, decay, end_value=end, decay_shape=cfg.decay_shape
        )
    if kind == "inverse_sqrt":
        return jaxtricks.inverse_sqrt(peak, warmup)
    if kind == "constant":
        after = jaxtricks.constant(peak)
    elif kind == "cosine":
        after = jaxtricks.cosine_decay(peak, remaining, end_value=end)
    elif kind == "linear":
        after = jaxtricks.polynomial_decay(peak, remaining, power=1.0, end_value=end)
    elif kind == "polynomial":
        after = jaxtricks.polynomial_decay(peak, remaining, power=cfg.power, end_value=end)
    elif kind == "exponential":
        after = jaxtricks.exponential_decay(peak, cfg.decay_rate, end_value=end)
    else:
        raise ValueError(
            "schedule must be one of constant, cosine, linear, exponential, polynomial, wsd, "
            f"inverse_sqrt, got {kind!r}."
        )
    return jaxtricks.warmup_then(warmup, after)


def optimizer_from_config(
    cfg: Any, total_steps: int, *, learning_rate: Any = None
) -> optax.GradientTransformationExtraArgs:
    """:func:`jaxtricks.make_optimizer` for an ``OptimizerConfig`` and a run of ``total_steps``.

    The learning rate is :func:`schedule_from_config` unless ``learning_rate`` replaces it;
    ``decay_all=False`` restricts l1, l2 and weight_decay to :func:`jaxtricks.decay_mask`
    (matrices and embeddings). The L1 / L2 penalties are recorded (the trainer logs them).

    Args:
      cfg: a :class:`jaxtricks.lm.config.OptimizerConfig`.
      total_steps: the number of updates in the run (``train.steps``).
      learning_rate: a number or schedule to use instead of the configured schedule (the
        learning-rate range test sweeps its own).

    Returns:
      The chain of :func:`jaxtricks.make_optimizer`.

    Example:
      >>> from jaxtricks.lm.config import OptimizerConfig
      >>> import jax.numpy as jnp, jaxtricks
      >>> tx = optimizer_from_config(OptimizerConfig(), total_steps=100)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> _, state = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
      >>> sorted(jaxtricks.optimizer_stats(state))
      ['clipped', 'consecutive_skipped', 'grad_norm', 'learning_rate', 'skipped', 'skipped_step']
    """
    return jaxtricks.make_optimizer(
        name=cfg.name,
        learning_rate=(
            schedule_from_config(cfg, total_steps) if learning_rate is None else learning_rate
        ),
        momentum=cfg.momentum,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        clip_norm=cfg.clip_norm,
        l1=cfg.l1,
        l2=cfg.l2,
        weight_decay=cfg.weight_decay,
        mask=None if cfg.decay_all else jaxtricks.decay_mask,
        skip_nonfinite=cfg.skip_nonfinite,
        record_penalties=True,
    )
