"""One worker of a localhost MultiWorkerMirroredStrategy cluster, for tests.

Usage: python tests/mw_worker.py INDEX PORT0,PORT1 OUT_DIR [--die]

Runs every scenario of `SCENARIOS` on the cluster and writes each final
parameter copy to OUT_DIR/worker{INDEX}.npz, then the compression runs of
`COMPRESSION`, whose step-by-step records go to OUT_DIR/compressed{INDEX}.pkl. With --die, worker 1 exits just
before the first step, to show that a collective with a timeout fails
instead of hanging.
"""

import json
import os
import pickle
import sys

index, ports, out_dir = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    }
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import compression_harness
import numpy as np
import sharded_harness
import tensorflow as tf
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

from distopt import distribute

TIMEOUT_S = float(os.environ.get("DISTOPT_TEST_COLLECTIVE_TIMEOUT", "30"))
options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=TIMEOUT_S)
strategy = distribute.make_strategy("multi_worker", communication_options=options)
assert strategy.num_replicas_in_sync == len(ports)

if "--die" in sys.argv and index == 1:
    os._exit(3)

results = {}
for name, (_, _, weighted, uneven) in SCENARIOS.items():
    x, y, n = make_data(6, len(ports), uneven=uneven, seed=21)
    params, opt, _ = train(
        strategy,
        lambda name=name: optimizer(
            **optimizer_kwargs(name, communication_options=options)
        ),
        x,
        y,
        n,
        weighted=weighted,
        # Built in the first step, as for a user who never calls `build`:
        # the variables' creation then runs across the workers in a function.
        build=False,
    )
    opt.synchronize(params)
    for i, p in enumerate(params):
        results[f"{name}/{i}"] = np.asarray(strategy.experimental_local_results(p)[0])
    results[f"{name}/calls"] = np.asarray(opt.allreduce_calls.numpy())
    print(f"worker {index}: {name} done", flush=True)

# Mid-period save and resume (see SNAPSHOT); the copies differ across workers.
steps, split = SNAPSHOT["steps"], SNAPSHOT["split"]
x, y, n = make_data(steps, len(ports), seed=22)
make = lambda: optimizer(**snapshot_optimizer(communication_options=options))
head, opt, _ = train(strategy, make, x[:split], y[:split], n[:split])
opt.snapshot_replicas(head)
# Every worker saves (MultiWorkerMirroredStrategy needs all of them to); each
# to its own directory, as non-chief workers do.
ckpt_dir = os.path.join(out_dir, f"ckpt{index}")
path = tf.train.Checkpoint(params=head, optimizer=opt).save(os.path.join(ckpt_dir, "c"))
with strategy.scope():
    params = [tf.Variable(tf.zeros_like(p)) for p in head]
    fresh = make()
    fresh.build(params)
tf.train.Checkpoint(params=params, optimizer=fresh).restore(path).assert_consumed()
fresh.restore_replicas(params)
params, fresh, _ = train(
    strategy, None, x[split:], y[split:], n[split:], state=(params, fresh)
)
for i, p in enumerate(params):
    results[f"snapshot/{i}"] = np.asarray(strategy.experimental_local_results(p)[0])
print(f"worker {index}: snapshot resume done", flush=True)

# Sharded optimizer state: every optimizer, sharded, 20 steps (checked in
# sharded_harness.check_two_workers).
results.update(
    sharded_harness.table_results(
        strategy, os.path.join(out_dir, f"shard_ckpt{index}", "c")
    )
)
print(f"worker {index}: shard_table done", flush=True)
np.savez(os.path.join(out_dir, f"worker{index}.npz"), **results)

# Compression: this worker's records of every step (see mw_scenarios).
compressed = {}
for name, compressor in COMPRESSION.items():
    grads = compression_harness.gradients(
        COMPRESSION_STEPS, len(ports), seed=COMPRESSION_SEED
    )
    params, opt = compression_harness.setup(
        strategy,
        lambda compressor=compressor: compression_harness.make_optimizer(
            compressor, communication_options=options
        ),
    )
    q0 = compression_harness.snapshot(strategy, opt, params)["q"]
    _, _, _, records = compression_harness.run(strategy, opt, grads, params=params)
    compressed[name] = {"q0": q0, "records": records}
    print(f"worker {index}: {name} done", flush=True)
with open(os.path.join(out_dir, f"compressed{index}.pkl"), "wb") as f:
    pickle.dump(compressed, f)
