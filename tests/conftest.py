"""Test session setup: the JAX CPU backend, and TFDS data kept out of the user's home."""

import os
import tempfile

# Both are read when jax / tensorflow_datasets are first imported, i.e. after this module runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="jaxtricks-tests-tfds-"))
