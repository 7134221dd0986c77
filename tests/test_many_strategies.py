"""distopt's eager paths in a process where another strategy ran collectives first.

TensorFlow gives every strategy the same collective keys (tensorflow#61314,
#62790): after Keras `fit` (or an eager all-reduce) on a MirroredStrategy with
its default cross-device ops, a later strategy's eager collective fails with
"Shape mismatch in the collective instance 100". Notebooks, sweeps and test
suites create several strategies in one process. The scenarios run in
tests/strategies_worker.py, in one fresh process (this test process must not
be left in that state); each result is compared here with NumPy.
"""

import json

import numpy as np
import pytest
import sharded_harness
import tensorflow as tf
from conftest import mirrored, run_python
from strategies_worker import LR, X, Y

from distopt import distribute as dist
from distopt import hardware_check as hc


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies") / "results.json"
    proc = run_python("tests/strategies_worker.py", str(out), timeout=600, forked=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _ok(result):
    assert "error" not in result, result["error"] if isinstance(result, dict) else ""
    return result


def _softmax_ce(kernel, bias, x, y):
    logits = x.astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def test_sync_callback_evaluates_the_average_after_fit(results):
    r = _ok(results["sync_callback"])
    before = [[np.asarray(c, np.float64) for c in w] for w in r["before"]]
    kernel, bias = before  # each: [replica 0's copy, replica 1's copy]
    assert np.max(np.abs(kernel[0] - kernel[1])) > 1e-4  # mid-period: they differ
    average = [np.mean(w, axis=0) for w in before]
    np.testing.assert_allclose(r["loss"], _softmax_ce(*average, X, Y), rtol=1e-5)
    assert abs(r["loss"] - _softmax_ce(kernel[0], bias[0], X, Y)) > 1e-5
    # Every replica has its own weights back, bit for bit.
    assert r["after"] == r["before"]


def test_sync_callback_does_not_use_the_strategy_eagerly(results):
    """No "Using MirroredStrategy eagerly has significant overhead" at evaluation.

    TensorFlow prints it for the first 5 eager `strategy.run` calls of a
    process; the worker makes none before this scenario, which evaluates twice.
    """
    for name in ("callback_warning", "sync_callback"):
        warned = _ok(results[name])["warnings"]
        assert [w for w in warned if "eagerly" in w] == [], name


def test_snapshot_replicas_after_local_steps(results):
    r = _ok(results["snapshot"])
    # Two local steps of gradient descent; replica r's gradient is r + 1.
    own = [np.full(3, -LR * 2 * (rep + 1)) for rep in range(2)]
    np.testing.assert_allclose(r["own"], own, rtol=1e-6)
    assert r["snapshot_step"] == 2
    # Every replica holds every replica's row, exactly.
    assert r["rows"] == [r["own"], r["own"]]


def test_restore_replicas_on_the_same_and_a_changed_replica_count(results):
    r = _ok(results["restore"])
    own = np.asarray(r["own"], np.float32)
    np.testing.assert_allclose(own[:, 0], [-0.2, -0.4, -0.6], rtol=1e-6)
    assert _ok(r["same"]) == r["own"]
    two = np.asarray(_ok(r["two"]), np.float32)
    np.testing.assert_array_equal(two[0], two[1])
    np.testing.assert_allclose(two[0], own.astype(np.float64).mean(0), rtol=1e-6)


def test_hardware_checks_pass_after_another_strategy(results):
    rows = _ok(results["hardware_checks"])
    assert [row["key"] for row in rows] == [
        k for k in hc.CHECK_KEYS if k != "tpu_rejects_periodic"
    ]
    assert [row for row in rows if not row["passed"]] == []


def test_sharded_state_used_eagerly_after_another_strategy(results):
    """Build, steps, slots read whole, save and restore, finalize."""
    sharded_harness.check_eager_scenario(_ok(results["sharded"]))


def test_only_eager_reductions_on_one_host_leave_the_strategy_ops():
    """The step (a tf.function) keeps the strategy's own collectives (NCCL)."""
    strategy = mirrored(2)
    assert isinstance(dist._keyless_ops(strategy), tf.distribute.ReductionToOneDevice)

    @tf.function
    def traced():
        return tf.constant(dist._keyless_ops(strategy) is None)

    assert bool(traced())
