"""Tests of the trainer: short runs per strategy, resume, bad input, the CLI.

In-process runs use the 4 logical CPUs that conftest.py creates; runs that
need their own device set-up (or the command line) are subprocesses.
"""

import copy
import dataclasses
import gc
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import types

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from conftest import NUM_DEVICES, REPO, run_python, start_python

from distopt import data, distribute
from distopt.trainer import checkpointing, factories, summaries
from distopt.trainer import config as config_lib
from distopt.trainer import loop as loop_lib
from distopt.trainer import run as run_lib
from distopt.trainer import strategy as tstrategy

METRIC_KEYS = {
    "test_accuracy",
    "test_loss",
    "train_steps",
    "examples_per_second",
    "wall_seconds",
}
SCALARS = {"loss", "accuracy", "learning_rate", "examples_per_second", "skipped_steps"}


# In-process runs read this much of bundled MNIST (see _mnist_subset): the
# trainer does not depend on the dataset's size, and the whole set is read,
# trained on for an epoch and evaluated by tests/test_readme.py.
SUBSET = {"train": 2048, "test": 1000}


@pytest.fixture(autouse=True, scope="module")
def _mnist_subset():
    """Serves the first SUBSET examples of bundled MNIST to every train() here.

    Only calls that would read the bundled files are served (no data_dir,
    dataset mnist); the arrays are read once per module. A smaller shuffle
    buffer and test set save about a second of CPU per run.
    """
    real = data.load_source
    splits = {}

    def load_source(name="mnist", data_dir=None, source="auto", **kwargs):
        if (name, data_dir, source) != ("mnist", None, "auto"):
            return real(name, data_dir, source, **kwargs)
        if not splits:
            for split, n in SUBSET.items():
                images, labels = data.load_mnist_idx(split)
                splits[split] = (images[:n], labels[:n])
        return data._in_memory_source(
            "mnist", "bundled IDX files (test subset)", splits, 10
        )

    patch = pytest.MonkeyPatch()
    patch.setattr(data, "load_source", load_source)
    yield
    patch.undo()


def _config(tmp_path, xla=False, **overrides):
    """A 20-step MLP run; ``xla``: the trainer's and optimizer's XLA defaults.

    Without ``xla`` neither the step nor the optimizer's per-variable update
    kernels are compiled: compiling them (about 3 s of CPU per run on 4
    replicas) is tested once, in test_default_strategy_run..., and in
    tests/test_readme.py's mirrored run.
    """
    values = {
        "model": "mlp",
        "train_steps": 20,
        "batch_size": 64,
        "eval_steps": 2,
        "log_every": 10,
        "steps_per_loop": 5,
        "checkpoint_every": 10,
        "model_dir": str(tmp_path / "run"),
    }
    if not xla:
        values["jit_compile"] = False
        overrides["optimizer_args"] = {
            "jit_compile": False,
            **overrides.get("optimizer_args", {}),
        }
    values.update(overrides)
    return config_lib.TrainConfig(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """``finished_run(**overrides)``: a finished run of ``_config(**overrides)``.

    Many tests start from the same run (a 10-step MLP to resume or refuse, a
    reference to compare with) and each trained it anew, about 0.6 CPU-s a
    run. Here each configuration trains once per test process. Returns
    (metrics, model_dir) of that shared run; with ``copy_to=tmp_path`` the
    run is first copied to ``tmp_path/run`` (the test's own
    ``_config(tmp_path)`` directory), for tests that resume, damage or
    refuse it: the copy is the files a run in that directory would leave
    (``run_config.json`` names the new directory).
    """
    runs = {}

    def finished_run(copy_to=None, **overrides):
        key = json.dumps(overrides, sort_keys=True)
        if key not in runs:
            base = tmp_path_factory.mktemp("finished_run")
            runs[key] = (run_lib.train(_config(base, **overrides)), base / "run")
        metrics, model_dir = runs[key]
        if copy_to is not None:
            model_dir = _copy_run(model_dir, copy_to / "run")
        return copy.deepcopy(metrics), str(model_dir)

    return finished_run


def _copy_run(source, target):
    """Copies the run directory ``source`` to ``target`` (mtimes kept)."""
    shutil.copytree(source, target)
    path = target / "run_config.json"
    stored = path.read_text()
    assert f'"{source}"' in stored  # As a run in ``target`` writes it:
    path.write_text(stored.replace(f'"{source}"', f'"{target}"'))
    return target


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def _scalar_tags(directory):
    tags = set()
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(v.tag for v in event.summary.value)
    return tags


def _scalar_values(directory, tag):
    """{step: value} of one TensorBoard scalar written by the trainer."""
    values = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = float(tf.make_ndarray(v.tensor))
    return values


def _model_weights(model_dir):
    """The model's variables in the latest checkpoint of ``model_dir``."""
    directory = os.path.join(model_dir, "checkpoints")
    reader = tf.train.load_checkpoint(directory)
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(directory)
        if name.startswith("model/")
    }


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (
                    os.stat(path).st_mtime_ns,
                    hashlib.sha256(f.read()).digest(),
                )
    return out


def _run_cli(*args, timeout=240, check=True):
    proc = run_python("-m", "distopt.train", *args, timeout=timeout, forked=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_default_strategy_run_writes_metrics_scalars_and_checkpoints(tmp_path):
    config = _config(tmp_path, xla=True, model="lenet", eval_every=10)
    metrics = run_lib.train(config)
    assert METRIC_KEYS <= set(metrics)
    assert metrics == pytest.approx(_metrics(config.model_dir))
    assert metrics["train_steps"] == 20 and metrics["num_replicas"] == 1
    assert metrics["test_examples"] == 128  # eval_steps=2 global batches of 64.
    assert 0.3 < metrics["test_accuracy"] <= 1 and metrics["examples_per_second"] > 0
    assert SCALARS <= _scalar_tags(os.path.join(config.model_dir, "train"))
    assert {"loss", "accuracy"} <= _scalar_tags(os.path.join(config.model_dir, "eval"))
    checkpoints = tf.train.get_checkpoint_state(
        os.path.join(config.model_dir, "checkpoints")
    )
    assert checkpoints.model_checkpoint_path.endswith("ckpt-20")
    with open(os.path.join(config.model_dir, "run_config.json")) as f:
        assert json.load(f)["model"] == "lenet"


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "one_device"},
        {"strategy": "mirrored", "virtual_devices": 2},
        # 4 replicas, an eval batch that leaves a ragged end, weighted_mean.
        {
            "strategy": "mirrored",
            "virtual_devices": 4,
            "aggregation": "weighted_mean",
            "eval_batch_size": 396,
            "eval_steps": 0,
        },
        # Local SGD on 2 replicas: test_local_sgd_resume_mid_period...
    ],
    ids=["one_device", "mirrored2", "mirrored4_weighted"],
)
def test_strategies_end_with_metrics(finished_run, overrides):
    # Shared: mirrored2 is also test_sharded_state_and_compression's "plain".
    metrics, model_dir = finished_run(**overrides)
    assert _metrics(model_dir)["train_steps"] == 20
    assert metrics["num_replicas"] == overrides.get("virtual_devices", 1)
    assert metrics["test_accuracy"] > 0.3
    if overrides.get("eval_steps") == 0:
        # Every example exactly once: 1000 = 2 * 396 + 208, so the last
        # batch gives the 4 replicas 99, 99, 10 and 0 real examples.
        assert metrics["test_examples"] == SUBSET["test"]


