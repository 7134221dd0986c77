"""Smoke tests of the benchmarks: a few steps, output structure only.

No timing is asserted; the figures come from full runs (BUILD_NOTES.md).
"""

import importlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest
from conftest import run_python

from distopt.benchmarks import (
    adam_step,
    protocol,
    step_breakdown,
    trainer_vs_keras,
)


class _ForkedChildren:
    """The benchmarks' ``subprocess``: their ``python`` children forked.

    The benchmarks start each measurement (and sync_modes each worker) as a
    new interpreter, by design: a real run's figures must not depend on the
    process before. Here each would pay ~3.5 CPU-s for ``import tensorflow``
    ahead of a few steps, while these tests check the outputs' structure and
    counts, not an interpreter's start. So the same argv, environment and
    working directory run forked from the fork server instead (TensorFlow
    imported, no runtime yet; a process of its own: see forkserver.py).
    Every child starts in ``protocol.run_children``, through this ``Popen``.
    """

    PIPE = subprocess.PIPE
    STDOUT = subprocess.STDOUT
    CompletedProcess = subprocess.CompletedProcess
    TimeoutExpired = subprocess.TimeoutExpired

    @staticmethod
    def Popen(command, *, stdout, stderr, env=None, start_new_session=False):
        """``subprocess.Popen(command, ...)``, output to open files."""
        assert command[0] == sys.executable, command
        # The children's log level, as they inherit it from this process
        # (conftest) or sync_modes sets it; the server imported at it.
        env = {**(env or os.environ), "TF_CPP_MIN_LOG_LEVEL": "2"}
        return conftest.FORK_SERVER.popen(
            command[1:],
            cwd=os.getcwd(),
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=start_new_session,
        )


@pytest.fixture
def forked_children(monkeypatch):
    """The benchmarks' children fork (unless ``DISTOPT_TESTS_NO_FORK``)."""
    if not conftest.NO_FORK:
        monkeypatch.setattr(protocol, "subprocess", _ForkedChildren)


def test_adam_step_runs_and_reports_ratios(tmp_path, capsys, forked_children):
    results = _run_benchmark(
        "adam_step",
        tmp_path / "out.json",
        "--sets=tiny",
        "--optimizers=adam",
        "--contenders=distopt,floor",
        "--steps=3",
        "--repeats=1",
        output_flag="--json",
    )
    (row,) = results["rows"]
    assert row["num_variables"] == 4
    assert row["ms_per_step"]["distopt"]["median"] > 0
    assert row["first_call_s"]["distopt"]["median"] > 0
    assert set(row["ratios"]) == {"distopt/floor"}
    assert "adam on tiny" in capsys.readouterr().out


@pytest.mark.parametrize("contender", ["touch", "assign_add"])
def test_the_per_variable_floors_write_every_variable(contender, monkeypatch):
    # A floor that skipped writes would flatter nothing but itself; check
    # each one changes every variable by -1e-3 g per call.
    import tensorflow as tf

    made = []
    real = tf.Variable
    monkeypatch.setattr(
        tf, "Variable", lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    )
    step = adam_step.make_step(contender, "tiny", "adam")
    before = [v.numpy() for v in made]
    step()
    step()
    rng = np.random.default_rng(0)
    shapes = adam_step.variable_shapes("tiny")
    [rng.standard_normal(s, dtype=np.float32) for s in shapes]  # The variables.
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    assert len(made) == len(shapes)
    for v, p0, g in zip(made, before, grads):
        np.testing.assert_allclose(v.numpy() - p0, -2e-3 * g, rtol=1e-4, atol=1e-6)


def test_resnet50_shapes():
    shapes = adam_step.resnet50_shapes()
    assert len(shapes) == 214
    assert sum(math.prod(s) for s in shapes) == 25_583_592


def test_trainer_vs_keras_runs_and_reports_ratios(tmp_path, capsys, forked_children):
    results = _run_benchmark(
        "trainer_vs_keras",
        tmp_path / "out.json",
        "--models=mlp",
        "--strategies=default",
        "--contenders=keras_nojit",
        "--steps=3",
        "--warmup_steps=1",
        "--repeats=1",
        "--keras_steps_per_execution=1",
    )
    (cell,) = results["cells"]
    assert cell["examples_per_second"]["keras_nojit"]["median"] > 0
    assert cell["seconds_to_first_step"]["keras_nojit"]["median"] > 0
    assert "mlp / default" in capsys.readouterr().out


def test_bare_step_and_breakdown_in_process(caplog):
    args = trainer_vs_keras.parse_args(["--steps=2", "--warmup_steps=1"])
    bare = trainer_vs_keras.measure_bare(args, "mlp", "default")
    assert bare["examples_per_second"] > 0
    phases = step_breakdown.step_phases("mlp", "default", steps=2, rounds=1)
    assert set(phases["ms_per_step"]) == set(step_breakdown.PHASES)
    assert set(phases["attribution_ms"]) >= {"forward", "backward", "update"}
    assert phases["attribution_ms"]["update"] > 0  # measured, not a difference
    with caplog.at_level("WARNING", logger="tensorflow"):
        kernels = step_breakdown.lenet_kernels(steps=1, rounds=1)
    # One function per kernel, made by one maker: not the caller's retracing.
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    assert list(kernels) == [
        "conv1 forward",
        "conv1 filter gradient",
        "pool1 forward + gradient",
        "conv2 forward",
        "conv2 input gradient",
        "conv2 filter gradient",
        "pool2 forward + gradient",
    ]
    assert all(k["median"] > 0 for k in kernels.values())


