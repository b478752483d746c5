"""Orbax checkpoints of stacked agents: the train state plus a JSON record of the run.

Layout under ``workdir/checkpoints/<step>/``: ``state`` (the ``TrainState`` pytree: step, stacked
params, EMA params, optimizer state; restored bit-exactly against an abstract target so optax
NamedTuples come back intact) and ``meta`` (JSON: the config the run was trained with, the
partition's count matrix ``counts[agent][class]``, the number of agents). Orbax writes each step
to a temporary folder and renames it when complete, so an interrupted save never replaces a good
checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedinf_jax.core.errors import MissingInputError, UserError

CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's shapes or run record do not match the current config."""


class CheckpointDamagedError(UserError, OSError):
    """A checkpoint step whose files cannot be read back (a full disk or an interrupted copy
    leaves such a step)."""

    def __init__(self, directory: str, step: int, cause: BaseException):
        self.directory, self.step = directory, step
        self.reason = _first_line(_root_cause(cause))
        path = os.path.join(directory, str(step))
        super().__init__(
            f"checkpoint step {step} ({path}) is damaged, it cannot be read: {self.reason}"
        )


def _root_cause(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _reading(directory: str, step: int) -> Iterator[None]:
    """Turns a failure to read checkpoint ``step``'s files into a ``CheckpointDamagedError``."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # TensorStore, JSON and OS errors alike: the step cannot be read
        raise CheckpointDamagedError(os.fspath(directory), step, err) from err


DAMAGED_DIR = "damaged_checkpoints"


def set_aside(manager, workdir: str | os.PathLike, step: int) -> str:
    """Moves checkpoint ``step`` out of the manager's folder, to ``workdir/damaged_checkpoints/
    <step>`` (a suffix if that exists), so that training can save that step again; nothing is
    deleted. Returns the new path."""
    target = os.path.join(os.fspath(workdir), DAMAGED_DIR, str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(os.fspath(workdir), DAMAGED_DIR, f"{step}.{suffix}")
        suffix += 1
    os.replace(os.path.join(os.fspath(manager.directory), str(step)), target)
    manager.reload()
    return target


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)


def make_manager(workdir: str | os.PathLike, keep: int = 3, create: bool = True):
    """A ``CheckpointManager`` over ``workdir/checkpoints`` keeping the latest ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=create,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=options,
    )


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The latest checkpointed step under ``workdir``, or None (no checkpoint, or no folder)."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """The checkpointed steps under ``workdir``, in order (none: no checkpoint, or no folder)."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    manager = make_manager(workdir, create=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def resolve_step(workdir: str | os.PathLike, want: int, prefix: str = "", hint: str = "") -> int:
    """Checkpoint step ``want`` under ``workdir`` (-1: the latest), once it is there.

    Raises:
      MissingInputError: no such step, named with the steps there, after ``prefix`` (what asked
        for it) and before ``hint`` (what to give instead).
    """
    steps = all_steps(workdir)
    step = (steps[-1] if steps else None) if want < 0 else want
    if step not in steps:
        raise MissingInputError(
            f"{prefix}no checkpoint {'' if want < 0 else f'step {want} '}under "
            f"{checkpoint_dir(workdir)} (steps there: {steps}){hint}"
        )
    return step


def read_meta(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
    """The JSON run record of checkpoint ``step`` under ``workdir`` (``restore_meta``)."""
    manager = make_manager(workdir, create=False)
    try:
        return restore_meta(manager, step)
    finally:
        manager.close()


def save(manager, step: int, state, meta: dict[str, Any]) -> None:
    """Saves ``state`` and the JSON-serialisable ``meta`` as checkpoint ``step``."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def restore_meta(manager, step: int | None = None) -> dict[str, Any]:
    """The JSON run record of checkpoint ``step`` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    with _reading(manager.directory, step):
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]


def _shape_mismatches(target, stored, num_agents: int | None = None) -> list[str]:
    """Paths whose shapes differ between an abstract target and a checkpoint's metadata. With
    ``num_agents``, leading axes that differ but both hold at least that many agents (padding,
    ``fedinf_jax.agents.sharding``) are not a difference."""
    found = []
    target_flat = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    stored_flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])

    def key(path):
        # Orbax metadata turns NamedTuples into dicts and sequences: compare by the key names.
        return tuple(str(getattr(p, "name", getattr(p, "key", getattr(p, "idx", p)))) for p in path)

    stored_by_key = {key(p): v for p, v in stored_flat.items()}
    for path, leaf in target_flat.items():
        k = key(path)
        if k not in stored_by_key:
            found.append(f"{'/'.join(k)}: missing in checkpoint")
        elif not _same_up_to_padding(stored_by_key[k].shape, leaf.shape, num_agents):
            found.append(
                f"{'/'.join(k)}: checkpoint {tuple(stored_by_key[k].shape)}, "
                f"config {tuple(leaf.shape)}"
            )
    extra = set(stored_by_key) - {key(p) for p in target_flat}
    found += [f"{'/'.join(k)}: in checkpoint, not in config" for k in sorted(extra)]
    return found