def test_sharded_state_and_compression_from_flags(tmp_path, caplog, finished_run):
    """--compression and --shard_optimizer_state reach the optimizer.

    Read from the runs: PowerSGD's gradient bytes are far fewer than plain
    all-reduces' (the optimizer's counters); sharding logs the state per
    device at start, and adds the parameters' all-gather to the bytes.
    """

    def run(name, **overrides):
        return run_lib.train(
            _config(
                tmp_path / name, strategy="mirrored", virtual_devices=2, **overrides
            )
        )

    # The run of test_strategies_end_with_metrics[mirrored2], trained once.
    plain, _ = finished_run(strategy="mirrored", virtual_devices=2)
    powersgd = {"compression": "powersgd", "compression_args": {"rank": 2}}
    compressed = run("compressed", **powersgd)
    # absl's logger, not only the root: a test that parses --verbosity earlier in
    # the same process leaves absl's logger at WARNING.
    with caplog.at_level(logging.INFO, logger="absl"):
        both = run("both", shard_optimizer_state=True, **powersgd)
    assert compressed["test_accuracy"] > 0.3 and both["test_accuracy"] > 0.3
    ratio = plain["communication_bytes_sent"] / compressed["communication_bytes_sent"]
    assert ratio > 20, ratio
    assert compressed["communication_allgather_calls"] == 0
    # 20 steps, each gathering both replicas' halves of the 905,010 (even)
    # float32 parameters: no padding.
    assert both["communication_allgather_bytes"] == 20 * 905_010 * 4
    logged = [
        r.getMessage() for r in caplog.records if "Optimizer state" in r.getMessage()
    ]
    assert len(logged) == 1 and "(sharded)" in logged[0], logged
    assert "per device on 2 device(s)" in logged[0]
    assert "does nothing on 1 replica" not in caplog.text


def test_compression_and_sharding_on_one_replica_say_they_do_nothing(tmp_path, caplog):
    # It trained uncompressed and unsharded without a word (all counters 0).
    with caplog.at_level(logging.WARNING, logger="absl"):
        metrics = run_lib.train(
            _config(
                tmp_path, train_steps=2, compression="topk", shard_optimizer_state=True
            )
        )
    assert metrics["communication_bytes_sent"] == 0
    assert (
        "--compression=topk does nothing on 1 replica (nothing is communicated); "
        "training is uncompressed"
    ) in caplog.text
    assert (
        "--shard_optimizer_state does nothing on 1 replica (its one shard is the "
        "whole optimizer state)"
    ) in caplog.text


def test_diloco_with_error_feedback_and_outer_momentum_warns(tmp_path, caplog):
    # Together they trained worse than either alone (the README's table):
    # the run says so once (the library's line, naming the flags too), and
    # trains. The ways out: tests/test_compression.py.
    diloco = {"sync": "diloco", "sync_period": 2, "compression": "topk"}
    with caplog.at_level(logging.WARNING, logger="absl"):
        metrics = run_lib.train(_config(tmp_path, train_steps=4, **diloco))
    assert metrics["train_steps"] == 4
    said = [r.getMessage() for r in caplog.records if "outer" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(
        "DiLoCo with compression 'topk': error feedback behind the outer "
        "optimizer's momentum (0.9) trained worse than either alone"
    ), said
    for way_out in (
        "--sync_args=outer_momentum=0.0,outer_learning_rate=1.0",
        "--compression_args=error_feedback=false",
    ):
        assert way_out in said[0]


def test_a_line_with_no_timed_step_says_n_a_examples_per_second(tmp_path, caplog):
    # A 1-step run times nothing (the first step compiles): its step line
    # said "0 examples/s" (and TensorBoard got a 0), its Done line n/a.
    with caplog.at_level(logging.INFO, logger="absl"):
        run_lib.train(_config(tmp_path, train_steps=1, eval_steps=1))
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if re.search(r"\b0 examples/s", line)], lines
    step = [line for line in lines if line.startswith("step 1/1:")]
    assert len(step) == 1 and "n/a examples/s" in step[0], lines
    train_dir = os.path.join(tmp_path, "run", "train")
    assert _scalar_values(train_dir, "examples_per_second") == {}
    assert 1 in _scalar_values(train_dir, "loss")


def test_the_first_line_of_a_longer_run_says_n_a_for_its_rate_and_eta(tmp_path, caplog):
    # Its ETA said 0m00s with 2 steps to go.
    with caplog.at_level(logging.INFO, logger="absl"):
        run_lib.train(
            _config(
                tmp_path, train_steps=3, eval_steps=1, log_every=1, steps_per_loop=1
            )
        )
    lines = [r.getMessage() for r in caplog.records]
    first = [line for line in lines if line.startswith("step 1/3:")]
    last = [line for line in lines if line.startswith("step 3/3:")]
    assert len(first) == 1 and first[0].endswith("n/a examples/s, lr 0.001, ETA n/a")
    assert len(last) == 1 and last[0].endswith("ETA 0m00s"), lines


def test_use_ema_ends_with_the_moving_average_as_the_weights(tmp_path):
    # `--optimizer_args=use_ema=true`: as at the end of Keras's fit, the
    # final checkpoint's weights are their averages, not the last step's.
    config = _config(tmp_path, optimizer_args={"use_ema": True, "ema_momentum": 0.5})
    run_lib.train(config)
    reader = tf.train.load_checkpoint(os.path.join(config.model_dir, "checkpoints"))
    names = list(reader.get_variable_to_shape_map())
    model = [reader.get_tensor(n) for n in names if n.startswith("model/")]
    averages = [reader.get_tensor(n) for n in names if "/ema/" in n]
    assert len(averages) == len(model) > 0
    for average in averages:
        assert any(
            m.shape == average.shape and np.array_equal(m, average) for m in model
        )


def test_extending_a_finished_use_ema_run_warns_it_goes_on_from_the_average(
    tmp_path, caplog, finished_run
):
    # The final save holds the average as the weights (above), so a run
    # extended from it is not the one that trained straight through: said.
    ema = {"use_ema": True, "ema_momentum": 0.5}
    finished_run(copy_to=tmp_path, train_steps=10, optimizer_args=ema)
    with caplog.at_level(logging.WARNING, logger="absl"):
        metrics = run_lib.train(_config(tmp_path, train_steps=12, optimizer_args=ema))
    assert metrics["start_step"] == 10 and metrics["status"] == "completed"
    warned = [r for r in caplog.records if "moving average as the weights" in r.msg]
    assert len(warned) == 1, caplog.text
    assert "checkpoint of step 10" in warned[0].getMessage()
    # A checkpoint saved mid-run holds the trained weights: no warning.
    caplog.clear()
    mid = _config(tmp_path / "mid", train_steps=20, optimizer_args=ema)
    run_lib.train(mid)
    for path in glob.glob(os.path.join(mid.model_dir, "checkpoints", "ckpt-20*")):
        os.remove(path)
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert run_lib.train(mid)["start_step"] == 10
    assert "moving average as the weights" not in caplog.text


def test_a_model_dir_on_storage_tensorflow_cannot_use_is_one_line_first(
    monkeypatch,
):
    # s3:// without tensorflow-io: a traceback after the strategy and data.
    made = []
    monkeypatch.setattr(run_lib, "make_strategy", lambda *a, **k: made.append(1))
    config = _config(pathlib.Path("/unused"), model_dir="nosuchfs://bucket/run")
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(config)
    assert str(info.value) == (
        "--model_dir=nosuchfs://bucket/run: TensorFlow cannot use it: File "
        "system scheme 'nosuchfs' not implemented (file: 'nosuchfs://bucket/run'). "
        "Nothing was written."
    )
    assert not made  # Before any device work.


def test_a_batch_larger_than_the_pipelines_shard_is_one_error_first(tmp_path):
    # --input=dataset: an empty epoch, repeated, ended the first step in an
    # OutOfRangeError traceback, and left the run directory behind.
    # (The tests' MNIST holds 2,048 training examples.)
    config = _config(tmp_path, input="dataset", batch_size=4096)
    with pytest.raises(config_lib.ConfigError) as info:
        run_lib.train(config)
    assert str(info.value) == (
        "--batch_size=4096: a replica's batch of 4096 is larger than the 2048 "
        "train examples its input pipeline reads (of 1), and the remainder is "
        "dropped"
    )
    assert not os.path.exists(config.model_dir)


