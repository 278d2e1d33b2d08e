"""Train a transformer language model with jaxtricks.

    python train.py [--config configs/default.yaml] [--workdir DIR] [key.sub=value ...]

Without --config the defaults of jaxtricks/lm/config.py are used (the same as configs/default.yaml):
a tiny model on Python's own documentation, which trains on a laptop CPU in a few minutes.
Starting again on a workdir that holds a checkpoint resumes from it. Exit status: 0 done (or
saved on SIGTERM / SIGINT), 1 stopped by non-finite steps, 2 bad input or a workdir in use by
another run, 3 a write failed (a full disk, a read-only filesystem, a quota).
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML file from configs/")
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints and metrics go (default: runs/<config name>)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. train.steps=100 optimizer.learning_rate=1e-3")
    args = parser.parse_args(argv)

    # Imported after parsing so that --help is instant.
    from jaxtricks.lm import missing_train_extra_message

    if (missing := missing_train_extra_message()) is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    from jaxtricks.lm.cpu import tune_host_malloc

    tune_host_malloc()  # before JAX starts its threads (see its docstring)

    from jaxtricks.lm import config as config_lib
    from jaxtricks.lm import training
    from jaxtricks.lm.checkpoint import CheckpointError
    from jaxtricks.lm.data import DataError
    from jaxtricks.lm.workdir import WorkdirLocked, WriteFailed

    name = Path(args.config).stem if args.config else "default"
    workdir = args.workdir or str(Path("runs") / name)
    try:
        config = config_lib.load(args.config, args.overrides)
        training.run(config, workdir)
    except (config_lib.ConfigError, DataError, CheckpointError, WorkdirLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except training.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except WriteFailed as e:  # a full disk, a read-only filesystem, a quota
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    status = main()
    if status == 3:  # reported in one line; Orbax's threads may still print the failure at exit
        from jaxtricks.lm.workdir import silence_stderr

        silence_stderr()
    sys.exit(status)
