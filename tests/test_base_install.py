"""The base install (jax, optax, numpy; no extras) imports jaxtricks and runs the README's example.

The trainer's dependencies are installed in the test environment, so the base install is imitated
in a fresh interpreter: a ``sys.meta_path`` finder, inserted first, makes them unimportable.
"""

import json
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The "train" extra of pyproject.toml (plus torch, which some tests use), by top-level module name.
TRAINER_MODULES = (
    "flax", "tensorflow_datasets", "tensorflow", "grain", "array_record", "orbax", "matplotlib",
    "yaml", "tqdm", "tensorboardX", "tensorboard", "tokenizers", "torch",
)

BLOCKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    BLOCKED = set(sys.argv[1].split(","))
    PACKAGE = str(Path(sys.argv[2]) / "jaxtricks")
    attempts = []  # (module, whether a frame of the jaxtricks package asked for it)


    class Unimportable:
        \"\"\"Raises ModuleNotFoundError for the blocked top-level names, as if not installed.\"\"\"

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            frame, by_jaxtricks = sys._getframe(1), False
            while frame is not None:
                by_jaxtricks |= frame.f_code.co_filename.startswith(PACKAGE)
                frame = frame.f_back
            attempts.append((name, by_jaxtricks))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


    sys.meta_path.insert(0, Unimportable())
    sys.path.insert(0, sys.argv[2])
""")

README_EXAMPLE = BLOCKER + textwrap.dedent("""
    import importlib.util
    import json

    import jax
    import jax.numpy as jnp

    import jaxtricks

    ROOT = Path(sys.argv[2])
    spec = importlib.util.spec_from_file_location("test_readme", ROOT / "tests" / "test_readme.py")
    test_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_readme)
    blocks = test_readme.marked_blocks(
        (ROOT / "README.md").read_text(encoding="utf-8"), test_readme.MARKER)

    namespace = {"__name__": "readme_example"}
    results = {"blocks": len(blocks)}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md:transforms[{i}]", "exec"), namespace)
        if i == 0:  # the training loop: what test_readme checks
            zeros = jax.tree.map(jnp.zeros_like, namespace["params"])
            results["initial_loss"] = float(namespace["loss_fn"](zeros))
            results["final_loss"] = float(namespace["metrics"]["loss"])
            results["skipped"] = int(namespace["metrics"]["skipped"])
    results["attempts"] = attempts
    results["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    results["jaxtricks_modules"] = sorted(m for m in sys.modules if m.startswith("jaxtricks"))
    print("RESULTS " + json.dumps(results))
""")


def run_script(python, script: str) -> dict:
    proc = python.run("-c", script, ",".join(TRAINER_MODULES), str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    return json.loads(lines[0].removeprefix("RESULTS "))


@pytest.mark.slow  # a fresh interpreter that imports jax, then 200 jitted steps
def test_readme_example_runs_without_the_trainer_dependencies(python):
    results = run_script(python, README_EXAMPLE)
    print(results)  # which optional imports jax / optax tried, for the log
    assert results["blocks"] >= 1, "the README lost its transforms example marker"
    assert results["final_loss"] < 0.01 * results["initial_loss"]  # it trained
    assert results["skipped"] == 0
    assert results["loaded"] == []
    assert [name for name, by_jaxtricks in results["attempts"] if by_jaxtricks] == []
    assert not any(m.startswith("jaxtricks.lm") for m in results["jaxtricks_modules"])


@pytest.mark.slow  # a subprocess
def test_the_blocker_blocks(python):
    """The check above can fail: a blocked package cannot be imported, and the attempt is seen."""
    script = BLOCKER + textwrap.dedent("""
        import json
        refused = []
        for code, filename in [("import yaml", "<test>"),
                               ("import flax.nnx", PACKAGE + "/pretend_module.py")]:
            try:
                exec(compile(code, filename, "exec"))
            except ModuleNotFoundError as error:
                refused.append(error.name)
        print("RESULTS " + json.dumps({"refused": refused, "attempts": attempts}))
    """)
    results = run_script(python, script)
    # The second import is seen as asked for by the jaxtricks package (a frame in its folder).
    assert results == {"refused": ["yaml", "flax"], "attempts": [["yaml", False], ["flax", True]]}


@pytest.mark.slow  # a subprocess
def test_import_jaxtricks_imports_nothing_of_the_trainer(python):
    """With the trainer's packages installed, ``import jaxtricks`` still loads none of them."""
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[2])
        blocked = set(sys.argv[1].split(","))
        import jaxtricks
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in blocked or m.startswith("jaxtricks.lm"))
        print("RESULTS " + json.dumps({"loaded": loaded, "file": jaxtricks.__file__}))
    """)
    results = run_script(python, script)
    assert results["file"] == str(ROOT / "jaxtricks" / "__init__.py")  # this checkout's library
    assert results["loaded"] == []
