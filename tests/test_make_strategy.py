"""distribute.make_strategy: the one way distopt makes a strategy.

The collective-key test runs in a new process (forked before any TensorFlow
runtime exists, see forkserver.py): the collective executor of a process
remembers every (group, instance) key it ran, so the test needs a process in
which nothing else ran a collective before.
"""

import textwrap

import pytest
import tensorflow as tf
from conftest import NUM_DEVICES, run_python

from distopt import distribute

# Two strategies over the same two logical CPUs, each running one eager batch
# reduction of another shape, as distopt's eager paths (snapshots) do.
_SCRIPT = textwrap.dedent(
    """
    import sys
    from distopt import quiet
    quiet.import_tensorflow()
    import tensorflow as tf
    from distopt import distribute

    devices = distribute.logical_cpu_devices(2)

    def reduce(strategy, n):
        value = strategy.run(lambda: tf.ones([n]))
        (out,) = strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.SUM, [(value, value)]
        )
        return strategy.experimental_local_results(out)[0].numpy().tolist()

    # The user's strategy first, with TensorFlow's keys.
    print("first", reduce(tf.distribute.MirroredStrategy(devices), 3))
    if sys.argv[1] == "plain":
        second = tf.distribute.MirroredStrategy(devices)
    else:
        second = distribute.make_strategy(
            "mirrored", devices=devices, cross_device_ops="default"
        )
    try:
        print("second", reduce(second, 5))
    except tf.errors.InvalidArgumentError as e:
        print("failed", " ".join(str(e).split())[:300])
    """
)


def test_each_made_strategy_has_its_own_collective_keys():
    """Fails if TensorFlow stops reading ``_collective_key_base`` per strategy.

    The "plain" run shows the collision the helper avoids (TensorFlow gives
    every MirroredStrategy the same keys); should TensorFlow fix that, the
    first assertion fails and the wrapper in distribute.py can go.
    """
    plain = run_python("-c", _SCRIPT, "plain", timeout=180, forked=True)
    assert "first [2.0, 2.0, 2.0]" in plain.stdout, plain.stderr[-2000:]
    assert "Shape mismatch in the collective instance 100" in plain.stdout, (
        "TensorFlow no longer reuses collective keys across strategies: " + plain.stdout
    )
    made = run_python("-c", _SCRIPT, "helper", timeout=180, forked=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "second [2.0, 2.0, 2.0, 2.0, 2.0]" in made.stdout, made.stdout


def test_strategies_made_here_get_distinct_collective_key_bases():
    a = distribute.make_strategy("mirrored", num_cpu_devices=2)
    b = distribute.make_strategy("mirrored", num_cpu_devices=2)
    bases = {a._collective_key_base, b._collective_key_base}
    assert len(bases) == 2 and 0 not in bases
    # Strategies made elsewhere keep TensorFlow's start.
    assert tf.distribute.MirroredStrategy(["/cpu:0"])._collective_key_base == 0


def test_kinds_devices_and_cross_device_ops():
    assert distribute.make_strategy("default") is tf.distribute.get_strategy()
    one = distribute.make_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    two = distribute.make_strategy("mirrored", num_cpu_devices=2)
    assert two.num_replicas_in_sync == 2
    assert [d.rsplit(":", 1)[1] for d in two.extended.worker_devices] == ["0", "1"]
    ring = distribute.make_strategy(
        "mirrored", devices=["/cpu:2", "/cpu:3"], cross_device_ops="default"
    )
    assert ring.extended.worker_devices[0].endswith("CPU:2")
    for strategy in (two, ring):
        ones = strategy.run(lambda: tf.ones([2]))
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)
        assert total.numpy().tolist() == [2.0, 2.0]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="kind: unknown 'horovod'"):
        distribute.make_strategy("horovod")
    with pytest.raises(ValueError, match="cross_device_ops: unknown 'nccl'"):
        distribute.make_strategy("mirrored", cross_device_ops="nccl")
    with pytest.raises(ValueError, match="tpu: kind='tpu' needs"):
        distribute.make_strategy("tpu")
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        distribute.logical_cpu_devices(0)
    # conftest.py made NUM_DEVICES logical CPUs; it is too late for more.
    with pytest.raises(ValueError, match=f"already initialised {NUM_DEVICES}") as e:
        distribute.logical_cpu_devices(NUM_DEVICES + 1)
    # What to call instead, for a notebook's sweep over device counts.
    assert "distopt.distribute.logical_cpu_devices(N) first" in str(e.value)
    assert len(distribute.logical_cpu_devices(NUM_DEVICES)) == NUM_DEVICES