def test_breakdown_attribution_is_never_negative():
    """A difference of medians below 0 (noise) is shown as 0, with a note."""
    medians = {
        "pipeline": 1.0,
        "forward": 3.0,
        "forward_backward": 2.5,  # under load: below the forward alone
        "bare_step": 6.0,
        "update": 0.25,
        "trainer_loop": 5.0,
    }
    stats = {name: {"median": ms, "min": ms, "max": ms} for name, ms in medians.items()}
    attribution, notes = step_breakdown.attribute(stats)
    assert attribution == {
        "forward": 3.0,
        "update": 0.25,
        "backward": 0.0,
        "input_and_bookkeeping": 0.0,
        "input_pipeline_alone": 1.0,
    }
    noise = "below 0 within the rounds' noise; shown as 0"
    assert notes == [
        f"backward: forward_backward - forward = -0.50 ms, {noise}",
        f"input_and_bookkeeping: trainer_loop - bare_step = -1.00 ms, {noise}",
    ]


def test_trainer_vs_keras_summary_of_every_contender():
    def sample(rate, first=None):
        return {"examples_per_second": rate} | (
            {"seconds_to_first_step": first} if first else {}
        )

    cell = trainer_vs_keras.summarize(
        {
            "model": "lenet",
            "strategy": "default",
            "samples": {
                "trainer": [sample(30.0, 4.0), sample(10.0, 6.0), sample(20.0, 5.0)],
                "keras_auto": [sample(10.0, 5.0)],
                "keras_nojit": [sample(16.0, 10.0)],
                "bare": [sample(25.0)],
            },
        }
    )
    assert cell["examples_per_second"]["trainer"] == {
        "median": 20.0,
        "min": 10.0,
        "max": 30.0,
        "n": 3,
    }
    assert cell["ratios"] == {
        "trainer/keras_nojit (best Keras)": 1.25,
        "trainer/bare": 0.8,
        "first step trainer/keras_auto": 1.0,
    }
    results = {
        "steps": 3,
        "batch_size": 128,
        "repeats": 3,
        "cpu_count": 2,
        "load_average": (1.0, 1.0, 1.0),
        "load_end": (1.0, 1.0, 1.0),
        "cells": [cell],
    }
    assert "trainer/bare: 0.80x" in trainer_vs_keras.report(results)


def test_trainer_contenders_run_the_trainer_command(monkeypatch):
    # The trainer is its own process: no --measure re-entry (which only knows
    # Keras and bare), with trainer:<flags> passed on.
    calls = []

    def fake(args, model_name, strategy_name, extra_flags=()):
        calls.append((model_name, strategy_name, list(extra_flags)))
        return {"examples_per_second": 1.0, "seconds_to_first_step": 1.0}

    monkeypatch.setattr(trainer_vs_keras, "measure_trainer", fake)
    args = trainer_vs_keras.parse_args([])
    for contender in ("trainer", "trainer:--input=dataset --jit_compile"):
        result = trainer_vs_keras._measure_in_subprocess(
            args, contender, "mlp", "mirrored"
        )
        assert result["examples_per_second"] == 1.0
    assert calls == [
        ("mlp", "mirrored", []),
        ("mlp", "mirrored", ["--input=dataset", "--jit_compile"]),
    ]


def test_adam_step_targets_apply_to_the_optimizers_they_name():
    def row(optimizer, set_name):
        sample = [{"ms_per_step": 1.0, "first_call_s": 1.0}]
        samples = {"distopt": sample, "keras_plain": sample, "keras_xla": sample}
        return adam_step.summarize(
            {"set": set_name, "optimizer": optimizer, "samples": samples}
        )["targets"]

    # The 16x1M targets are Adam's no-regression figures...
    assert set(row("adam", "16x1M")) == {
        "distopt/keras_plain",
        "distopt/keras_xla",
        "first call s",
    }
    assert set(row("momentum", "16x1M")) == {"first call s"}
    # ...the 320-variable and ResNet-50 targets every optimizer's.
    for name in adam_step.OPTIMIZERS:
        assert row(name, "320var")["distopt/keras_xla"] == [0.4, False]
        assert row(name, "resnet50")["distopt/keras_xla"] == [0.9, False]


