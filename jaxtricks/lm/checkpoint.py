"""Checkpoints with Orbax: the train state, the data iterator's position and the config, per step.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-write leaves no half checkpoint that :meth:`Checkpoints.latest_step` would pick. A
checkpoint that is complete on disk but cannot be read (a file removed or truncated afterwards) is
skipped in favour of the previous one, with a warning.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxtricks.lm.workdir import HeldStderr, checkpoint_size, write_errno, write_failed


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, foreign, or made for another model)."""


class Checkpoints:
    """The checkpoints of one workdir (``WORKDIR/checkpoints/<step>``), the last ``keep`` kept."""

    def __init__(self, workdir: str | Path, *, keep: int):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._failed_step: int | None = None
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
        # A failed write makes Orbax's threads and asyncio tasks print tracebacks and log errors of
        # their own (many, from C++ too): stderr is held during the save and shown only when it
        # succeeds or fails for another reason; a failed write is reported in one line instead.
        with HeldStderr() as stderr:
            try:
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
            except Exception as e:  # Orbax wraps the OSError, or only quotes its words
                code = write_errno(e)
                if code is None:
                    raise
                stderr.discard()
                self.remove_partial(step)
                self._failed_step = step  # removed again on close, after Orbax's threads end
                path = getattr(e, "filename", None) or self.directory / str(step)
                raise write_failed(path, code, needed=self.needed(state),
                                   what=f"saving the checkpoint of step {step}") from None

    def remove_partial(self, step: int) -> None:
        """Remove what a failed save of ``step`` left (Orbax's temporary folder, or the step's
        folder when the failure came after the rename); the earlier checkpoints are untouched."""
        for partial in [*self.directory.glob(f"{step}.orbax-checkpoint-tmp*"),
                        self.directory / str(step)]:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            elif partial.exists():
                partial.unlink(missing_ok=True)

    def needed(self, state: Any) -> tuple[int, str]:
        """About what one checkpoint takes, and what that figure is: the newest complete one on
        disk, else the bytes of the state's arrays (the files take somewhat more)."""
        size = checkpoint_size(self.directory)
        if size is not None:
            return size
        arrays = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
        return arrays, "the state's arrays; the files take more"

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
        # Arrays or ShapeDtypeStructs; their shardings say where each restored array goes, so a
        # checkpoint saved on one mesh or process count restores onto another.
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
        try:
            with HeldStderr() as stderr:
                if self._failed_step is not None:  # what Orbax's threads print of that failure
                    stderr.discard()
                try:
                    self._manager.close()
                except Exception as e:  # a failed write that surfaces only when Orbax finishes
                    code = write_errno(e)
                    if code is None:
                        raise
                    stderr.discard()
                    raise write_failed(self.directory, code,
                                       what="finishing the checkpoints") from None
        finally:
            if self._failed_step is not None:
                self.remove_partial(self._failed_step)
