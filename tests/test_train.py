"""Tests of the trainer: short runs per strategy, resume, bad input, the CLI.

In-process runs use the 4 logical CPUs that conftest.py creates; runs that
need their own device set-up (or the command line) are subprocesses.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from distopt import data, train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {
    "test_accuracy",
    "test_loss",
    "train_steps",
    "examples_per_second",
    "wall_seconds",
}
SCALARS = {"loss", "accuracy", "learning_rate", "examples_per_second", "skipped_steps"}


def _config(tmp_path, **overrides):
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
    values.update(overrides)
    return train_lib.TrainConfig(**values)


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
    proc = subprocess.run(
        [sys.executable, "-m", "distopt.train", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_default_strategy_run_writes_metrics_scalars_and_checkpoints(tmp_path):
    config = _config(tmp_path, model="lenet", eval_every=10)
    metrics = train_lib.train(config)
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
            "jit_compile": False,
        },
        {
            "strategy": "mirrored",
            "virtual_devices": 2,
            "sync": "local_sgd",
            "sync_period": 4,
        },
    ],
    ids=["one_device", "mirrored2", "mirrored4_weighted", "mirrored2_local_sgd"],
)
def test_strategies_end_with_metrics(tmp_path, overrides):
    config = _config(tmp_path, **overrides)
    metrics = train_lib.train(config)
    assert _metrics(config.model_dir)["train_steps"] == 20
    assert metrics["num_replicas"] == overrides.get("virtual_devices", 1)
    assert metrics["test_accuracy"] > 0.3
    if overrides.get("eval_steps") == 0:
        assert metrics["test_examples"] == 10000  # Every example, exactly once.


def test_resume_continues_from_the_checkpoint_exactly(tmp_path):
    straight = train_lib.train(
        _config(tmp_path / "a", train_steps=30, jit_compile=False)
    )
    train_lib.train(_config(tmp_path / "b", train_steps=20, jit_compile=False))
    resumed = train_lib.train(
        _config(tmp_path / "b", train_steps=30, jit_compile=False)
    )
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


def test_tfds_dataset_by_name_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=256):
        metrics = train_lib.train(
            _config(tmp_path, dataset="fashion_mnist", train_steps=4, eval_steps=0)
        )
    assert "TensorFlow Datasets fashion_mnist" in metrics["data_source"]
    assert metrics["dataset"] == "fashion_mnist" and metrics["test_examples"] == 256


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("strategy", "horovod", "'default', 'one_device', 'mirrored'"),
        ("model", "resnet", "'lenet', 'mlp'"),
        ("optimizer", "adamax", "'adam', 'adamw'"),
        ("aggregation", "median", "'mean'"),
        ("sync", "gossip", "'local_sgd'"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, field, value, valid):
    with pytest.raises(train_lib.ConfigError, match=f"Unknown {field} '{value}'") as e:
        train_lib.train(_config(tmp_path, **{field: value}))
    assert valid in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_replicas(tmp_path):
    config = _config(tmp_path, strategy="mirrored", virtual_devices=4, batch_size=30)
    with pytest.raises(train_lib.ConfigError, match="30 is not divisible by the 4"):
        train_lib.train(config)
    assert not os.path.exists(tmp_path / "run")


def test_corrupt_data_files_fail_with_checksums(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for name in data.MNIST_SHA256:
        shutil.copy(os.path.join(data.bundled_dir(), name), data_dir / name)
    os.chmod(data_dir / "train-images-idx3-ubyte.gz", 0o644)
    with open(data_dir / "train-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(data.DataError) as e:
        train_lib.train(_config(tmp_path, data_dir=str(data_dir)))
    assert "train-images-idx3-ubyte.gz is corrupt" in str(e.value)
    assert data.MNIST_SHA256["train-images-idx3-ubyte.gz"] in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_model_dir_of_another_model_is_refused_untouched(tmp_path):
    config = _config(tmp_path, train_steps=10, jit_compile=False)
    train_lib.train(config)
    before = _snapshot(config.model_dir)
    other = _config(tmp_path, model="lenet", train_steps=10)
    with pytest.raises(train_lib.ModelDirError, match="model='mlp'.*not model='lenet'"):
        train_lib.train(other)
    assert _snapshot(config.model_dir) == before
    # Without run_config.json the checkpoint itself is checked.
    os.remove(os.path.join(config.model_dir, "run_config.json"))
    before = _snapshot(config.model_dir)
    with pytest.raises(train_lib.ModelDirError, match="does not match this model"):
        train_lib.train(other)
    assert _snapshot(config.model_dir) == before


def test_bad_numbers_and_combinations(tmp_path):
    with pytest.raises(train_lib.ConfigError, match="Set --train_steps or --epochs"):
        train_lib.train(_config(tmp_path, train_steps=0))
    with pytest.raises(train_lib.ConfigError, match="--tpu"):
        train_lib.train(_config(tmp_path, strategy="tpu"))
    with pytest.raises(train_lib.ConfigError, match="beta_1"):
        train_lib.train(_config(tmp_path, optimizer_args={"beta_1": 2.0}))
    with pytest.raises(train_lib.ConfigError, match="does not take"):
        train_lib.train(_config(tmp_path, optimizer_args={"bogus": 1}))
    assert train_lib.parse_kv("a=1, b=0.5,c=true,d=x") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "x",
    }
    with pytest.raises(train_lib.ConfigError):
        train_lib.parse_kv("novalue")


def test_schedules_from_flags():
    config = train_lib.TrainConfig(learning_rate=0.1, warmup_steps=10)
    constant = train_lib.make_schedule(config, 100)
    assert float(constant(5)) == pytest.approx(0.05)
    assert float(constant(50)) == pytest.approx(0.1)
    cosine = train_lib.make_schedule(
        train_lib.TrainConfig(learning_rate=0.1, lr_schedule="cosine", warmup_steps=10),
        110,
    )
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    piecewise = train_lib.make_schedule(
        train_lib.TrainConfig(
            lr_schedule="piecewise", lr_boundaries=(10,), lr_values=(0.1, 0.01)
        ),
        100,
    )
    assert float(piecewise(11)) == pytest.approx(0.01)
    exponential = train_lib.make_schedule(
        train_lib.TrainConfig(
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
    resolver = train_lib.make_cluster_resolver()
    assert resolver.task_type == "worker" and resolver.task_id == 1
    monkeypatch.delenv("TF_CONFIG")
    for key, value in {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }.items():
        monkeypatch.setenv(key, value)
    resolver = train_lib.make_cluster_resolver(slurm_port_base=9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node2:9000"]}
    for key in ("SLURM_PROCID",):
        monkeypatch.delenv(key)
    assert train_lib.make_cluster_resolver() is None


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
        train_lib.validate_config(config)
    finally:
        flags.FLAGS.unparse_flags()
    assert config.model in ("mlp", "lenet")


@pytest.mark.slow
def test_cli_mirrored_bfloat16_deterministic_run(tmp_path):
    model_dir = tmp_path / "cli"
    proc = _run_cli(
        f"--flagfile={REPO}/configs/lenet_mnist.cfg",
        "--strategy=mirrored",
        "--virtual_devices=2",
        "--model=mlp",  # bfloat16 convolutions are slow on CPU.
        "--mixed_precision=bfloat16",
        "--deterministic",
        "--epochs=0",  # the flagfile trains by epochs; this run by steps
        "--train_steps=20",
        "--log_every=10",
        "--eval_steps=2",
        f"--model_dir={model_dir}",
    )
    log = proc.stderr
    assert "Data: mnist from bundled IDX files" in log
    assert "mirrored on a CPU-only host: 2 logical CPU devices" in log
    assert "step 10/20: loss" in log and "examples/s" in log and "ETA" in log
    metrics = _metrics(model_dir)
    assert metrics["num_replicas"] == 2 and metrics["train_steps"] == 20
    assert metrics["seconds_to_first_step"] > 0


@pytest.mark.slow
def test_cli_bad_input_is_one_clear_line(tmp_path):
    proc = _run_cli(
        "--model=vgg", "--train_steps=1", f"--model_dir={tmp_path}", check=False
    )
    assert proc.returncode != 0
    assert "Unknown model 'vgg'; valid models: ['lenet', 'mlp']" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_resumes_after_being_killed(tmp_path):
    model_dir = tmp_path / "killed"
    args = [
        "--model=mlp",
        "--batch_size=32",
        "--checkpoint_every=5",
        "--steps_per_loop=5",
        "--log_every=5",
        "--eval_steps=1",
        "--nojit_compile",
        f"--model_dir={model_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distopt.train", "--train_steps=1000000", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = str(model_dir / "checkpoints")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (path := tf.train.latest_checkpoint(ckpt_dir))
            and path.endswith("-10")
            or (path and int(path.rsplit("-", 1)[1]) > 10)
        ):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = int(tf.train.latest_checkpoint(ckpt_dir).rsplit("-", 1)[1])
    assert saved >= 10
    _run_cli("--train_steps=" + str(saved + 5), *args)
    metrics = _metrics(model_dir)
    assert metrics["start_step"] == saved and metrics["train_steps"] == saved + 5
