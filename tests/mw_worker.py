"""One worker of a localhost MultiWorkerMirroredStrategy cluster, for tests.

Usage: python tests/mw_worker.py INDEX PORT0,PORT1 OUT_DIR [--die]

Runs every scenario of `SCENARIOS` on the cluster and writes each final
parameter copy to OUT_DIR/worker{INDEX}.npz. With --die, worker 1 exits just
before the first step, to show that a collective with a timeout fails
instead of hanging.
"""

import json
import os
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from sync_harness import make_data, optimizer, train  # noqa: E402
from mw_scenarios import SCENARIOS, optimizer_kwargs  # noqa: E402

TIMEOUT_S = float(os.environ.get("DISTOPT_TEST_COLLECTIVE_TIMEOUT", "30"))
options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=TIMEOUT_S)
strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
assert strategy.num_replicas_in_sync == len(ports)

if "--die" in sys.argv and index == 1:
    os._exit(3)

results = {}
for name, (_, _, weighted, uneven) in SCENARIOS.items():
    x, y, n = make_data(6, len(ports), uneven=uneven, seed=21)
    params, opt, _ = train(
        strategy,
        lambda: optimizer(**optimizer_kwargs(name, communication_options=options)),
        x,
        y,
        n,
        weighted=weighted,
    )
    opt.synchronize(params)
    for i, p in enumerate(params):
        results[f"{name}/{i}"] = np.asarray(strategy.experimental_local_results(p)[0])
    results[f"{name}/calls"] = np.asarray(opt.allreduce_calls.numpy())
    print(f"worker {index}: {name} done", flush=True)
np.savez(os.path.join(out_dir, f"worker{index}.npz"), **results)
