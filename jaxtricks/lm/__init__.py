"""jaxtricks.lm: a Flax NNX transformer language-model trainer built on the jaxtricks transforms.

Its dependencies are the ``train`` extra: ``pip install 'jaxtricks[train]'``. Read
:func:`jaxtricks.lm.training.run` for the whole of training.
"""

import importlib.util

# The import names of the ``train`` extra's packages (pyproject.toml), as the trainer imports them.
TRAIN_MODULES = ("flax", "yaml", "tensorflow_datasets", "grain", "array_record", "orbax",
                 "tqdm", "matplotlib", "tensorboardX", "tokenizers")


def missing_train_modules() -> list[str]:
    """The packages of the ``train`` extra that cannot be imported (found without importing)."""
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def missing_train_extra_message() -> str | None:
    """One line telling which extra to install, or None when the trainer's packages are there."""
    missing = missing_train_modules()
    if not missing:
        return None
    return (f"the trainer needs the 'train' extra ({', '.join(missing)} missing): "
            "pip install 'jaxtricks[train]' (or pip install -e '.[train]' in a clone)")