@pytest.mark.slow
def test_time_to_accuracy_end_to_end_on_a_tiny_configuration(tmp_path):
    """The real trainer through the real launcher, two modes, one round."""
    proc = run_python(
        "-m",
        "distopt.benchmarks.time_to_accuracy",
        "--workers=2",
        "--links=none",
        "--modes=every_step,local_sgd8",
        "--repeats=1",
        "--other_repeats=1",
        "--max_steps=40",
        "--eval_every=20",
        "--target=0.5",
        "--noscaling",
        f"--output_dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"every_step", "local_sgd8"}
    for row in rows.values():
        assert row["workers"] == 2 and row["link"] == "none" and row["runs"] == 1
        # 0.5 is reached at the first evaluation of either mode.
        assert row["reached"] == 1 and row["steps"]["median"] == 20
    assert rows["every_step"]["ratio_to_every_step"] == 1.0
    # In 20 steps every_step sends 20 buffers; local SGD(8) averages at steps
    # 8 and 16 only (the evaluations' averages are not the run's traffic).
    sent = {m: r["bytes_sent"]["median"] for m, r in rows.items()}
    per_buffer = sent["every_step"] / 20
    assert sent["local_sgd8"] == pytest.approx(2 * per_buffer, rel=1e-3)
    assert "every_step" in proc.stdout and "local_sgd8" in proc.stdout


def _run_benchmark(module, out, *flags, output_flag="--output"):
    """Runs benchmark `module`'s ``main`` here; returns the JSON it wrote.

    Its children fork (`forked_children`); the benchmark itself starts no
    TensorFlow, so running it here rather than as ``python -m`` leaves only
    the ``__main__`` line out (the bad-flag tests and test_entry_points run
    that). A failed run's output is in the test's captured output.
    """
    assert _main(module, *flags, f"{output_flag}={out}") == 0
    with open(out) as f:
        return json.load(f)


#: The benchmarks whose ``main`` takes argparse's argv; the others take
#: absl's, program name first.
ARGPARSE = {"adam_step", "step_breakdown", "sync_modes", "trainer_vs_keras"}


def _main(module, *flags):
    """Benchmark ``module``'s ``main(flags)`` here: its exit status."""
    main = importlib.import_module(f"distopt.benchmarks.{module}").main
    try:
        return main(list(flags) if module in ARGPARSE else [module, *flags])
    except SystemExit as e:  # argparse's errors
        return e.code


@pytest.mark.slow
def test_compression_accuracy_runs_and_counts_fewer_bytes(tmp_path, forked_children):
    result = _run_benchmark(
        "compression_accuracy",
        tmp_path / "out.json",
        "--models=mlp",
        "--replicas=2",
        "--seeds=0",
        "--train_steps=10",
        "--compressors=none,topk",
    )
    table = {r["compressor"]: r for r in result["table"]}
    assert table["none"]["points_vs_none"] == 0 and table["none"]["fewer_bytes"] == 1
    # TopK(0.01): 1% of the values plus as many int32 indices, per variable
    # (at least one of each): about 50x fewer bytes.
    assert 45 < table["topk"]["fewer_bytes"] < 51


@pytest.mark.slow
def test_sync_modes_runs_every_row_and_counts_what_each_replica_sends(
    tmp_path, forked_children
):
    """2 localhost workers, every row of the table, a few steps each."""
    rows = _run_benchmark(
        "sync_modes",
        tmp_path / "out.json",
        "--steps=8",
        "--warmup=1",
        output_flag="--json",
    )
    assert set(rows) == {
        "every_step",
        "accumulate",
        "local_sgd",
        "diloco",
        "powersgd",
        "topk",
        "onebit",
    }
    # The MLP 784-700-500-10, counted here from its shapes.
    layers = [(784, 700), (700, 500), (500, 10)]
    params = sum(r * c + c for r, c in layers)
    assert rows["every_step"]["parameters"] == params
    sent = {m: r["bytes_sent_per_step"] for m, r in rows.items()}
    # One float32 buffer of every gradient plus the replica's weight.
    assert sent["every_step"] == 4 * params + 4
    # Periodic modes send the same buffer once in 8 steps.
    for mode in ("accumulate", "local_sgd", "diloco"):
        assert sent[mode] == pytest.approx(sent["every_step"] / 8, rel=1e-3), mode
    # PowerSGD rank 2: P and Q of each matrix, (rows + cols) x 2 floats
    # (all three are worth compressing), and the biases uncompressed.
    assert sent["powersgd"] == 4 * sum((r + c) * 2 + c for r, c in layers)
    # Top-k and 1-bit gather small payloads: at least 20x fewer bytes.
    for mode in ("topk", "onebit"):
        assert 0 < sent[mode] * 20 < sent["every_step"], mode
        assert rows[mode]["allreduce_calls"] == 0


@pytest.mark.slow
def test_compression_cost_runs_and_counts_the_bytes_of_its_shapes(
    tmp_path, forked_children
):
    result = _run_benchmark(
        "compression_cost",
        tmp_path / "out.json",
        "--compressors=none,topk",
        "--replicas=2",
        "--steps=2",
        "--repeats=1",
    )
    rows = {r["compressor"]: r for r in result["summary"]}
    # The MLP's gradient shapes, counted here.
    sizes = [784 * 700, 700, 700 * 500, 500, 500 * 10, 10]
    assert rows["none"]["bytes_sent"] == 4 * sum(sizes) + 4  # and the weight
    # Top-k 1%: ceil(d / 100) float32 values and int32 indices per variable.
    assert rows["topk"]["bytes_sent"] == 8 * sum(math.ceil(d / 100) for d in sizes)
    assert rows["topk"]["overhead_ms"] == pytest.approx(
        rows["topk"]["step_ms"]["median"] - rows["none"]["step_ms"]["median"]
    )


@pytest.mark.slow
def test_sharded_state_runs_and_halves_the_state_on_2_devices(
    tmp_path, forked_children
):
    result = _run_benchmark(
        "sharded_state",
        tmp_path / "out.json",
        "--models=mlp",
        "--devices=2",
        "--steps=2",
        "--repeats=1",
    )
    (row,) = result["summary"]
    state = row["state_mb_per_device"]
    # Adam: m and v, float32, per parameter; sharded, half of them (plus at
    # most one element of padding per slot). Both also hold the optimizer's
    # counters (scalars, not sharded): under 1 KB.
    slots = 2 * 4 * row["parameters"] / 2**20
    kb = 1024 / 2**20
    assert 0 <= state["False"] - slots < kb
    assert 0 <= state["True"] - slots / 2 < kb
    assert row["step_ratio_sharded"] > 0


@pytest.mark.parametrize(
    "benchmark, flag, says",
    [
        ("adam_step", "--repeats=0", "argument --repeats: must be >= 1, got 0"),
        ("trainer_vs_keras", "--steps=-1", "argument --steps: must be >= 1, got -1"),
        ("step_breakdown", "--rounds=x", "argument --rounds: not an integer: 'x'"),
        ("sync_modes", "--warmup=-1", "argument --warmup: must be >= 0, got -1"),
        ("compression_cost", "--repeats=-1", "flag --repeats=-1: -1 is not a"),
        ("sharded_state", "--devices=0", "flag --devices=0: 0 is not integer"),
        ("keras_fit", "--batch_size=0", "flag --batch_size=0: 0 is not a"),
        ("time_to_accuracy", "--target=1.5", "flag --target=1.5: 1.5 is not a"),
        ("compression_accuracy", "--train_steps=0", "flag --train_steps=0: 0 is not"),
        # Unknown names and bad lists failed every run, then printed an
        # empty table with exit status 0 (or a traceback).
        ("compression_cost", "--compressors=nope", "flag --compressors=['nope']: 'n"),
        ("compression_cost", "--output=/nonexistent/x", "--output=/nonexistent/x: the"),
        ("sharded_state", "--models=nope", "flag --models=['nope']: 'nope' is not"),
        ("time_to_accuracy", "--workers=abc", "flag --workers=['abc']: 'abc' is not"),
        ("time_to_accuracy", "--links=100mbps", "flag --links=['100mbps']: '100mbps"),
        ("time_to_accuracy", "--modes=nope", "flag --modes=['nope']: 'nope' is not"),
        ("compression_accuracy", "--replicas=0", "flag --replicas=['0']: '0' is not"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(benchmark, flag, says):
    # They ran with no repeat (an empty table) or a zero-step "measurement",
    # or answered in two lines, argparse's usage first.
    proc = run_python("-m", f"distopt.benchmarks.{benchmark}", flag, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"distopt.benchmarks.{benchmark}: error: {says}")


@pytest.fixture
def children(monkeypatch):
    """No child process: each one a benchmark starts fails at once.

    Returns the commands started (every child starts in
    ``protocol.run_children``).
    """
    started = []

    def run_children(commands, **kwargs):
        started.extend(commands)
        return [
            subprocess.CompletedProcess(c, 1, "", "stub: not run") for c in commands
        ]

    monkeypatch.setattr(protocol, "run_children", run_children, raising=False)
    return started


@pytest.mark.parametrize(
    "benchmark, flags",
    [
        ("compression_cost", ["--repeats=1"]),
        ("sharded_state", ["--repeats=1"]),
        ("adam_step", ["--sets=tiny", "--optimizers=adam", "--repeats=1"]),
        ("trainer_vs_keras", ["--models=mlp", "--strategies=default", "--repeats=1"]),
        ("step_breakdown", ["--startup_only", "--repeats=1"]),
        ("compression_accuracy", ["--models=mlp", "--replicas=2", "--seeds=0"]),
        # A RuntimeError traceback at the first failed run.
        ("keras_fit", ["--strategies=default"]),
    ],
)
def test_every_run_failing_is_an_error(benchmark, flags, children, capsys):
    # It printed an empty table and exited 0.
    assert _main(benchmark, *flags) == 1
    assert children, "no run was started"
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"distopt.benchmarks.{benchmark}: error: every run failed (see above)"
    )


def test_keras_fit_reports_a_contender_whose_every_run_failed(monkeypatch, capsys):
    # The first failed run was a RuntimeError traceback, the other
    # contender's runs lost with it.
    result = {"examples_per_second": 100.0, "cpu_us_per_example": 5.0}

    def run_children(commands, **kwargs):
        return [
            subprocess.CompletedProcess(c, 0, protocol.RESULT + json.dumps(result), "")
            if "--measure=distopt" in c
            else subprocess.CompletedProcess(c, 1, "", "stub: keras crashed")
            for c in commands
        ]

    monkeypatch.setattr(protocol, "run_children", run_children)
    assert _main("keras_fit", "--strategies=default") == 0
    out, err = capsys.readouterr()
    assert "keras default failed:\nstub: keras crashed" in out
    assert "default   keras    failed (every run; see above)" in out
    assert "default   distopt  median       100 examples/s" in out
    assert "ratio" not in out and err == ""


@pytest.mark.parametrize(
    "benchmark, flag, says",
    [
        # An unknown name was measured as something else under its label
        # (adam_step's contenders: Keras; keras_fit's strategies: default),
        # or failed every run with exit status 0, or was a traceback.
        ("adam_step", "--contenders=bogus", "argument --contenders: 'bogus' is not"),
        ("adam_step", "--optimizers=bogus", "argument --optimizers: 'bogus' is not"),
        ("adam_step", "--sets=bogus", "argument --sets: 'bogus' is not one of 16x1M,"),
        ("trainer_vs_keras", "--models=bogus", "argument --models: 'bogus' is not"),
        ("trainer_vs_keras", "--contenders=bogus", "argument --contenders: 'bogus'"),
        ("step_breakdown", "--model=bogus", "argument --model: invalid choice: 'bo"),
        ("keras_fit", "--strategies=bogus", "flag --strategies=['bogus']: 'bogus' is"),
        # ZeroDivisionError after every run (sharding over 1 device).
        ("sharded_state", "--devices=1", "flag --devices=1: 1 is not integer >= 2"),
        # 1 gave each of the 2 workers 0 examples; 3 dropped one.
        ("sync_modes", "--batch_size=3", "argument --batch_size: must be a positive"),
        # Mirrored's 2 replicas: bare's per-replica batch dropped one example.
        ("trainer_vs_keras", "--batch_size=3", "argument --batch_size: must be a pos"),
        # Every run failed, after a minute.
        ("keras_fit", "--batch_size=3", "flag --batch_size=3: must be a positive"),
        # The trainer refused each run, one by one.
        ("compression_accuracy", "--replicas=3", "flag --replicas=['3']: '3' does"),
        ("compression_accuracy", "--replicas=2,48", "flag --replicas=['2', '48']: '4"),
        ("compression_accuracy", "--optimizer=bogus", "flag --optimizer=bogus: value"),
        ("compression_accuracy", "--learning_rate=0", "flag --learning_rate=0.0: the"),
        ("compression_accuracy", "--learning_rate=inf", "flag --learning_rate=inf: t"),
        # Fewer steps than a sync period measured no sync: 0 bytes, a 12x
        # "speed-up"; 12 steps held one sync of k = 8.
        ("sync_modes", "--steps=2", "argument --steps: must be a positive multiple"),
        ("sync_modes", "--steps=12", "argument --steps: must be a positive multiple"),
    ],
)
def test_a_bad_name_or_count_is_one_line_before_any_run(
    benchmark, flag, says, children, capsys
):
    assert _main(benchmark, flag) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not children
    assert err.startswith(f"distopt.benchmarks.{benchmark}: error: {says}"), err


def test_an_odd_batch_is_taken_without_mirrored():
    # Only mirrored splits the batch: the default strategy has 1 replica.
    args = trainer_vs_keras.parse_args(["--strategies=default", "--batch_size=3"])
    assert args.batch_size == 3


def test_keras_fit_takes_an_odd_batch_without_mirrored(children):
    assert _main("keras_fit", "--batch_size=3", "--strategies=default") == 1
    assert children, "no run was started"


def test_keras_fit_measures_only_its_contenders(monkeypatch, capsys):
    # An unknown --measure was a traceback (or distopt measured under its
    # name).
    from distopt.benchmarks import keras_fit

    def measure(contender, strategy_name):
        raise AssertionError(f"measured {contender}")

    monkeypatch.setattr(keras_fit, "measure", measure)
    assert _main("keras_fit", "--measure=bogus", "--strategies=default") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "distopt.benchmarks.keras_fit: error: flag --measure=bogus: value should"
    ), err


def test_compression_accuracy_takes_the_trainers_optimizers():
    import distopt.optimizers
    from distopt.benchmarks import compression_accuracy

    assert list(compression_accuracy.OPTIMIZERS) == distopt.optimizers.names()


@pytest.fixture
def trainer_runs(tmp_path, monkeypatch):
    """compression_accuracy's trainer runs, stubbed, its temporary directory
    in ``tmp_path / "tmp"``.

    Each run writes a file and its metrics in its ``--model_dir``; one whose
    ``--compression`` is in ``fail`` fails, in ``stop`` raises (after the
    file) what ``run_children`` does when the benchmark is stopped (SIGTERM).
    """
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    behaviour = {"fail": set(), "stop": set()}

    def run_children(commands, **kwargs):
        (command,) = commands
        flags = dict(a[2:].split("=", 1) for a in command if a.startswith("--"))
        model_dir = flags["model_dir"]
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "ckpt"), "w") as f:
            f.write("x" * 100)
        if flags.get("compression") in behaviour["stop"]:
            raise SystemExit(128 + signal.SIGTERM)
        if flags.get("compression") in behaviour["fail"]:
            return [subprocess.CompletedProcess(command, 1, "", "stub: failed")]
        metrics = {
            "test_accuracy": 0.5,
            "communication_bytes_sent": 8,
            "train_steps": 2,
        }
        with open(os.path.join(model_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return [subprocess.CompletedProcess(command, 0, "", "")]

    monkeypatch.setattr(protocol, "run_children", run_children)
    return tmp, behaviour


CA_FLAGS = ["--models=mlp", "--replicas=2", "--seeds=0", "--compressors=none,topk"]


def test_compression_accuracy_removes_its_run_directories(trainer_runs, capsys):
    # Each run's directory (checkpoints: up to 80 MB) was left in /tmp.
    tmp, _ = trainer_runs
    assert _main("compression_accuracy", *CA_FLAGS) == 0
    assert os.listdir(tmp) == []
    assert capsys.readouterr().err == ""


def test_compression_accuracy_keeps_and_names_a_failed_runs_directory(
    trainer_runs, capsys
):
    tmp, behaviour = trainer_runs
    behaviour["fail"].add("topk")
    assert _main("compression_accuracy", *CA_FLAGS) == 0
    (workdir,) = tmp.iterdir()
    assert os.listdir(workdir) == ["mlp_2_topk_0"]
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "distopt.benchmarks.compression_accuracy: the failed runs' "
        f"directories are in {workdir}"
    )


def test_compression_accuracy_stopped_removes_its_run_directories(trainer_runs):
    tmp, behaviour = trainer_runs
    behaviour["fail"].add("powersgd")
    behaviour["stop"].add("topk")
    flags = [*CA_FLAGS[:-1], "--compressors=none,powersgd,topk"]
    assert _main("compression_accuracy", *flags) == 128 + signal.SIGTERM
    assert os.listdir(tmp) == []


def test_the_names_the_help_lists_are_taken(children):
    # The list of valid sets omitted tiny; trainer:<flags> is a contender.
    args = trainer_vs_keras.parse_args(["--contenders=bare,trainer:--jit_compile"])
    assert args.contenders == ["bare", "trainer:--jit_compile"]
    assert "tiny" in adam_step.SET_NAMES


@pytest.mark.parametrize(
    "benchmark, flags, says",
    [
        ("adam_step", ["--sets=tiny", "--json={missing}"], "--json={missing}: the"),
        ("step_breakdown", ["--startup_only", "--json={missing}"], "--json={missing}"),
        ("sync_modes", ["--json={dir}"], "--json={dir} is a directory"),
        (
            "trainer_vs_keras",
            ["--models=mlp", "--output={missing}"],
            "--output={missing}",
        ),
        ("sharded_state", ["--models=mlp", "--output={missing}"], "--output={missing}"),
        # os.access says yes to root, even for /proc.
        ("compression_cost", ["--output=/proc/x.json"], "--output=/proc/x.json: /proc"),
        (
            "compression_accuracy",
            ["--seeds=0", "--output={missing}"],
            "--output={missing}",
        ),
        # A FileExistsError traceback before.
        ("time_to_accuracy", ["--noscaling", "--output_dir={file}"], "--output_dir="),
    ],
)
def test_an_output_path_is_checked_before_any_run(
    benchmark, flags, says, tmp_path, children, capsys
):
    # It was written only after the work: the results were lost, with a
    # traceback.
    (tmp_path / "file").write_text("")
    where = {
        "missing": tmp_path / "no" / "x.json",
        "dir": tmp_path,
        "file": tmp_path / "file",
    }
    flags = [f.format(**where) for f in flags]
    assert _main(benchmark, *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not children
    assert err.startswith(
        f"distopt.benchmarks.{benchmark}: error: {says.format(**where)}"
    ), err


def test_a_failed_write_is_one_line_and_leaves_the_file(tmp_path, monkeypatch, capsys):
    # A full disk at the end: one line naming the file, exit status 1, the
    # earlier results intact (not a traceback and a truncated file).
    row = dict.fromkeys(
        [
            "k",
            "allreduce_calls_per_step",
            "payload_bytes_per_step",
            "payload_bytes_per_update",
            "bytes_sent_per_step",
            "steps_per_second",
        ],
        1,
    )
    out = protocol.RESULT + json.dumps({"every_step": row})
    monkeypatch.setattr(
        protocol,
        "run_children",
        lambda commands, **k: [
            subprocess.CompletedProcess(c, 0, out, "") for c in commands
        ],
    )

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    path = tmp_path / "out.json"
    path.write_text("earlier")
    assert _main("sync_modes", f"--json={path}") == 1
    assert capsys.readouterr().err == (
        f"distopt.benchmarks.sync_modes: error: could not write {path}: "
        "No space left on device\n"
    )
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["out.json"]


def test_no_warm_up_fit_for_0_warm_up_steps():
    # fit(steps_per_epoch=0) on a repeated dataset never returns (keras_fit
    # and trainer_vs_keras hung with --warmup_steps=0).
    fits = []

    class Model:
        def fit(self, dataset, **kwargs):
            fits.append(kwargs["steps_per_epoch"])

    protocol.warm_up_fit(Model(), None, 0)
    protocol.warm_up_fit(Model(), None, 2)
    assert fits == [2]


def test_only_protocol_starts_child_processes():
    # So that every child is ended with its benchmark (run_children).
    for path in os.scandir(os.path.dirname(protocol.__file__)):
        if path.name.endswith(".py") and path.name != "protocol.py":
            with open(path) as f:
                text = f.read()
            assert "import subprocess" not in text, path.name


_STOPPED_CHILD = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignores":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Its child inherits it.
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(60)
"""

_BENCHMARK = f"""
import sys
from distopt.benchmarks import protocol
protocol.GRACE_SECONDS = 0.5
protocol.run_child([sys.executable, "-c", {_STOPPED_CHILD!r}, *sys.argv[1:]])
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "sig, child", [(signal.SIGTERM, "exits"), (signal.SIGINT, "ignores")]
)
def test_a_stopped_benchmark_ends_its_children(sig, child, tmp_path):
    # They ran on, orphaned, to the end of their work. A child that ignores
    # SIGTERM is killed after the grace; its own children go with it.
    pids = tmp_path / "pids"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BENCHMARK, child, str(pids)],
        cwd=conftest.REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig
    assert err.endswith(f": stopped by {sig.name}; ended its child processes\n"), err
    assert err.count("\n") == 1
    assert not any(_running(int(p)) for p in pids.read_text().split())


