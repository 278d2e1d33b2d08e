"""Checkpoints with Orbax: the train state, the data iterator's position and the config, per step.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-write leaves no half checkpoint that :meth:`Checkpoints.latest_step` would pick. A
checkpoint that is complete on disk but cannot be read (a file removed or truncated afterwards) is
skipped in favour of the previous one, with a warning.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, foreign, or made for another model)."""


class Checkpoints:
    """The checkpoints of one workdir (``WORKDIR/checkpoints/<step>``), the last ``keep`` kept."""

    def __init__(self, workdir: str | Path, *, keep: int):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=False,  # nothing is written until the first save
                # Synchronous: the state's buffers are donated to the next step right after saving.
                enable_async_checkpointing=False,
            ),
        )

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.directory.exists():
            return []
        self._manager.reload()  # another process (a killed run) may have written since
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Write a checkpoint for ``step`` (replacing nothing: a step already saved is kept)."""
        if step in self.steps():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_config(self, step: int) -> dict:
        """The config a checkpoint was made with (cheap: reads only that item)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict, dict]:
        """Restore the newest readable checkpoint into the structure of ``abstract_state``.

        Returns ``(step, state, data_state, config)``. Raises CheckpointError when no checkpoint
        in the directory can be read.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        errors = []
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # Orbax raises many kinds; any of them means unreadable
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                errors.append(f"step {step}: {first_line}")
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable "
                      f"({first_line}); trying an earlier one", file=sys.stderr)
                continue
            return step, restored["state"], restored["data"], restored["config"]
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({'; '.join(errors)}); "
            "move that directory away to start afresh, or pass another --workdir."
        )

    def close(self) -> None:
        self._manager.close()
