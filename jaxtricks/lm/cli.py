"""The ``jaxtricks`` command: tools around a training run (``train.py`` does the training).

    jaxtricks lr-find [--config FILE] [--workdir DIR] [--out DIR] [--min-lr 1e-7] [--max-lr 10]
                      [--steps 100] [key.sub=value ...]
    jaxtricks plot-schedule [--config FILE] [--out FILE] [key.sub=value ...]
    jaxtricks report DIR [--out FILE]
    jaxtricks sample DIR [--prompt TEXT] [--max-new-tokens 200] [--temperature 0.8] [--top-k K]
                     [--top-p P] [--seed 0]
    jaxtricks eval DIR FILE [--json]

Every user error (a bad option, config key or value, unreadable data, no checkpoint) is one line on
stderr and exit status 2. Heavy imports (jax, the data pipeline, orbax) happen after parsing, only
in the subcommands that need them, so ``--help`` and ``report`` are quick.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


class UsageError(ValueError):
    """A command-line value that is not allowed."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument types


def _number(text: str, allowed: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {allowed}")
    return value


def _positive(text: str) -> float:
    return _number(text, "a finite number > 0", lambda v: v > 0)


def _temperature(text: str) -> float:
    return _number(text, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)


def _top_p(text: str) -> float:
    return _number(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed; allowed: an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed; allowed: an integer >= {minimum}")
        return value

    return parse


def _default_workdir(config_path: str | None) -> Path:
    """train.py's default workdir: runs/<config file stem> (runs/default without --config)."""
    return Path("runs") / (Path(config_path).stem if config_path else "default")


# --------------------------------------------------------------------------- subcommands


def cmd_lr_find(args) -> int:
    from jaxtricks.lm.cpu import tune_host_malloc

    tune_host_malloc()  # before JAX starts its threads, as train.py does
    from jaxtricks.lm import config as config_lib
    from jaxtricks.lm import lr_find, plots, training

    lr_find.check_range(args.min_lr, args.max_lr, args.steps)
    config = config_lib.load(args.config, args.overrides)
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.config)
    out = Path(args.out) if args.out else workdir / "lr_find"
    if out.resolve() == (workdir / "checkpoints").resolve() or (
        workdir / "checkpoints").resolve() in out.resolve().parents:
        raise UsageError(f"--out {out} is inside the workdir's checkpoints; choose another folder.")
    training.preflight(config, out)  # batch vs devices, data, out writable: before compiling
    every = max(1, args.steps // 10)

    def progress(step, lr, loss, smoothed):
        if step % every == 0:
            print(f"step {step:4d}/{args.steps}: lr {lr:.2e}, loss {loss:.4f}, "
                  f"smoothed {smoothed:.4f}", flush=True)

    print(f"lr-find: {args.steps} steps, lr {args.min_lr:g} -> {args.max_lr:g} (exponential), "
          f"optimizer {config.optimizer.name}, clip_norm {config.optimizer.clip_norm}")
    result = lr_find.range_test(config, min_lr=args.min_lr, max_lr=args.max_lr,
                                num_steps=args.steps, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = lr_find.write_csv(result, out / "lr_find.csv")
    png_path = plots.plot_lr_find(result, out / "lr_find.png")
    print(result.stop_reason or f"ran all {args.steps} steps without diverging")
    if result.suggestion is None:
        print(f"wrote {png_path} and {csv_path}")
        print(f"error: too few points before the loss diverged ({len(result.losses)} steps) to "
              "suggest a learning rate; lower --min-lr or raise --steps.", file=sys.stderr)
        return 1
    print(f"steepest descent of the smoothed loss (most negative d loss / d log lr): "
          f"{result.steepest_lr:.2e}")
    print(f"valley (fastai's rule: halfway along the longest descent): {result.valley_lr:.2e}")
    print(f"suggested learning rate ({result.suggestion_rule} rule): {result.suggestion:.2e}  "
          f"-> optimizer.learning_rate={result.suggestion:.2e}")
    print(f"wrote {png_path} and {csv_path}")
    return 0


def cmd_plot_schedule(args) -> int:
    from jaxtricks.lm import config as config_lib
    from jaxtricks.lm import plots

    config = config_lib.load(args.config, args.overrides)
    path = plots.plot_schedule(config, args.out)
    steps, lrs = plots.schedule_curve(config)
    oc = config.optimizer
    print(f"schedule={oc.schedule} over {len(steps)} steps: lr(0) {lrs[0]:.3e}, "
          f"max {lrs.max():.3e} at step {int(lrs.argmax())}, lr({len(steps) - 1}) {lrs[-1]:.3e}")
    print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from jaxtricks.lm import plots

    workdir = Path(args.dir)
    if not workdir.is_dir():
        raise UsageError(f"run directory {str(workdir)!r} does not exist.")
    path = plots.write_report(workdir, args.out)
    series = plots.report_series(workdir)
    print(f"{len(series.steps)} logged steps, {len(series.val_steps)} evaluations, "
          f"{int(series.clipped.sum())} logged steps clipped, {series.total_skipped} skipped")
    if series.bad_lines:
        skipped = plots.skipped_message(workdir / "metrics.jsonl", list(series.bad_lines))
        print(f"warning: {skipped}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def cmd_sample(args) -> int:
    workdir = Path(args.dir)
    if not workdir.is_dir():
        raise UsageError(f"run directory {str(workdir)!r} does not exist.")
    import jax
    import numpy as np

    from jaxtricks.lm import training
    from jaxtricks.lm.sampling import generate

    config, model, step = training.load_model(workdir)
    tokenizer = training.load_tokenizer(config, workdir)
    prompt_text = config.train.sample_prompt if args.prompt is None else args.prompt
    prompt = tokenizer.encode(prompt_text)
    if len(prompt) == 0:  # start a new document: the model saw EOS before every document
        prompt = np.array([tokenizer.eos_id], np.int32)
    context = config.model.max_seq_len
    if len(prompt) > context:
        raise UsageError(
            f"--prompt is {len(prompt)} tokens long; the model's context is "
            f"model.max_seq_len={context} tokens: allowed is a prompt of at most {context} "
            "tokens."
        )
    kwargs = dict(max_new_tokens=args.max_new_tokens, rng=jax.random.key(args.seed),
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  vocab_limit=tokenizer.vocab_size)
    # The first call compiles (the whole generation is one program, for these shapes); the
    # second runs the same compiled code and is the one timed.
    start = time.perf_counter()
    generate(model, prompt, **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate(model, prompt, **kwargs)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(tokens), flush=True)  # before the stderr line, when both go to a tty
    n = args.max_new_tokens
    print(f"[{workdir} step {step}: {n} new tokens in {elapsed:.3f} s = {n / elapsed:,.0f} "
          f"tokens/s with the KV cache (first call, compiling: {first:.2f} s)]", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    workdir, path = Path(args.dir), Path(args.file)
    if not workdir.is_dir():
        raise UsageError(f"run directory {str(workdir)!r} does not exist.")
    if not path.is_file():
        raise UsageError(f"FILE {str(path)!r} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"FILE {str(path)!r} is not valid UTF-8 (byte offset {e.start}); "
                         "convert it to UTF-8.") from None
    import json

    from jaxtricks.lm import training
    from jaxtricks.lm.scoring import score_text

    config, model, step = training.load_model(workdir)
    score = score_text(model, training.load_tokenizer(config, workdir), text)
    if args.json:
        print(json.dumps({**score._asdict(), "step": step}))
    else:
        print(f"{path}: {score.bits_per_byte:.4f} bits per byte ({score.bytes:,} bytes, "
              f"{score.tokens:,} tokens scored) by {workdir} at step {step}")
    return 0


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxtricks", description="Tools around a jaxtricks training run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_options(p):
        p.add_argument("--config", default=None,
                       help="a YAML file from configs/ (default: the built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="config overrides, e.g. model.num_layers=2 train.batch_size=16")

    p = sub.add_parser("lr-find", help="learning-rate range test: suggest a learning rate",
                       description="Learning-rate range test (Smith 2015; fastai's lr_find): train "
                       "the configured model with an exponentially growing learning rate until the "
                       "smoothed loss diverges, suggest a learning rate and write lr_find.png and "
                       "lr_find.csv. Never reads or writes the workdir's checkpoints.")
    config_options(p)
    p.add_argument("--workdir", default=None,
                   help="the run's workdir (default: runs/<config name>, as train.py)")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/lr_find)")
    p.add_argument("--min-lr", type=_positive, default=1e-7, help="first learning rate (1e-7)")
    p.add_argument("--max-lr", type=_positive, default=10.0, help="last learning rate (10)")
    p.add_argument("--steps", type=_integer(2), default=100, help="updates of the sweep (100)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("plot-schedule", help="plot the configured learning-rate schedule",
                       description="Plot the learning rate at every step of the configured run "
                       "(schedule_from_config), without building the model.")
    config_options(p)
    p.add_argument("--out", default="schedule.png", help="PNG file (default: ./schedule.png)")
    p.set_defaults(func=cmd_plot_schedule)

    p = sub.add_parser("report", help="plot loss, learning rate and gradient norm of a run",
                       description="Draw DIR/metrics.jsonl: train and validation loss, learning "
                       "rate, gradient norm with the clip threshold, clipped and skipped steps.")
    p.add_argument("dir", metavar="DIR", help="the run's workdir")
    p.add_argument("--out", default=None, help="PNG file (default: DIR/report.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="generate text from a run's latest checkpoint",
                       description="Generate text from the latest checkpoint in DIR with the KV "
                       "cache; print it (stdout) and the speed in tokens per second (stderr).")
    p.add_argument("dir", metavar="DIR", help="the run's workdir")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: the run's train.sample_prompt)")
    p.add_argument("--max-new-tokens", type=_integer(1), default=200, help="tokens to add (200)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy (0.8)")
    p.add_argument("--top-k", type=_integer(1), default=None, help="keep the k likeliest tokens")
    p.add_argument("--top-p", type=_top_p, default=None, help="nucleus: keep this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score a text file with a run's latest checkpoint",
                       description="Bits per UTF-8 byte of FILE under the latest checkpoint in DIR "
                       "(the run's tokenizer; blank-line separated documents, each scored after "
                       "an end-of-document token, in windows of the model's context).")
    p.add_argument("dir", metavar="DIR", help="the run's workdir")
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: bits_per_byte, bytes, tokens, step")
    p.set_defaults(func=cmd_eval)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug. Only modules already imported can have
    raised theirs; looking them up in sys.modules keeps e.g. ``report`` from importing orbax."""
    errors: list[type[BaseException]] = [UsageError]
    for module, name in [("jaxtricks.lm.config", "ConfigError"),
                         ("jaxtricks.lm.data", "DataError"),
                         ("jaxtricks.lm.checkpoint", "CheckpointError"),
                         ("jaxtricks.lm.lr_find", "LRFindError"),
                         ("jaxtricks.lm.plots", "ReportError")]:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run ``jaxtricks COMMAND ...``; return the exit status (2 for every user error)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # Overrides may follow options (argparse stops the positional list at the first option).
        if extra and hasattr(args, "overrides") and all(
                "=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a parse error (2, already reported)
        return e.code if isinstance(e.code, int) else 0
    from jaxtricks.lm import missing_train_extra_message

    if (missing := missing_train_extra_message()) is not None:
        print(f"jaxtricks {args.command}: error: {missing}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"jaxtricks {args.command}: error: {e}", file=sys.stderr)
        return 2