def test_a_child_past_the_timeout_is_ended_and_the_others_kept():
    # sync_modes' timeout path: the late child ends by SIGTERM, the finished
    # one keeps its output, and this process goes on (no stop, no exit).
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    quick = [sys.executable, "-c", "print('done')"]
    start = time.monotonic()
    late, done = protocol.run_children([slow, quick], timeout=1, grace_seconds=5)
    assert time.monotonic() - start < 30
    assert late.returncode == -signal.SIGTERM
    assert (done.returncode, done.stdout) == (0, "done\n")


def _tta_run(seed):
    """One time_to_accuracy run of every_step, 2 workers, no link limit."""
    return {
        "mode": "every_step",
        "workers": 2,
        "link": "none",
        "seed": seed,
        "learning_rate": 0.002,
        "outer_learning_rate": None,
        "status": "target_reached",
        "steps": 20,
        "seconds": 1.0,
        "accuracy": 0.9,
        "bytes_sent": 100,
        "link_bytes_sent": None,
        "examples_per_second": 10.0,
        "evaluations": [],
    }


def test_time_to_accuracy_counts_each_run_once(tmp_path, monkeypatch, capsys):
    # A rerun into the same --output_dir appended seed 0 again, and the
    # report counted the two as independent repeats.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    seeds = []
    monkeypatch.setattr(
        tta,
        "run_once",
        lambda m, w, link, seed, *a: seeds.append(seed) or _tta_run(seed),
    )
    monkeypatch.setattr(tta, "plot", lambda runs, output_dir: [])
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps(_tta_run(0)) + "\n")
    flags = ["--workers=2", "--links=none", "--modes=every_step", "--noscaling"]
    flags += ["--repeats=2", "--other_repeats=2", f"--output_dir={tmp_path}"]
    assert _main("time_to_accuracy", *flags) == 0
    assert seeds == [1]  # seed 0 was there
    assert f"skipping 1 runs already in {runs}" in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []  # runs/ probed: nothing left.
    with open(runs, "a") as f:
        f.write(json.dumps(_tta_run(1)) + "\n")  # as an earlier version did
    assert _main("time_to_accuracy", "--report_only", f"--output_dir={tmp_path}") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    assert results["rows"][0]["runs"] == 2


