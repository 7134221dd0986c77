"""The run's files: what may resume, restoring, saving, and atomic JSON.

``model_dir`` holds ``run_config.json`` (the config of the run that wrote
it), ``metrics.json`` (the outcome), ``checkpoints/`` and the TensorBoard
event files. Every write either completes or leaves the previous file (a
temporary file renamed into place, removed when the write fails), and a
failure is one line (:class:`WriteError`, or
:class:`distopt.checkpoints.CheckpointSaveError` for a checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import tensorflow as tf
from absl import logging

from distopt import checkpoints as checkpoints_lib
from distopt import trainer_faults
from distopt.trainer import config as config_lib
from distopt.trainer.config import ModelDirError, TrainConfig, run_identity
from distopt.trainer.factories import SAM_DEFAULT_BASE

RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
# {step: the run's training seconds} at each checkpoint (see TrainingClock).
CLOCK_FILE = "training_clock.json"
# The newest entries kept in it: far more than any fallback goes back.
CLOCK_ENTRIES = 1000
CHECKPOINT_SUBDIR = "checkpoints"
# A checkpoint of another model or dataset cannot be resumed: refuse it.
IDENTITY_KEYS = ("model", "dataset")
# Nor one of another optimizer, sync mode or compressor: their state (slots,
# replicas' snapshots, an outer optimizer, residuals) would be partly restored
# and partly new. The compressor's arguments too: another PowerSGD rank or
# min_compression_rate changes which Q and residuals exist (a shape mismatch,
# or state dropped in silence). Sharding may change: a checkpoint holds the
# logical state.
RESUME_KEYS = ("optimizer", "sync", "compression", "compression_args")
# Settings that may change on a resume unless they change what is saved
# (another MLP width, an EMA slot, a loss scale's variable): not refused up
# front (LeNet's pooling, say, changes no variable), but named when the
# checkpoint then does not fit, so that the error says which flag to put back.
STATE_SHAPING_KEYS = ("model_args", "optimizer_args", "sync_args", "mixed_precision")


class WriteError(OSError):
    """A file of the run could not be written; nothing half-written is left."""


def write_json_atomically(path: str, value: Any) -> None:
    """Strict JSON (NaN and Infinity as null), replaced in one rename.

    Raises:
      WriteError: naming the file and the cause, after removing the
        temporary file; the previous ``path`` (if any) is unchanged.
    """
    text = json.dumps(trainer_faults.strict_json(value), indent=2, allow_nan=False)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except (tf.errors.OpError, OSError) as e:
        try:
            tf.io.gfile.remove(tmp)
        except (tf.errors.OpError, OSError):
            pass  # Never created, or the filesystem refuses even that.
        raise WriteError(
            f"Could not write {path}: {checkpoints_lib.first_line(e)}; free "
            "space or fix the permissions, then rerun to finish"
        ) from None


def read_json(path: str) -> Any:
    """The JSON value in ``path``; None if there is none or it is damaged."""
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, tf.errors.OpError, OSError):
        return None


def read_run_config(model_dir: str) -> dict[str, Any] | None:
    """The stored ``run_config.json``, or None if there is none or it is damaged."""
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    stored = read_json(path)
    if isinstance(stored, dict):
        return stored
    # Damaged (an older trainer wrote it in place and was stopped): the
    # checkpoint's own check in restore() still guards the model.
    logging.warning("%s is damaged; it is rewritten by this run", path)
    return None


def check_model_dir(model_dir: str, config: TrainConfig) -> str | None:
    """Checks, without writing, that ``model_dir`` can hold this run.

    Returns:
      The latest checkpoint path to resume from, or None for a fresh run.

    Raises:
      ModelDirError: the directory holds a run of another model or dataset,
        or a checkpoint of another optimizer or sync mode (one line, naming
        the flag).
    """
    # From the files on disk, as the restore finds them: the state file may
    # be missing or damaged, and the guards below must hold all the same.
    found = checkpoints_lib.candidates(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    latest = found[0] if found else None
    stored = read_run_config(model_dir)
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    if stored is None:
        if latest and not tf.io.gfile.exists(path):
            # Adam's slots restore into AdamW's alike: only the variables
            # are checked now, so say what is not.
            logging.warning(
                "%s holds checkpoints but no %s: this resume cannot check that "
                "--%s are those of the checkpoint's run (only its variables "
                "are checked); this run writes it anew",
                model_dir,
                RUN_CONFIG_FILE,
                ", --".join(RESUME_KEYS),
            )
        return latest
    for key in IDENTITY_KEYS:
        if stored.get(key) != getattr(config, key):
            raise ModelDirError(
                f"{model_dir} holds a run with {key}={stored.get(key)!r} "
                f"(see {path}), not {key}={getattr(config, key)!r}. Nothing "
                "was written; use another --model_dir, or delete this one."
            )
    for key, was, now in _resume_settings(stored, config) if latest else ():
        # Through JSON, as stored (tuples become lists).
        if was != json.loads(json.dumps(now, default=list)):
            was, now = _flag_value(was), _flag_value(now)
            raise ModelDirError(
                f"--{key}={now} cannot resume {model_dir}: its checkpoint is "
                f"of --{key}={was} (see {path}), whose state another --{key} "
                f"cannot take over. Nothing was written; rerun with "
                f"--{key}={was}, or use another --model_dir."
            )
    # Through JSON, so that tuples compare equal to the stored lists.
    current = json.loads(json.dumps(run_identity(config), default=list))
    changed = {
        k: (stored[k], v) for k, v in current.items() if k in stored and stored[k] != v
    }
    if changed and latest:
        logging.info("Resuming with changed settings (old, new): %s", changed)
    return latest


def _flag_value(value) -> str:
    """A setting as its flag spells it (``rank=2,hidden=[32,16]`` for a dict)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={_flag_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        # As --model_args takes a list: brackets, no spaces (one shell word).
        return "[" + ",".join(_flag_value(v) for v in value) + "]"
    return str(value)


def _resume_settings(stored: dict, config: TrainConfig):
    """(flag, stored value, this run's value) for each setting a resume keeps.

    SAM's base optimizer is one (``--optimizer_args=base_optimizer=``): its
    slots are in the checkpoint, and a restore only checks that this run's
    variables are found there, not that every saved one is used.
    """
    for key in RESUME_KEYS:
        if key == "compression_args" and _same_compressor(stored, config):
            continue  # Spelling a default out (rank=1) is the same run.
        if key in stored:
            yield key, stored[key], getattr(config, key)
    if config.optimizer == "sam" and isinstance(stored.get("optimizer_args"), dict):
        yield (
            "optimizer_args=base_optimizer",
            stored["optimizer_args"].get("base_optimizer", SAM_DEFAULT_BASE),
            config.optimizer_args.get("base_optimizer", SAM_DEFAULT_BASE),
        )


def _same_compressor(stored: dict, config: TrainConfig) -> bool:
    """Whether the stored run's compressor has this run's settings, defaults filled."""
    saved = dataclasses.replace(
        config,
        compression=stored.get("compression", ""),
        compression_args=stored.get("compression_args") or {},
    )
    try:
        made = [config_lib.make_compression(c) for c in (saved, config)]
    except config_lib.ConfigError:
        return False  # The stored arguments no longer build: not the same.
    configs = [m.get_config() if m else None for m in made]
    return configs[0] == configs[1]


def restore(
    checkpoint: tf.train.Checkpoint,
    path: str,
    model_dir: str,
    config: TrainConfig | None = None,
) -> None:
    """Restores ``path`` and checks it matches the model exactly.

    Args:
      checkpoint: this run's checkpoint object.
      path: the checkpoint to restore.
      model_dir: the run's directory (its ``run_config.json`` is read on a
        mismatch).
      config: this run's configuration: on a mismatch, the error names the
        settings of ``STATE_SHAPING_KEYS`` that differ from the stored run's.

    A checkpoint holding values this run has no variable for (saved with
    ``use_ema``, a float16 loss scale, ... that this run turned off) is
    restored with one WARNING counting and naming them, and the settings
    that changed: TensorFlow's own warnings at exit are silenced.

    Raises:
      ModelDirError: the checkpoint's variables do not fit this model (another
        architecture, or a model_dir with no run_config.json).
    """
    try:
        status = checkpoint.restore(path)
        _assert_matched_but_records(status)
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        # TensorFlow's message prints every unmatched variable with its
        # values; the names are what says which setting changed.
        names = re.findall(r"<tf\.Variable '([^']+)'", str(e))
        detail = (
            f"{len(names)} variable(s) of this run are not in it: {_some(names)}"
            if names
            else str(e)[:500].rstrip(".")
        )
        if put_back := _put_back(model_dir, config):
            then, now = put_back
            remedy = (
                f"Saved with {then}; this run has {now} (see its "
                f"{RUN_CONFIG_FILE}). Nothing was written; rerun with {then}, "
                "or use another --model_dir."
            )
        else:
            remedy = "Nothing was written; use another --model_dir."
        raise ModelDirError(
            f"The checkpoint {path} in {model_dir} does not match this model: "
            f"{detail}. {remedy}"
        ) from e
    try:
        status.assert_consumed()
    except AssertionError as e:
        _warn_unused_values(checkpoint, path, model_dir, config, e)
    # What was not used is said above (once), not in TensorFlow's warnings
    # at exit, one per value.
    status.expect_partial()


def _assert_matched_but_records(status) -> None:
    """``assert_existing_objects_matched``, but for the optimizer's ``state_scale``.

    A checkpoint written before that record existed has none; the optimizer
    then takes its state to be in the restored loss scale's units, as it
    was read then (``Optimizer._follow_loss_scale``).
    """
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        names = re.findall(r"<tf\.Variable '([^']+)'", str(e))
        if not names or not all(n.endswith("/state_scale:0") for n in names):
            raise


def _warn_unused_values(checkpoint, path, model_dir, config, error) -> None:
    """One WARNING: the checkpoint's values this run dropped, and why."""
    unused = _unused_values(checkpoint, path)
    if unused:
        what = f"{len(unused)} values this run does not use (dropped): {_some(unused)}"
    else:  # Not a variable of the checkpoint: TensorFlow's first line says.
        what = f"values this run does not use: {checkpoints_lib.first_line(error)}"
    if put_back := _put_back(model_dir, config):
        then, now = put_back
        why = (
            f"saved with {then}, this run has {now} (see its "
            f"{RUN_CONFIG_FILE}). Rerun with {then} to keep them"
        )
    else:
        why = "they are lost at this run's next checkpoint"
    logging.warning("The checkpoint %s in %s holds %s; %s.", path, model_dir, what, why)


def _unused_values(checkpoint: tf.train.Checkpoint, path: str) -> list[str]:
    """The checkpoint's variables (their keys) that ``checkpoint`` did not match.

    ``CheckpointView.match`` gives the checkpoint's objects this run has;
    the others' values are found by their path, as their keys spell it.
    """
    try:
        view = tf.train.CheckpointView(path)
        matched = view.match(checkpoint)
        keys = {key for key, _ in tf.train.list_variables(path)}
    except (ValueError, tf.errors.OpError):
        return []
    paths, queue, unused = {0: ""}, [0], []
    while queue:
        node = queue.pop(0)
        for name, child in view.children(node).items():
            if child in paths:
                continue
            # As checkpoint keys escape a local name ("." and "/").
            escaped = name.replace(".", "..").replace("/", "./")
            paths[child] = f"{paths[node]}/{escaped}" if node else escaped
            queue.append(child)
            if child not in matched:
                prefix = f"{paths[child]}/.ATTRIBUTES/"
                unused += sorted(
                    k.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
                    for k in keys
                    if k.startswith(prefix)
                )
    return unused


def _some(names: list[str]) -> str:
    """The first 8 of ``names``, joined, with ``...`` for the rest."""
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _put_back(model_dir: str, config: TrainConfig | None) -> tuple[str, str] | None:
    """The changed state-shaping settings as flags: (the stored run's, this run's).

    None when none changed (or no config): the messages then name no flag.
    """
    changed = _changed_state_settings(model_dir, config) if config else []
    if not changed:
        return None
    return tuple(
        " ".join(f"--{c[0]}={_flag_value(c[i])}" for c in changed) for i in (1, 2)
    )


def _changed_state_settings(model_dir: str, config: TrainConfig):
    """(flag, stored value, this run's value) of each changed state-shaping setting."""
    stored = read_run_config(model_dir) or {}
    current = json.loads(json.dumps(run_identity(config), default=list))
    return [
        (key, stored[key], current[key])
        for key in STATE_SHAPING_KEYS
        if key in stored and stored[key] != current[key]
    ]


class TrainingClock:
    """The run's training seconds at each checkpoint, across processes.

    A resumed process goes on from the seconds recorded at its checkpoint,
    so ``evaluations.json`` and ``run_training_seconds`` give the time to
    accuracy of a run that was preempted, not of its last process only.
    The file is the chief's; losing it loses the figure, never the run.
    """

    def __init__(self, model_dir: str):
        self._path = os.path.join(model_dir, CLOCK_FILE)

    def record(self, step: int, seconds: float) -> None:
        """Keeps ``seconds`` for ``step``; later steps (of a run that fell
        back to an older checkpoint, or was killed after them) are dropped."""
        entries = self._read()
        entries = {s: t for s, t in entries.items() if s < step}
        entries[step] = seconds
        newest = sorted(entries)[-CLOCK_ENTRIES:]
        try:
            write_json_atomically(self._path, {str(s): entries[s] for s in newest})
        except WriteError as e:
            # The checkpoint is saved; only this figure of a resume from it
            # would be missing (its resume says so).
            logging.warning("%s", str(e).split("; ")[0])

    def seconds_at(self, step: int) -> float | None:
        """The seconds recorded for ``step``, or None."""
        return self._read().get(step)

    def _read(self) -> dict[int, float]:
        stored = read_json(self._path)
        if not isinstance(stored, dict):
            return {}
        entries = {}
        for key, value in stored.items():
            try:
                entries[int(key)] = float(value)
            except (TypeError, ValueError):
                continue  # Damaged: that entry only.
        return entries


class Saver:
    """Saves the run's checkpoints and remembers the step of the last one.

    Saving keeps every replica's own weights and slots (``snapshot_replicas``)
    without averaging them, so a save does not change a local SGD or DiLoCo
    run.
    """

    def __init__(self, run, writer: checkpoints_lib.CheckpointWriter):
        self._run = run
        self._writer = writer
        self._clock = TrainingClock(run.config.model_dir) if run.chief else None
        # A resumed run starts from a checkpoint of its first step.
        self.last_step: int | None = run.start_step if run.resumed_from else None

    def save(self, step: int) -> None:
        """Saves ``ckpt-<step>``.

        Raises:
          checkpoints.CheckpointSaveError: the previous checkpoint is kept.
        """
        run = self._run
        with run.strategy.scope():
            run.optimizer.snapshot_replicas(run.model.trainable_variables)
        self._writer.save(step)
        self.last_step = step
        if self._clock is not None:
            self._clock.record(step, run.timing.run_training_seconds())

    def save_unless_saved(self, step: int) -> None:
        """Saves ``ckpt-<step>`` unless the last save was of ``step``."""
        if self.last_step != step:
            self.save(step)

    def kept(self) -> str:
        """What the run keeps, for a message about a run that ends badly."""
        if self.last_step is None:
            return "no checkpoint was written"
        return f"the checkpoint of step {self.last_step}, the last good one, is kept"