def test_resume_continues_from_the_checkpoint_exactly(tmp_path):
    straight = run_lib.train(_config(tmp_path / "a", train_steps=30))
    run_lib.train(_config(tmp_path / "b", train_steps=20))
    resumed = run_lib.train(_config(tmp_path / "b", train_steps=30))
    assert resumed["start_step"] == 20 and resumed["train_steps"] == 30
    assert straight["start_step"] == 0
    # Same data order and optimizer state: the same model as without a stop.
    a = tf.train.load_checkpoint(str(tmp_path / "a" / "run" / "checkpoints"))
    b = tf.train.load_checkpoint(str(tmp_path / "b" / "run" / "checkpoints"))
    for name, _ in tf.train.list_variables(str(tmp_path / "a" / "run" / "checkpoints")):
        if name.startswith("model/"):
            np.testing.assert_allclose(
                a.get_tensor(name), b.get_tensor(name), rtol=1e-5, atol=1e-6
            )
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-4)


#: The in-memory reference run of two tests (shared: see finished_run).
IN_MEMORY_40 = {"input": "memory", "train_steps": 40, "checkpoint_every": 0}


def test_in_memory_input_resumed_mid_epoch_equals_the_uninterrupted_run(
    tmp_path, finished_run
):
    """Batches are a function of (seed, step): a resume needs no input state.

    2048 examples / 64 = 32 steps per epoch: the resumed run starts at step
    22, mid-epoch, and crosses into the next epoch inside a loop call.
    """
    common = IN_MEMORY_40
    straight, straight_dir = finished_run(**common)
    assert straight["input"] == "memory"
    run_lib.train(_config(tmp_path / "b", **{**common, "train_steps": 22}))
    resumed = run_lib.train(_config(tmp_path / "b", **common))
    assert resumed["start_step"] == 22 and resumed["train_steps"] == 40
    a, b = (_model_weights(d) for d in (straight_dir, str(tmp_path / "b" / "run")))
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed["test_loss"] == straight["test_loss"]


def test_in_memory_input_on_2_replicas_equals_1_on_the_same_global_batches(
    tmp_path, finished_run
):
    # Replica r takes the r-th half of the global batch that one device takes
    # whole; the mean of the halves' mean gradients is the whole batch's.
    # Across an epoch's end (32 steps of 64).
    common = IN_MEMORY_40
    one, one_dir = finished_run(**common)
    two = run_lib.train(
        _config(tmp_path / "two", strategy="mirrored", virtual_devices=2, **common)
    )
    assert two["num_replicas"] == 2 and two["input"] == "memory"
    a, b = (_model_weights(d) for d in (one_dir, str(tmp_path / "two" / "run")))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def test_input_flag_picks_the_feed(tmp_path, finished_run):
    # auto: in memory for bundled MNIST; dataset: the tf.data pipeline.
    auto, _ = finished_run(train_steps=10)
    dataset = run_lib.train(
        _config(tmp_path / "dataset", train_steps=10, input="dataset")
    )
    assert (auto["input"], dataset["input"]) == ("memory", "dataset")
    assert dataset["train_steps"] == 10 and dataset["test_accuracy"] > 0.2
    # Different batches (another shuffle): the feeds are not the same code path.
    assert dataset["test_loss"] != auto["test_loss"]
    with pytest.raises(config_lib.ConfigError, match="valid inputs"):
        config_lib.validate_config(_config(tmp_path, input="disk"))


def test_local_sgd_resume_mid_period_equals_a_run_without_checkpoints(tmp_path):
    """Saving mid-period keeps each replica's copy and leaves the run unchanged."""
    common = {
        "strategy": "mirrored",
        "virtual_devices": 2,
        "sync": "local_sgd",
        "sync_period": 3,
    }
    straight = run_lib.train(_config(tmp_path / "a", checkpoint_every=0, **common))
    # The run itself, as for every strategy in test_strategies_end_with_metrics.
    assert _metrics(str(tmp_path / "a" / "run"))["train_steps"] == 20
    assert straight["num_replicas"] == 2 and straight["test_accuracy"] > 0.3
    # Step 10 is one local step into a period: the replicas differ there.
    run_lib.train(_config(tmp_path / "b", train_steps=10, **common))
    resumed = run_lib.train(_config(tmp_path / "b", **common))
    assert resumed["start_step"] == 10
    a, b = (_model_weights(str(tmp_path / d / "run")) for d in "ab")
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed["test_loss"] == straight["test_loss"]


def test_tfds_dataset_by_name_with_mock_data(tmp_path):
    # A dependency, not optional: an import failure (as in a fresh install
    # without importlib_resources) must fail here, not skip.
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=256):
        metrics = run_lib.train(
            _config(tmp_path, dataset="fashion_mnist", train_steps=4, eval_steps=0)
        )
    assert "TensorFlow Datasets fashion_mnist" in metrics["data_source"]
    assert metrics["dataset"] == "fashion_mnist" and metrics["test_examples"] == 256
    # Not in memory: --input=auto reads through tf.data, and memory is refused
    # before anything is written.
    assert metrics["input"] == "dataset"
    with (
        tfds.testing.mock_data(num_examples=256),
        pytest.raises(config_lib.ConfigError, match="--input=memory: fashion"),
    ):
        run_lib.train(_config(tmp_path / "m", dataset="fashion_mnist", input="memory"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("strategy", "horovod", "'default', 'one_device', 'mirrored'"),
        ("model", "resnet", "'lenet', 'mlp'"),
        ("optimizer", "adadelta", "'adam', 'adamax', 'adamw'"),
        ("aggregation", "median", "'mean'"),
        ("sync", "gossip", "'local_sgd'"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, field, value, valid):
    with pytest.raises(config_lib.ConfigError, match=f"Unknown {field} '{value}'") as e:
        run_lib.train(_config(tmp_path, **{field: value}))
    assert valid in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_bad_compression_args_refused_in_process_before_the_strategy(
    tmp_path, monkeypatch
):
    # train() called from Python has no command-line preflight: its own
    # check refuses them before a strategy (devices) or the data is made.
    made = []
    monkeypatch.setattr(run_lib, "make_strategy", lambda *a, **k: made.append(a))
    config = _config(tmp_path, compression="topk", compression_args={"fraction": 2})
    with pytest.raises(config_lib.ConfigError, match="fraction"):
        run_lib.train(config)
    assert made == [] and not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_replicas(tmp_path):
    config = _config(tmp_path, strategy="mirrored", virtual_devices=4, batch_size=30)
    with pytest.raises(config_lib.ConfigError, match="30 is not divisible by the 4"):
        run_lib.train(config)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"batch_size": 100_000}, "is larger than the .* train examples"),
        (
            {"strategy": "mirrored", "virtual_devices": 2, "eval_batch_size": 3},
            "3 is not divisible by the 2",
        ),
        (
            {"eval_batch_size": 99999999999},
            "--eval_batch_size=99999999999 is larger than the .* test examples",
        ),
    ],
    ids=["batch_over_data", "eval_batch", "eval_batch_over_data"],
)
def test_input_refused_after_the_lock_leaves_no_directory(tmp_path, overrides, match):
    """Checked once the input is made, after the lock: run_config.json and
    the event files were left, and bound the directory to the refused flags.
    The directories the lock made go too (if nothing else is in them)."""
    model_dir = tmp_path / "new" / "run"
    config = _config(tmp_path, model_dir=str(model_dir), **overrides)
    with pytest.raises(config_lib.ConfigError, match=match):
        run_lib.train(config)
    assert os.listdir(tmp_path) == []