def test_time_to_accuracy_report_only_creates_nothing(tmp_path, capsys):
    # A mistyped --output_dir was created (runs/ in it) before it was refused.
    typo = tmp_path / "typo"
    assert _main("time_to_accuracy", "--report_only", f"--output_dir={typo}") == 2
    assert capsys.readouterr().err == (
        f"distopt.benchmarks.time_to_accuracy: error: --output_dir={typo} has no "
        "runs.jsonl\n"
    )
    assert not typo.exists()


def test_time_to_accuracy_report_only_of_no_runs_says_so(tmp_path, capsys):
    # runs.jsonl is made before the first run; one stopped left it empty, and
    # the report was an empty table with exit 0.
    (tmp_path / "runs.jsonl").write_text("")
    assert _main("time_to_accuracy", "--report_only", f"--output_dir={tmp_path}") == 2
    assert capsys.readouterr().err == (
        "distopt.benchmarks.time_to_accuracy: error: "
        f"{tmp_path / 'runs.jsonl'} has no runs yet\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["runs.jsonl"]


def test_time_to_accuracy_tune_checks_its_file_before_any_run(
    tmp_path, monkeypatch, capsys
):
    # tune.jsonl was opened only around the runs: an IsADirectoryError
    # traceback.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    runs = []
    monkeypatch.setattr(tta, "run_once", lambda *a: runs.append(a))
    path = tmp_path / "runs" / "tune.jsonl"
    path.mkdir(parents=True)
    flags = ["--tune", "--modes=every_step", f"--output_dir={tmp_path}"]
    assert _main("time_to_accuracy", *flags) == 2
    err = capsys.readouterr().err
    assert err == (
        f"distopt.benchmarks.time_to_accuracy: error: cannot append to {path}: "
        "Is a directory\n"
    )
    assert not runs


TTA_FLAGS = ["--workers=2", "--links=none", "--modes=every_step", "--noscaling"]


@pytest.mark.parametrize("blocked", ["a directory", "read-only"])
def test_time_to_accuracy_checks_runs_jsonl_before_any_run(
    blocked, tmp_path, monkeypatch, capsys
):
    # runs.jsonl was first appended to after the first run (minutes to
    # hours): a read-only one failed only then; a directory was a traceback.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    runs = []
    monkeypatch.setattr(tta, "run_once", lambda *a: runs.append(a) or _tta_run(0))
    path = tmp_path / "runs.jsonl"
    if blocked == "a directory":
        path.mkdir()
        says = "Is a directory"
    else:
        # Root (as here) may append to a 0o444 file: the open refuses instead.
        path.write_text("")
        real_open = open

        def read_only(file, mode="r", *args, **kwargs):
            if "a" in mode and os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(tta, "open", read_only, raising=False)
        says = "Permission denied"
    flags = [*TTA_FLAGS, f"--output_dir={tmp_path}"]
    assert _main("time_to_accuracy", *flags) == 2
    assert capsys.readouterr().err == (
        f"distopt.benchmarks.time_to_accuracy: error: cannot append to {path}: {says}\n"
    )
    assert not runs


def test_time_to_accuracy_runs_as_a_file_is_one_line_before_any_run(
    tmp_path, monkeypatch, capsys
):
    # <output_dir>/runs a file: a FileExistsError traceback from makedirs.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    runs = []
    monkeypatch.setattr(tta, "run_once", lambda *a: runs.append(a) or _tta_run(0))
    (tmp_path / "runs").write_text("")
    flags = [*TTA_FLAGS, f"--output_dir={tmp_path}"]
    assert _main("time_to_accuracy", *flags) == 2
    assert capsys.readouterr().err == (
        "distopt.benchmarks.time_to_accuracy: error: cannot create the directory "
        f"{tmp_path / 'runs'}: File exists\n"
    )
    assert not runs and os.listdir(tmp_path) == ["runs"]  # No runs.jsonl.


@pytest.mark.parametrize("tune", [False, True])
def test_time_to_accuracy_unwritable_runs_is_one_line_before_any_run(
    tune, tmp_path, monkeypatch, capsys
):
    # An existing <output_dir>/runs that takes no new entry (another user's,
    # for a non-root one) was not probed: each run failed after its start.
    # Root may write in a 0o555 directory: its new entries are refused here.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    runs = []
    monkeypatch.setattr(tta, "run_once", lambda *a: runs.append(a) or _tta_run(0))
    workdir = tmp_path / "runs"
    workdir.mkdir()
    real_mkdir = os.mkdir

    def refused(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(workdir):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused)
    flags = ["--tune"] if tune else TTA_FLAGS
    assert _main("time_to_accuracy", *flags, f"--output_dir={tmp_path}") == 2
    assert capsys.readouterr().err == (
        "distopt.benchmarks.time_to_accuracy: error: cannot write in the "
        f"directory {workdir}: Permission denied\n"
    )
    assert not runs
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(workdir) == []


def test_time_to_accuracy_runs_on_a_read_only_mount_is_one_line(tmp_path):
    # The real case: root may write anywhere mounted writable, so a
    # read-only tmpfs on <output_dir>/runs, in a user and mount namespace.
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here: cannot mount a filesystem for the test")
    workdir = tmp_path / "runs"
    workdir.mkdir()
    code = (
        "import sys; from distopt.benchmarks import time_to_accuracy as t; "
        "t.run_once = lambda *a: sys.exit('a run started'); "
        f"sys.exit(t.main(['tta', '--output_dir={tmp_path}', *{TTA_FLAGS!r}]))"
    )
    script = (
        f"mount -t tmpfs -o size=1m,ro tmpfs {workdir} || exit 99; "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=conftest.REPO,
        timeout=60,
    )
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"user and mount namespaces unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        "distopt.benchmarks.time_to_accuracy: error: cannot write in the "
        f"directory {workdir}: Read-only file system\n"
    )
    assert os.listdir(tmp_path) == ["runs"] and os.listdir(workdir) == []


