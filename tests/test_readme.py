"""Run the README's transforms example, taken from README.md itself, so the two cannot drift."""

import re
from pathlib import Path

import jax
import numpy as np

import jaxtricks

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test: transforms -->"


def marked_blocks(text: str, marker: str) -> list[str]:
    """The ```python block that follows each occurrence of ``marker``."""
    pattern = re.escape(marker) + r"\s*```python\n(.*?)```"
    return re.findall(pattern, text, flags=re.DOTALL)


def test_readme_transforms_example_runs_and_trains(capsys):
    blocks = marked_blocks(README.read_text(encoding="utf-8"), MARKER)
    assert len(blocks) == 3, "the README's transforms section lost a marked example"

    namespace: dict = {"__name__": "readme_example"}
    exec(compile(blocks[0], f"{README}:transforms[0]", "exec"), namespace)
    metrics = namespace["metrics"]
    assert {"loss", "grad_norm", "clipped", "skipped", "l2_penalty"} <= set(metrics)
    assert "learning_rate" not in metrics  # optax.adam keeps its learning rate to itself
    initial_loss = float(namespace["loss_fn"]({"w": 0.0 * namespace["params"]["w"],
                                               "b": 0.0 * namespace["params"]["b"]}))
    assert float(metrics["loss"]) < 0.01 * initial_loss  # it trained
    assert int(metrics["skipped"]) == 0
    assert "'loss'" in capsys.readouterr().out

    exec(compile(blocks[1], f"{README}:transforms[1]", "exec"), namespace)
    stats = namespace["stats"]
    assert float(stats["learning_rate"]) == 0.0  # what the README's comment says
    assert {"grad_norm", "clipped", "skipped"} <= set(stats)
    assert capsys.readouterr().out.strip() == "0.0"

    exec(compile(blocks[2], f"{README}:transforms[2]", "exec"), namespace)
    stats = jaxtricks.optimizer_stats(namespace["opt_state"])
    assert float(namespace["opt_state"].hyperparams["clip_norm"]) == 0.5
    assert float(stats["learning_rate"]) == np.float32(0.01)
    grads = jax.grad(namespace["loss_fn"])(namespace["params"])
    want_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(stats["grad_norm"]), want_norm, rtol=1e-5)
    assert float(stats["clipped"]) == float(want_norm > 0.5)  # the injected threshold, not 1.0
    assert capsys.readouterr().out.strip() == "0.01"