def _same_up_to_padding(stored, target, num_agents: int | None) -> bool:
    stored, target = tuple(stored), tuple(target)
    if stored == target:
        return True
    return (
        num_agents is not None
        and len(stored) == len(target) > 0
        and stored[1:] == target[1:]
        and min(stored[0], target[0]) >= num_agents
    )


def _with_local_sharding(abstract):
    """Leaves without a sharding go to this process's first device (not the layout they were
    saved with, which may belong to another mesh)."""
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: (
            leaf
            if getattr(leaf, "sharding", None) is not None
            else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local)
        ),
        abstract,
    )


def restore(manager, abstract_state, step: int | None = None, num_agents: int | None = None):
    """Restores (state, meta) of checkpoint ``step`` (default: the latest) into the target's
    structure, shapes and shardings.

    With ``num_agents`` (K), the agent axis may be padded differently in the checkpoint and the
    target (a run saved on one mesh, restored on another): Orbax truncates the stored axis or
    appends zero agents, and the first K agents are restored exactly.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointMismatchError: the stored arrays' shapes differ from ``abstract_state`` (a
        different model size or number of agents); the message lists the first differences.
      CheckpointDamagedError: the step's files cannot be read.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {manager.directory}")
    with _reading(manager.directory, step):
        stored = manager.item_metadata(step)["state"]
    mismatches = _shape_mismatches(abstract_state, stored, num_agents)
    if mismatches:
        shown = "\n  ".join(mismatches[:8])
        more = f"\n  ... and {len(mismatches) - 8} more" if len(mismatches) > 8 else ""
        raise CheckpointMismatchError(
            f"checkpoint {manager.directory}/{step} does not match the config "
            f"({len(mismatches)} arrays differ):\n  {shown}{more}\n"
            "Use the config it was trained with, or a fresh --workdir."
        )
    abstract_state = _with_local_sharding(abstract_state)
    with _reading(manager.directory, step):
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state, strict=num_agents is None),
                meta=ocp.args.JsonRestore(),
            ),
        )
    return restored["state"], restored["meta"]


def restore_params(
    workdir: str | os.PathLike,
    abstract_params,
    step: int,
    field: str = "ema_params",
    num_agents: int | None = None,
):
    """Restores only the stacked parameters ``field`` ("ema_params" or "params") of checkpoint
    ``step``, into ``abstract_params``' structure, shapes and shardings: what sampling needs,
    without the optimizer state (Orbax's partial restore). ``num_agents``: as in ``restore``.

    Raises:
      CheckpointMismatchError: the stored parameters' shapes differ from ``abstract_params``.
      CheckpointDamagedError: the step's files cannot be read.
    """
    manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        # The same files as ``make_manager``'s StandardCheckpointHandler writes; this handler
        # restores a subtree of them. ``meta`` is named so that Orbax knows the item (it warns
        # about an item it has no handler for) though it is not read here.
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
    )
    try:
        with _reading(manager.directory, step):
            stored = manager.item_metadata(step)["state"]
        mismatches = _shape_mismatches({field: abstract_params}, {field: stored[field]}, num_agents)
        if mismatches:
            raise CheckpointMismatchError(
                f"checkpoint {manager.directory}/{step} does not match the config "
                f"({len(mismatches)} arrays differ): {'; '.join(mismatches[:4])}. Use the config "
                "it was trained with."
            )
        target = {field: _with_local_sharding(abstract_params)}
        restore_args = jax.tree.map(
            lambda leaf: ocp.ArrayRestoreArgs(
                sharding=leaf.sharding,
                global_shape=leaf.shape,
                dtype=leaf.dtype,
                strict=num_agents is None,
            ),
            target,
        )
        with _reading(manager.directory, step):
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target, restore_args=restore_args, partial_restore=True
                    )
                ),
            )
    finally:
        manager.close()
    return restored["state"][field]