def test_time_to_accuracy_tune_failed_append_is_one_line(tmp_path, monkeypatch, capsys):
    # A full disk after a tuning run: an OSError traceback.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    real_open = open

    def full(file, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    def run_once(mode, workers, link, seed, *args):
        monkeypatch.setattr(tta, "open", full, raising=False)  # The disk fills.
        return _tta_run(seed)

    monkeypatch.setattr(tta, "run_once", run_once)
    flags = ["--tune", "--modes=every_step", f"--output_dir={tmp_path}"]
    assert _main("time_to_accuracy", *flags) == 1
    path = tmp_path / "runs" / "tune.jsonl"
    assert capsys.readouterr().err == (
        f"distopt.benchmarks.time_to_accuracy: error: could not write {path}: "
        "No space left on device\n"
    )


def test_time_to_accuracy_tune_keeps_its_results(tmp_path, monkeypatch, capsys):
    # The fewest steps win; a rerun reads tune.jsonl and runs nothing again.
    tta = importlib.import_module("distopt.benchmarks.time_to_accuracy")
    settings = []

    def run_once(mode, workers, link, seed, setting, workdir):
        settings.append(setting)
        return _tta_run(seed) | {"steps": round(setting[0] * 1e4)}

    monkeypatch.setattr(tta, "run_once", run_once)
    flags = ["--tune", "--modes=every_step", f"--output_dir={tmp_path}"]
    for _ in range(2):
        assert _main("time_to_accuracy", *flags) == 0
        out = capsys.readouterr().out
        chosen = json.loads(out[out.index("\n{") :])  # Printed last.
        assert chosen == {"every_step": [5e-4, None]}
    assert settings == tta.GRIDS["every_step"]
