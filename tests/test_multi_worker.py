"""Two localhost worker processes against MirroredStrategy with 2 replicas.

MultiWorkerMirroredStrategy on a CPU-only host uses one device per worker,
so 2 workers give 2 replicas, compared with MirroredStrategy on 2 virtual
CPUs running the same program (tests/mw_scenarios.py).
"""

import os
import pickle
import subprocess

import compression_harness
import numpy as np
import pytest
import sharded_harness
import tensorflow as tf
from conftest import mirrored, python_env, start_python
from mw_scenarios import (
    COMPRESSION,
    COMPRESSION_SEED,
    COMPRESSION_STEPS,
    SCENARIOS,
    SNAPSHOT,
    optimizer_kwargs,
    snapshot_optimizer,
)
from sync_harness import make_data, optimizer, train

from distopt import cluster

HERE = os.path.dirname(__file__)


def start_workers(out_dir, *extra, env=None):
    ports = ",".join(map(str, cluster.free_ports(2)))
    # Forked from the fork server (TensorFlow imported once; see
    # forkserver.py): each worker is still its own process and runtime.
    return [
        start_python(
            [os.path.join(HERE, "mw_worker.py"), str(i), ports, str(out_dir), *extra],
            stdout=subprocess.PIPE,
            env=python_env(**(env or {})),
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def dead_peer_workers(tmp_path_factory):
    """A pair whose worker 1 dies before the first step, started early.

    Worker 0 then mostly waits out the collective timeout; started before the
    other pair, that wait overlaps its work instead of adding to the suite.
    """
    return start_workers(
        tmp_path_factory.mktemp("dead_peer"),
        "--die",
        env={"DISTOPT_TEST_COLLECTIVE_TIMEOUT": "5"},
    )


@pytest.mark.slow
def test_two_workers_match_mirrored(tmp_path, dead_peer_workers):
    procs = start_workers(tmp_path)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    w0, w1 = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    strategy = mirrored(2)
    for name, (_, _, weighted, uneven) in SCENARIOS.items():
        x, y, n = make_data(6, 2, uneven=uneven, seed=21)
        params, opt, _ = train(
            strategy,
            lambda name=name: optimizer(**optimizer_kwargs(name, mirrored=True)),
            x,
            y,
            n,
            weighted=weighted,
        )
        opt.synchronize(params)
        for i, p in enumerate(params):
            ref = np.asarray(strategy.experimental_local_results(p)[0])
            np.testing.assert_array_equal(
                w0[f"{name}/{i}"], w1[f"{name}/{i}"], err_msg=name
            )
            np.testing.assert_allclose(
                w0[f"{name}/{i}"], ref, rtol=1e-5, atol=1e-6, err_msg=name
            )
        assert int(w0[f"{name}/calls"]) == int(opt.allreduce_calls.numpy()), name

    # Mid-period snapshot save and resume: worker i's copy is replica i's.
    x, y, n = make_data(SNAPSHOT["steps"], 2, seed=22)
    params, _, _ = train(strategy, lambda: optimizer(**snapshot_optimizer()), x, y, n)
    for i, p in enumerate(params):
        copies = strategy.experimental_local_results(p)
        assert not np.array_equal(copies[0], copies[1])  # diverged by design
        for w, copy in zip((w0, w1), copies):
            np.testing.assert_allclose(
                w[f"snapshot/{i}"], np.asarray(copy), rtol=1e-5, atol=1e-6
            )

    # Compression, worker by worker against the NumPy reference: worker i
    # holds replica i's residual row and payload.
    runs = []
    for i in range(2):
        with open(tmp_path / f"compressed{i}.pkl", "rb") as f:
            runs.append(pickle.load(f))
    grads = compression_harness.gradients(COMPRESSION_STEPS, 2, seed=COMPRESSION_SEED)
    shares = compression_harness.shares_of(grads)
    for name, compressor in COMPRESSION.items():
        records = [r[name]["records"] for r in runs]
        rows = [
            [
                None if a is None else np.concatenate([a, b])
                for a, b in zip(r0["residual"], r1["residual"])
            ]
            for r0, r1 in zip(*records)
        ]
        for r0, r1 in zip(*records):
            for a, b in zip(r0["params"], r1["params"]):
                np.testing.assert_array_equal(a, b, err_msg=name)
        for i in range(2):
            compression_harness.check_run(
                compressor,
                records[i],
                shares,
                compression_harness.initial_params(),
                0.1,
                [i],
                runs[i][name]["q0"],
                rows=rows,
            )

    # Sharded optimizer state, every optimizer: equal on both workers at
    # every step, to the unsharded update and to the NumPy reference; the
    # checkpoint of worker 0 restores unsharded on one device.
    sharded_harness.check_two_workers(
        w0, w1, tf.train.latest_checkpoint(str(tmp_path / "shard_ckpt0"))
    )


@pytest.mark.slow
def test_dead_peer_fails_within_the_collective_timeout(dead_peer_workers):
    procs = dead_peer_workers
    # Without the timeout worker 0 would wait forever: communicate() would
    # raise TimeoutExpired.
    out0 = procs[0].communicate(timeout=240)[0]
    procs[1].wait(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0, out0[-2000:]
    assert any(
        s in out0 for s in ("DeadlineExceeded", "Unavailable", "timed out", "deadline")
    ), out0[-2000:]