def test_corrupt_data_files_fail_with_checksums(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for name in data.MNIST_SHA256:
        shutil.copy(os.path.join(data.bundled_dir(), name), data_dir / name)
    os.chmod(data_dir / "train-images-idx3-ubyte.gz", 0o644)
    with open(data_dir / "train-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(data.DataError) as e:
        run_lib.train(_config(tmp_path, data_dir=str(data_dir)))
    assert "train-images-idx3-ubyte.gz is corrupt" in str(e.value)
    assert data.MNIST_SHA256["train-images-idx3-ubyte.gz"] in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_model_dir_of_another_model_is_refused_untouched(tmp_path, finished_run):
    config = _config(tmp_path, train_steps=10)
    finished_run(copy_to=tmp_path, train_steps=10)
    before = _snapshot(config.model_dir)
    other = _config(tmp_path, model="lenet", train_steps=10)
    with pytest.raises(
        config_lib.ModelDirError, match="model='mlp'.*not model='lenet'"
    ):
        run_lib.train(other)
    assert _snapshot(config.model_dir) == before
    # Without run_config.json the checkpoint itself is checked.
    os.remove(os.path.join(config.model_dir, "run_config.json"))
    before = _snapshot(config.model_dir)
    with pytest.raises(config_lib.ModelDirError, match="does not match this model"):
        run_lib.train(other)
    assert _snapshot(config.model_dir) == before


def test_a_resume_without_run_config_says_what_it_cannot_check(
    tmp_path, caplog, finished_run
):
    # Adam's slots restore into AdamW's: the resume cannot refuse it, so it
    # says that it could not check (it went unsaid).
    finished_run(copy_to=tmp_path, train_steps=10)
    config = _config(tmp_path, train_steps=12, optimizer="adamw")
    os.remove(os.path.join(config.model_dir, "run_config.json"))
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert run_lib.train(config)["start_step"] == 10
    warned = [m for r in caplog.records if "no run_config" in (m := r.getMessage())]
    assert warned == [
        (
            f"{config.model_dir} holds checkpoints but no run_config.json: this resume "
            "cannot check that --optimizer, --sync, --compression, --compression_args "
            "are those of the checkpoint's run (only its variables are checked); this "
            "run writes it anew"
        )
    ], caplog.text


def test_a_resume_that_adds_optimizer_state_names_it_in_one_short_line(
    tmp_path, finished_run
):
    # Turning use_ema on in a run adds a slot per variable that the
    # checkpoint lacks: the error names them, not their values.
    finished_run(copy_to=tmp_path, train_steps=10)
    config = _config(tmp_path, train_steps=20, optimizer_args={"use_ema": True})
    before = _snapshot(config.model_dir)
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(config)
    message = str(info.value)
    assert "variable(s) of this run are not in it: adam/ema_" in message
    assert "numpy=" not in message and len(message) < 600
    assert _snapshot(config.model_dir) == before


EMA = {"use_ema": True, "ema_momentum": 0.5}


def _unused_values_of_a_run(caplog):
    """TensorFlow's "could not be found" lines naming a trainer checkpoint's value.

    A restore status is deleted when the garbage collector gets to it, which
    can be inside another test's window: a refused resume of other shapes
    (its restore raised before TensorFlow made `save_counter`, a known
    limitation) then adds a line naming `(root).save_counter` alone. The
    trainer's checkpoint holds `model`, `optimizer` and `step`.
    """
    found = re.findall(r"could not be found in the restored object: (\S+)", caplog.text)
    return [v for v in found if v != "(root).save_counter"]


def test_a_resume_that_drops_optimizer_state_says_so_in_one_warning(
    tmp_path, caplog, finished_run
):
    # Turning use_ema off drops the checkpoint's EMA slots: it resumed in
    # silence, TensorFlow's warnings at exit (one per value) the only sign.
    finished_run(copy_to=tmp_path, train_steps=10, optimizer_args=EMA)
    gc.collect()  # Another test's restore statuses warn before this one.
    with caplog.at_level(logging.WARNING):
        metrics = run_lib.train(_config(tmp_path, train_steps=12))
        gc.collect()  # TensorFlow warns when the restore's status is deleted.
    assert metrics["start_step"] == 10 and metrics["status"] == "completed"
    warned = [m for m in caplog.messages if "does not use" in m]
    assert len(warned) == 1, caplog.text
    assert "holds 6 values this run does not use (dropped): " in warned[0]
    assert "optimizer/_slots/0/ema, optimizer/_slots/1/ema" in warned[0]
    assert (
        "saved with --optimizer_args=jit_compile=False,use_ema=True,"
        "ema_momentum=0.5, this run has --optimizer_args=jit_compile=False"
    ) in warned[0], warned[0]
    assert "Rerun with --optimizer_args=jit_compile=False,use_ema=True," in warned[0]
    assert _unused_values_of_a_run(caplog) == []


@pytest.mark.parametrize("args", [{}, {"optimizer_args": EMA}], ids=["plain", "ema"])
def test_an_ordinary_resume_warns_of_no_unused_checkpoint_values(
    tmp_path, caplog, finished_run, args
):
    finished_run(copy_to=tmp_path, train_steps=10, **args)
    gc.collect()  # As above.
    with caplog.at_level(logging.WARNING):
        metrics = run_lib.train(_config(tmp_path, train_steps=12, **args))
        gc.collect()
    assert metrics["start_step"] == 10 and metrics["status"] == "completed"
    assert "does not use" not in caplog.text
    assert _unused_values_of_a_run(caplog) == []


def test_a_resume_with_other_model_args_names_the_flag_to_put_back(
    tmp_path, finished_run
):
    # Not refused up front (a model argument may leave every variable as it
    # is), but when the checkpoint does not fit, the error names the setting
    # that changed and the value that fits, as a flag.
    finished_run(copy_to=tmp_path, train_steps=10)
    config = _config(tmp_path, train_steps=20, model_args={"hidden": [16, 8]})
    before = _snapshot(config.model_dir)
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(config)
    message = str(info.value)
    assert "does not match this model" in message
    assert (
        "Saved with --model_args=; this run has --model_args=hidden=[16,8] (see "
        "its run_config.json). Nothing was written; rerun with --model_args=, or "
        "use another --model_dir." in message
    ), message
    assert _snapshot(config.model_dir) == before
    # A model argument that changes no variable resumes.
    metrics = run_lib.train(dataclasses.replace(config, model_args={"name": "renamed"}))
    assert metrics["status"] == "completed" and metrics["start_step"] == 10


def test_bad_numbers_and_combinations(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="Set --train_steps or --epochs"):
        run_lib.train(_config(tmp_path, train_steps=0, epochs=0))
    with pytest.raises(config_lib.ConfigError, match="--tpu"):
        run_lib.train(_config(tmp_path, strategy="tpu"))
    with pytest.raises(config_lib.ConfigError, match="beta_1"):
        run_lib.train(_config(tmp_path, optimizer_args={"beta_1": 2.0}))
    with pytest.raises(config_lib.ConfigError, match="does not take"):
        run_lib.train(_config(tmp_path, optimizer_args={"bogus": 1}))
    with pytest.raises(config_lib.ConfigError, match="--model=mlp does not take"):
        run_lib.train(_config(tmp_path, model_args={"conv2_padding": "SAME"}))
    with pytest.raises(config_lib.ConfigError, match="conv2_padding 'FULL'"):
        run_lib.train(
            _config(tmp_path, model="lenet", model_args={"conv2_padding": "FULL"})
        )
    assert config_lib.parse_kv("a=1, b=0.5,c=true,d=x") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "x",
    }
    with pytest.raises(config_lib.ConfigError):
        config_lib.parse_kv("novalue")


def _loss_optimizer_run(tmp_path, name, optimizer, optimizer_args=None, **overrides):
    """10 steps at lr 0.1, scalars at every step: (metrics, weights, run dir)."""
    values = {
        "optimizer": optimizer,
        "optimizer_args": optimizer_args or {},
        "learning_rate": 0.1,
        "train_steps": 10,
        "log_every": 1,
        "checkpoint_every": 0,
    }
    values.update(overrides)
    config = _config(tmp_path / name, **values)
    metrics = run_lib.train(config)
    assert metrics == pytest.approx(_metrics(config.model_dir))
    assert metrics["train_steps"] == 10 and metrics["optimizer"] == optimizer
    return metrics, _model_weights(config.model_dir), config.model_dir


def test_sam_and_heun_train_through_minimize(tmp_path):
    gd, gd_weights, gd_dir = _loss_optimizer_run(tmp_path, "gd", "gradient_descent")
    # SAM with rho=0 takes exactly its base optimizer's steps.
    sam = {"base_optimizer": "gradient_descent", "rho": 0.0}
    _, sam_weights, sam_dir = _loss_optimizer_run(tmp_path, "sam", "sam", sam)
    for key, value in gd_weights.items():
        np.testing.assert_allclose(sam_weights[key], value, rtol=1e-6, atol=1e-7)
    assert SCALARS <= _scalar_tags(os.path.join(sam_dir, "train"))
    for tag in ("loss", "accuracy"):
        assert _scalar_values(os.path.join(sam_dir, "train"), tag) == pytest.approx(
            _scalar_values(os.path.join(gd_dir, "train"), tag), rel=1e-6
        )
    heun, heun_weights, heun_dir = _loss_optimizer_run(tmp_path, "heun", "heun")
    assert heun["test_accuracy"] > 0.3 and gd["test_accuracy"] > 0.3
    # Heun evaluates the loss at the trial point too; the metrics are those
    # at the start point, so step 1 (same start, same batch) matches GD's.
    for tag in ("loss", "accuracy"):
        heun_values = _scalar_values(os.path.join(heun_dir, "train"), tag)
        gd_values = _scalar_values(os.path.join(gd_dir, "train"), tag)
        assert sorted(heun_values) == list(range(1, 11))
        assert heun_values[1] == pytest.approx(gd_values[1], rel=1e-6)
    # And the steps are Heun's, not gradient descent's.
    assert max(np.abs(heun_weights[k] - v).max() for k, v in gd_weights.items()) > 1e-4


@pytest.mark.parametrize(
    "optimizer,optimizer_args,jit_compile",
    [
        ("heun", {}, False),
        # Compiled: the whole step (1 replica) or the forward pass (2) in XLA.
        (
            "sam",
            {"base_optimizer": "gradient_descent", "perturbation": "aggregated"},
            True,
        ),
    ],
    ids=["heun", "sam_aggregated_xla"],
)
def test_sam_and_heun_mirrored_match_one_replica(
    tmp_path, optimizer, optimizer_args, jit_compile
):
    # Both use the aggregated gradient wherever they move: with equal
    # per-replica batches, 2 replicas take the steps of 1 on the global batch.
    common = {"jit_compile": jit_compile, "log_every": 5}
    one, one_weights, _ = _loss_optimizer_run(
        tmp_path, "one", optimizer, optimizer_args, **common
    )
    two, two_weights, _ = _loss_optimizer_run(
        tmp_path,
        "two",
        optimizer,
        optimizer_args,
        strategy="mirrored",
        virtual_devices=2,
        **common,
    )
    assert two["num_replicas"] == 2
    for key, value in one_weights.items():
        np.testing.assert_allclose(two_weights[key], value, rtol=1e-5, atol=1e-6)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
    assert two["test_accuracy"] > 0.3


def test_diloco_outer_rate_and_momentum_from_sync_args(tmp_path):
    config = _config(
        tmp_path,
        sync="diloco",
        sync_period=4,
        sync_args={"outer_learning_rate": 0.5, "outer_momentum": 0.8},
    )
    mode = factories.make_sync(config)
    outer = mode.outer_optimizer
    assert (outer.learning_rate, outer.momentum, outer.nesterov) == (0.5, 0.8, True)
    assert outer.name == "outer_momentum"


def test_sam_and_heun_flags_and_rejected_sync_modes(tmp_path):
    from distopt import optimizers, train

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(
            [
                "train",
                "--optimizer=sam",
                "--rho=0.2",
                "--momentum=0.5",
                "--optimizer_args=base_optimizer=momentum,perturbation=aggregated",
                "--learning_rate=0.03",
                "--train_steps=1",
            ]
        )
        config = train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    sam = factories.make_optimizer(config, 1)
    assert isinstance(sam, optimizers.SAM)
    assert sam.rho == 0.2 and sam.perturbation == "aggregated"
    assert isinstance(sam.base_optimizer, optimizers.Momentum)
    assert sam.base_optimizer.momentum == 0.5 and sam.learning_rate == 0.03
    # Without base_optimizer, SAM wraps the trainer's default optimizer.
    default = factories.make_optimizer(_config(tmp_path, optimizer="sam"), 1)
    assert isinstance(default.base_optimizer, optimizers.Adam)
    with pytest.raises(
        config_lib.ConfigError, match="--optimizer=heun needs --sync=every_step"
    ):
        run_lib.train(_config(tmp_path, optimizer="heun", sync="local_sgd"))
    with pytest.raises(config_lib.ConfigError, match="perturbation=aggregated"):
        run_lib.train(
            _config(
                tmp_path,
                optimizer="sam",
                optimizer_args={"perturbation": "aggregated"},
                sync="diloco",
            )
        )
    with pytest.raises(config_lib.ConfigError, match="--optimizer=sam: base_optimizer"):
        run_lib.train(
            _config(
                tmp_path, optimizer="sam", optimizer_args={"base_optimizer": "heun"}
            )
        )
    assert not os.path.exists(tmp_path / "run")


def test_schedules_from_flags():
    config = config_lib.TrainConfig(learning_rate=0.1, warmup_steps=10)
    constant = factories.make_schedule(config, 100)
    assert float(constant(5)) == pytest.approx(0.05)
    assert float(constant(50)) == pytest.approx(0.1)
    cosine = factories.make_schedule(
        config_lib.TrainConfig(
            learning_rate=0.1, lr_schedule="cosine", warmup_steps=10
        ),
        110,
    )
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    piecewise = factories.make_schedule(
        config_lib.TrainConfig(
            lr_schedule="piecewise", lr_boundaries=(10,), lr_values=(0.1, 0.01)
        ),
        100,
    )
    assert float(piecewise(11)) == pytest.approx(0.01)
    exponential = factories.make_schedule(
        config_lib.TrainConfig(
            learning_rate=1.0, lr_schedule="exponential", decay_steps=10, decay_rate=0.5
        ),
        100,
    )
    assert float(exponential(20)) == pytest.approx(0.25)


def test_cluster_resolvers_from_the_environment(monkeypatch):
    tf_config = {
        "cluster": {"worker": ["localhost:1111", "localhost:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    resolver = tstrategy.make_cluster_resolver()
    assert resolver.task_type == "worker" and resolver.task_id == 1
    monkeypatch.delenv("TF_CONFIG")
    for key, value in {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }.items():
        monkeypatch.setenv(key, value)
    resolver = tstrategy.make_cluster_resolver(slurm_port_base=9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node2:9000"]}
    for key in ("SLURM_PROCID",):
        monkeypatch.delenv(key)
    assert tstrategy.make_cluster_resolver() is None


def _strategy_log_line(monkeypatch, caplog, num_devices):
    """The log line of a mirrored strategy of ``num_devices``, and the devices.

    Up to the 4 logical CPUs conftest.py made, a real strategy; beyond, a
    stand-in with as many device names.
    """
    devices = [
        f"/job:localhost/replica:0/task:0/device:CPU:{i}" for i in range(num_devices)
    ]
    if num_devices > NUM_DEVICES:
        fake = types.SimpleNamespace(
            extended=types.SimpleNamespace(worker_devices=tuple(devices)),
            num_replicas_in_sync=num_devices,
        )
        monkeypatch.setattr(tstrategy.distribute, "make_strategy", lambda *a, **k: fake)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
        tstrategy.make_strategy("mirrored", virtual_devices=num_devices)
    (line,) = [r.getMessage() for r in caplog.records if "in sync" in r.getMessage()]
    return line, devices


def test_strategy_log_line_lists_up_to_8_devices(monkeypatch, caplog):
    for n in (2, 4, 8):
        line, devices = _strategy_log_line(monkeypatch, caplog, n)
        assert line == (
            f"Strategy mirrored: {n} replica(s) in sync; local devices "
            + ", ".join(devices)
        )


def test_strategy_log_line_summarizes_more_devices(monkeypatch, caplog):
    # Listed in full, 5000 logical CPUs made one line of 244 KB.
    for n in (9, 5000):
        line, _ = _strategy_log_line(monkeypatch, caplog, n)
        assert line == (
            f"Strategy mirrored: {n} replica(s) in sync; local devices "
            "/job:localhost/replica:0/task:0/device:CPU:0 ... "
            f"/job:localhost/replica:0/task:0/device:CPU:{n - 1} ({n} devices)"
        )


@pytest.mark.parametrize(
    "cfg", sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))
)
def test_config_files_parse_into_valid_configs(cfg):
    from distopt import train

    # The trainer defines its flags on the global FLAGS; leave them unparsed.
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", f"--flagfile={cfg}"])
        config = train.config_from_flags()
        config_lib.validate_config(config)
    finally:
        flags.FLAGS.unparse_flags()
    assert config.model in ("mlp", "lenet")


@pytest.mark.slow
def test_cli_resumes_after_being_killed_on_another_strategy(tmp_path):
    """Killed mid-run, then resumed from the command line.

    The resumed run also exercises what only a fresh process can (op
    determinism is process-wide): a flagfile overridden by later flags,
    mirrored on 2 virtual CPUs, bfloat16 and --deterministic; a checkpoint of
    one replica resumes on two.
    """
    model_dir = tmp_path / "killed"
    args = [
        f"--flagfile={REPO}/configs/lenet_mnist.cfg",
        "--model=mlp",
        "--model_args=",  # the flagfile's are LeNet's
        "--epochs=0",  # the flagfile trains by epochs; these runs by steps
        "--batch_size=32",
        "--checkpoint_every=5",
        "--steps_per_loop=5",
        "--log_every=5",
        "--eval_steps=1",
        "--nojit_compile",
        f"--model_dir={model_dir}",
    ]
    proc = start_python(
        ["-m", "distopt.train", "--train_steps=1000000", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = str(model_dir / "checkpoints")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (path := tf.train.latest_checkpoint(ckpt_dir))
            and int(path.rsplit("-", 1)[1]) >= 10
        ):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = int(tf.train.latest_checkpoint(ckpt_dir).rsplit("-", 1)[1])
    assert saved >= 10
    # The kill can land after a newer save's files are in place but before
    # the state file names it; the trainer then resumes from that newer
    # checkpoint, which is right (it reads the files on disk, see
    # checkpoints.candidates). The likely cause of one failure under load
    # (2026-12-05): no "resuming at step 10" in a run that ended at step 20.
    on_disk = max(
        int(re.fullmatch(r"ckpt-(\d+)\.index", os.path.basename(p))[1])
        for p in glob.glob(os.path.join(ckpt_dir, "ckpt-*.index"))
    )
    log = _run_cli(
        "--train_steps=" + str(saved + 10),
        *args,
        "--strategy=mirrored",
        "--virtual_devices=2",
        "--mixed_precision=bfloat16",  # bfloat16 convolutions are slow on CPU: mlp
        "--deterministic",
    ).stderr
    assert "Data: mnist from bundled IDX files" in log
    assert "mirrored on a CPU-only host: 2 logical CPU devices" in log
    match = re.search(rf"resuming at step (\d+) of {saved + 10}\b", log)
    assert match, log[-3000:]
    resumed = int(match[1])
    assert saved <= resumed <= on_disk < saved + 10, (saved, resumed, on_disk)
    assert f"step {saved + 10}/{saved + 10}: loss" in log and "ETA" in log
    metrics = _metrics(model_dir)
    assert metrics["start_step"] == resumed and metrics["train_steps"] == saved + 10
    assert metrics["num_replicas"] == 2 and metrics["seconds_to_first_step"] > 0
    # Other widths: one error line naming the flag, and nothing after it (the
    # checkpoint that failed to restore logged warnings when freed at exit).
    # A new interpreter: a forked child ends without freeing its objects.
    proc = run_python(
        "-m",
        "distopt.train",
        "--train_steps=" + str(saved + 20),
        *args,
        "--model_args=hidden=[16]",
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The checkpoint "), proc.stderr[-3000:]
    # Every state-shaping setting that differs from the stored run's is named
    # (the resume above ran in bfloat16).
    assert (
        "rerun with --model_args= --mixed_precision=bfloat16, or use another "
        "--model_dir." in last
    ), last
    assert _metrics(model_dir)["train_steps"] == saved + 10  # Untouched.


def test_deterministic_is_for_its_run_only(tmp_path, monkeypatch):
    """`deterministic=True` turned TensorFlow's op determinism on for the
    rest of the process (no public switch turns it off): a sweep's later
    runs were slower and, on 2 replicas with tf.data input, off a fresh
    process's numbers in the last bit. Now it is on for that run only, also
    when the run fails; determinism the user turned on stays on. The
    private switch (`distribute._determinism_switch`) still exists."""
    switch = distribute._determinism_switch()
    assert switch is not None, "TensorFlow dropped disable_op_determinism"
    is_on, turn_off = switch
    assert not is_on()
    seen = []
    real_setup = run_lib.setup

    def setup(*args, **kwargs):
        seen.append(is_on())
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(run_lib, "setup", setup)
    run_lib.train(_config(tmp_path / "a", deterministic=True, train_steps=2))
    assert not is_on()
    run_lib.train(_config(tmp_path / "b", train_steps=2))
    with pytest.raises(config_lib.ConfigError):
        run_lib.train(_config(tmp_path / "c", deterministic=True, batch_size=0))
    assert seen == [True, False, True] and not is_on()
    tf.config.experimental.enable_op_determinism()  # The user's own.
    try:
        run_lib.train(_config(tmp_path / "d", deterministic=True, train_steps=2))
        assert is_on()
    finally:
        turn_off()


def test_the_trainers_own_functions_are_hidden_from_the_retracing_warning(
    tmp_path, monkeypatch
):
    """Every function train() makes anew per run is named to
    `quiet.retracing_of_made_functions_hidden` (test_quiet.py: what it hides),
    for the whole call: a refused config is enough to see it."""
    from distopt import quiet, trainer_faults
    from distopt.trainer import step

    named = []
    real = quiet.retracing_of_made_functions_hidden

    def recording(*makers):
        named.extend(makers)
        return real(*makers)

    monkeypatch.setattr(quiet, "retracing_of_made_functions_hidden", recording)
    with pytest.raises(config_lib.ConfigError):
        run_lib.train(_config(tmp_path, batch_size=0))
    assert set(named) == {
        step.make_train_loop,
        step.make_eval_loop,
        trainer_faults.make_agreement,
    }


def test_float16_mixed_precision_trains_with_dynamic_loss_scaling(tmp_path):
    # The defaults, as a user runs them: XLA for a float16 model on CPU too
    # (with TensorFlow's float16 CPU kernels this test took 10.9 s, now 2.8
    # s). 8 steps: the first, at a scale of 2^15, already overflow.
    config = _config(
        tmp_path,
        xla=True,
        mixed_precision="float16",
        learning_rate=0.01,
        train_steps=8,
    )
    metrics = run_lib.train(config)
    assert metrics["train_steps"] == 8 and metrics["skipped_steps"] > 0
    assert np.isfinite(metrics["test_loss"]) and metrics["test_accuracy"] > 0.3
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    scales = [
        n
        for n, _ in tf.train.list_variables(str(tmp_path / "run" / "checkpoints"))
        if "loss_scale/scale" in n
    ]
    assert scales, "the loss scale is checkpointed"
    # Starts at 2^15 and halves on each overflowing (skipped) step.
    scale = float(reader.get_tensor(scales[0]))
    assert scale == 2.0**15 / 2 ** metrics["skipped_steps"]


def test_float16_with_local_sgd_is_refused_naming_the_flags(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="--mixed_precision=float16 needs"):
        run_lib.train(_config(tmp_path, mixed_precision="float16", sync="local_sgd"))


POWERSGD = {"compression": "powersgd", "compression_args": {"rank": 1}}


@pytest.mark.parametrize("args", [{}, {"rank": 1, "start_step": 0}])
def test_a_resume_spelling_the_compressors_defaults_out_is_the_same_run(
    tmp_path, finished_run, args
):
    """--compression_args=rank=1 against a run of rank=1 left implicit was
    refused, "rerun with --compression_args=": the flags, not the settings."""
    first = _config(tmp_path, train_steps=10, **POWERSGD)
    finished_run(copy_to=tmp_path, train_steps=10, **POWERSGD)
    again = _config(
        tmp_path, train_steps=20, compression="powersgd", compression_args=args
    )
    latest = checkpointing.check_model_dir(first.model_dir, again)
    assert latest is not None and latest.endswith("ckpt-10")


@pytest.mark.parametrize(
    "base,change,flag,new",
    [
        ({}, {"optimizer": "gradient_descent"}, "--optimizer", "gradient_descent"),
        ({}, {"sync": "local_sgd"}, "--sync", "local_sgd"),
        ({}, {"compression": "topk"}, "--compression", "topk"),
        # Another rank failed on Q's shape, naming no flag; another
        # min_compression_rate dropped some residuals in silence.
        (
            POWERSGD,
            {**POWERSGD, "compression_args": {"rank": 2}},
            "--compression_args",
            "rank=2",
        ),
        (
            POWERSGD,
            {**POWERSGD, "compression_args": {"rank": 1, "min_compression_rate": 9}},
            "--compression_args",
            "rank=1,min_compression_rate=9",
        ),
    ],
    ids=["optimizer", "sync", "compression", "rank", "min_compression_rate"],
)
def test_a_resume_with_another_optimizer_or_sync_is_refused_naming_the_flag(
    tmp_path, caplog, finished_run, base, change, flag, new
):
    first = _config(tmp_path, train_steps=10, **base)
    finished_run(copy_to=tmp_path, train_steps=10, **base)
    before = _snapshot(first.model_dir)
    changed = _config(tmp_path, train_steps=20, **{**base, **change})
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(changed)
    message = str(info.value)
    assert message.startswith(f"{flag}={new} cannot resume {changed.model_dir}: ")
    assert f"rerun with {flag}=" in message and len(message) < 450
    assert "<tf.Variable" not in message and "/" not in message.split(": ", 1)[1][:40]
    # Refused before the checkpoint is read: no "unrestored values" warnings.
    assert not [r for r in caplog.records if "could not be found" in r.getMessage()]
    assert not [r for r in caplog.records if "nrestored" in r.getMessage()]
    assert _snapshot(first.model_dir) == before


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_the_resume_guards_hold_without_a_readable_state_file(
    tmp_path, finished_run, damage
):
    # The guards read the checkpoints on disk, as the restore does: with the
    # `checkpoint` state file gone they were skipped (Adam's slots dropped
    # silently), and an empty one ended in a traceback.
    first = _config(tmp_path, train_steps=10)
    finished_run(copy_to=tmp_path, train_steps=10)
    state = os.path.join(first.model_dir, "checkpoints", "checkpoint")
    if damage == "deleted":
        os.remove(state)
    else:
        open(state, "w").close()
    with pytest.raises(config_lib.ModelDirError, match="^--optimizer=gradient_desc"):
        run_lib.train(_config(tmp_path, train_steps=20, optimizer="gradient_descent"))
    metrics = run_lib.train(_config(tmp_path, train_steps=20))
    assert (metrics["start_step"], metrics["train_steps"]) == (10, 20)
    # Rewritten from the files on disk, so that old checkpoints are deleted.
    listed = tf.train.get_checkpoint_state(os.path.dirname(state))
    assert [os.path.basename(p) for p in listed.all_model_checkpoint_paths] == [
        "ckpt-10",
        "ckpt-20",
    ]


def test_sam_refuses_to_resume_with_another_base_optimizer(tmp_path):
    first = _config(tmp_path, optimizer="sam", train_steps=5, checkpoint_every=5)
    run_lib.train(first)
    changed = _config(
        tmp_path,
        optimizer="sam",
        train_steps=10,
        optimizer_args={"base_optimizer": "gradient_descent"},
    )
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(changed)
    assert str(info.value).startswith(
        "--optimizer_args=base_optimizer=gradient_descent cannot resume "
    )
    assert "rerun with --optimizer_args=base_optimizer=adam" in str(info.value)


def test_a_group_size_that_does_not_divide_the_devices_is_a_flag_error(tmp_path):
    # It was a traceback from the optimizer's build, after the data loaded.
    config = _config(
        tmp_path,
        strategy="mirrored",
        virtual_devices=4,
        sync="hierarchical",
        sync_args={"group_size": 3},
    )
    with pytest.raises(config_lib.ConfigError) as info:
        run_lib.train(config)
    assert str(info.value).startswith(
        "--sync_args: group_size: must divide the 4 devices of this worker, got 3"
    )
    assert not os.path.exists(config.model_dir)


def test_a_resume_past_the_runs_end_is_refused(tmp_path, finished_run):
    # It "completed" at once, saying "resuming at step 10 of 5".
    finished_run(copy_to=tmp_path, train_steps=10)
    with pytest.raises(config_lib.ModelDirError) as info:
        run_lib.train(_config(tmp_path, train_steps=5))
    assert "holds a run at step 10, beyond this run's 5 steps" in str(info.value)
    assert _metrics(str(tmp_path / "run"))["train_steps"] == 10


def test_a_rerun_of_a_finished_run_keeps_its_figures(
    tmp_path, finished_run, monkeypatch
):
    # A scheduler's restart after the last save, or a second "rerun to
    # resume": nothing to train, and metrics.json keeps the training's
    # figures (README: "evaluates again and keeps its metrics.json figures"),
    # not those of the process that only evaluated.
    config = _config(tmp_path, train_steps=10)
    first, _ = finished_run(copy_to=tmp_path, train_steps=10)
    done = []
    monkeypatch.setattr(loop_lib, "log_done", lambda *a, **k: done.append(k))
    # This process's thread count may equal the first run's: made different.
    monkeypatch.setattr(summaries, "process_threads", lambda: -1)
    again = run_lib.train(config)
    assert again["status"] == "completed" and again["train_steps"] == 10
    for key in (
        "examples_per_second",
        "seconds_to_first_step",
        "training_seconds_excluding_eval",
        "run_training_seconds",
        "wall_seconds",
        "threads_at_end",
    ):
        assert first[key] is not None and again[key] == first[key], key
    assert again["start_step"] == 10  # This process's start, as after a resume.
    assert _metrics(config.model_dir) == pytest.approx(again)
    # The log's Done line is this process's: it trained nothing (n/a).
    assert done[0]["examples_per_second"] is None
    assert done[0]["wall_seconds"] != first["wall_seconds"]


#: The first run of two tests (shared: see finished_run).
EVAL_EVERY_5 = {"train_steps": 10, "eval_every": 5, "checkpoint_every": 5}


def test_a_run_resumed_at_an_evaluation_step_evaluates_it_first(tmp_path, finished_run):
    # A stop notice during the evaluation of step 10 cuts it short, and the
    # run stops at step 10: the rerun evaluates step 10 before training on.
    config = _config(tmp_path, **EVAL_EVERY_5)
    finished_run(copy_to=tmp_path, **EVAL_EVERY_5)
    path = os.path.join(config.model_dir, "evaluations.json")
    with open(path) as f:
        evaluations = json.load(f)
    assert [e["step"] for e in evaluations] == [5, 10]
    with open(path, "w") as f:  # As if the evaluation of step 10 was cut short.
        json.dump(evaluations[:1], f)
    run_lib.train(_config(tmp_path, train_steps=15, eval_every=5, checkpoint_every=5))
    with open(path) as f:
        evaluations = json.load(f)
    assert [e["step"] for e in evaluations] == [5, 10, 15]


def test_training_seconds_go_on_across_a_resume(tmp_path, finished_run):
    # The time to accuracy of a preempted run: the resumed process counts on
    # from the seconds recorded at its checkpoint (they restarted at 0).
    config = _config(tmp_path, **EVAL_EVERY_5)
    first, _ = finished_run(copy_to=tmp_path, **EVAL_EVERY_5)
    with open(os.path.join(config.model_dir, "training_clock.json")) as f:
        clock = json.load(f)
    assert sorted(clock) == ["10", "5"]
    assert 0 < clock["5"] < clock["10"] <= first["run_training_seconds"]
    assert first["run_training_seconds"] == first["training_seconds_excluding_eval"]
    second = run_lib.train(
        _config(tmp_path, train_steps=20, eval_every=5, checkpoint_every=5)
    )
    assert second["start_step"] == 10
    assert second["run_training_seconds"] == pytest.approx(
        clock["10"] + second["training_seconds_excluding_eval"]
    )
    with open(os.path.join(config.model_dir, "evaluations.json")) as f:
        evaluations = json.load(f)
    assert [e["step"] for e in evaluations] == [5, 10, 15, 20]
    seconds = [e["training_seconds"] for e in evaluations]
    assert clock["10"] < seconds[2] < seconds[3] <= second["run_training_seconds"]


def test_the_training_clock_keeps_the_steps_a_resume_can_start_from(tmp_path, caplog):
    from distopt.trainer.checkpointing import CLOCK_FILE, TrainingClock

    clock = TrainingClock(str(tmp_path))
    assert clock.seconds_at(5) is None  # No file yet.
    for step, seconds in [(5, 1.0), (10, 2.0), (15, 3.0)]:
        clock.record(step, seconds)
    clock.record(10, 2.5)  # A run that fell back to step 5 saves step 10 again.
    assert [clock.seconds_at(s) for s in (5, 10, 15)] == [1.0, 2.5, None]
    path = tmp_path / CLOCK_FILE
    path.write_text('{"5": 1.0, "10": "damaged"}')
    assert [clock.seconds_at(s) for s in (5, 10)] == [1.0, None]
    path.write_text("{")  # Cut short.
    assert clock.seconds_at(5) is None
    assert os.listdir(tmp_path) == [CLOCK_FILE]  # No temporary file left.
    # Where it cannot write (a virtual filesystem), one WARNING; no error:
    # the checkpoint it follows is saved, only the figure is lost.
    with caplog.at_level(logging.WARNING, logger="absl"):
        TrainingClock("/proc/nope").record(5, 1.0)
    assert "Could not write /proc/nope/training_clock.json" in caplog.text
    caplog.clear()
    # A resume without a record says so and counts from its own start.
    config = _config(tmp_path / "run", train_steps=5, checkpoint_every=5)
    run_lib.train(config)
    os.remove(os.path.join(config.model_dir, CLOCK_FILE))
    with caplog.at_level(logging.WARNING, logger="absl"):
        again = run_lib.train(_config(tmp_path / "run", train_steps=10))
    assert "The training seconds up to step 5 were not recorded" in caplog.text
    assert again["run_training_seconds"] == again["training_seconds_excluding_eval"]


def _eval_accuracies(model_dir):
    return _scalar_values(os.path.join(model_dir, "eval"), "accuracy")


def test_target_accuracy_stops_at_the_first_evaluation_that_reaches_it(tmp_path):
    config = _config(
        tmp_path,
        strategy="mirrored",
        virtual_devices=2,
        train_steps=60,
        eval_every=5,
        log_every=5,
        checkpoint_every=0,
        learning_rate=3e-3,
        target_accuracy=0.9,
    )
    metrics = run_lib.train(config)
    assert metrics == pytest.approx(_metrics(config.model_dir))
    accuracies = _eval_accuracies(config.model_dir)
    reached = [step for step, accuracy in sorted(accuracies.items()) if accuracy >= 0.9]
    assert reached, accuracies
    # Evaluations below the target let the run go on; the first at or above
    # it ended the run: no later one.
    assert min(accuracies) < reached[0]
    assert max(accuracies) == reached[0] < 60
    assert metrics["status"] == "target_reached"
    assert metrics["target_reached_at_step"] == metrics["train_steps"] == reached[0]
    assert metrics["test_accuracy"] == pytest.approx(accuracies[reached[0]])
    assert metrics["target_accuracy"] == 0.9
    assert 0 < metrics["training_seconds_excluding_eval"] <= metrics["wall_seconds"]
    # every_step on 2 replicas: each step all-reduces every float32 gradient.
    model_bytes = 4 * sum(
        np.prod(shape)
        for name, shape in tf.train.list_variables(
            os.path.join(config.model_dir, "checkpoints")
        )
        if name.startswith("model/") and name.endswith(".ATTRIBUTES/VARIABLE_VALUE")
    )
    assert model_bytes > 0
    # (The replica's example count, one float32, travels with the gradients.)
    assert metrics["communication_bytes_sent"] == reached[0] * (model_bytes + 4)
    assert metrics["communication_allreduce_calls"] > 0
    assert metrics["last_checkpoint_step"] == reached[0]


def test_an_unreachable_target_ends_completed(tmp_path):
    config = _config(tmp_path, train_steps=10, eval_every=5, target_accuracy=1.0)
    metrics = run_lib.train(config)
    assert metrics["status"] == "completed" and metrics["train_steps"] == 10
    assert metrics["target_reached_at_step"] is None
    assert sorted(_eval_accuracies(config.model_dir)) == [5, 10]
    assert metrics["communication_bytes_sent"] == 0  # One replica: no collective.


def test_a_damaged_run_config_does_not_block_the_rerun(tmp_path, finished_run):
    # An older trainer wrote it in place; one killed mid-write left it short.
    finished_run(copy_to=tmp_path, train_steps=10)
    path = tmp_path / "run" / "run_config.json"
    path.write_text(path.read_text()[:25])
    resumed = run_lib.train(_config(tmp_path, train_steps=20))
    assert resumed["start_step"] == 10 and resumed["status"] == "completed"
    assert json.loads(path.read_text())["train_steps"] == 20


def test_json_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from distopt.trainer import checkpointing

    path = tmp_path / "metrics.json"
    checkpointing.write_json_atomically(str(path), {"status": "completed", "x": 1.5})
    before = path.read_text()

    def no_rename(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.io.gfile, "rename", no_rename)
    with pytest.raises(checkpointing.WriteError) as info:
        checkpointing.write_json_atomically(str(path), {"status": "preempted"})
    message = str(info.value)
    assert message.startswith(f"Could not write {path}: No space left on device")
    assert "\n" not in message
    assert path.read_text() == before  # The old file, whole.
    assert os.listdir(tmp_path) == ["metrics.json"]  # No temporary file left.
    # Strict JSON: NaN is null.
    monkeypatch.undo()
    checkpointing.write_json_atomically(str(path), {"loss": float("nan")})
    assert json.loads(path.read_text()) == {"loss": None}


def test_a_checkpoint_from_before_the_state_scale_record_resumes(tmp_path, monkeypatch):
    # Checkpoints of compression or Accumulate runs written before the
    # optimizer recorded the loss scale of its residuals and accumulators
    # (`state_scale`) lack that variable: the resume's match check refused
    # them ("1 variable(s) of this run are not in it"). They resume, their
    # state taken in the restored scale's units, as it was read then.
    from distopt.optimizers import base

    config = _config(tmp_path, train_steps=10, compression="topk")
    with monkeypatch.context() as patch:
        patch.setattr(base.Optimizer, "_keeps_scaled_state", lambda self: False)
        run_lib.train(config)
    ckpt_dir = os.path.join(config.model_dir, "checkpoints")
    keys = [k for k, _ in tf.train.list_variables(ckpt_dir)]
    assert not [k for k in keys if "state_scale" in k] and keys
    resumed = run_lib.train(dataclasses.replace(config, train_steps=20))
    assert resumed["status"] == "completed" and resumed["start_step"] == 10
