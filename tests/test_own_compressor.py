"""A researcher's own compressor: the README's `RandomK` against NumPy, and
what `Compressor` holds every subclass to.

A probe (12-07) wrote compressors from the docstrings: a DiLoCo copy and a
loaded model took the built-in of the same name, a NaN left unsent stayed
in a residual for good, and a slip in `exchange` (one aggregate too few, no
collective) trained wrong in silence. Each is checked here.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, assert_replicas_identical, local_copies, mirrored

import distopt
import distopt.keras
from distopt import compression, distribute, optimizers

LR = 0.1
SHAPES = [(4, 3), (5,), (2, 2)]


def _readme_compressor():
    """The README's `RandomK`, run from its text (and registered by it)."""
    with open(f"{REPO}/README.md") as f:
        text = f.read()
    start = text.index("@distopt.compression.register")
    code = text[start : text.index("```", start)]
    namespace = {
        "__name__": "readme",
        "math": math,
        "tf": tf,
        "distopt": distopt,
        "distribute": distribute,
    }
    exec(code, namespace)  # noqa: S102 (the README's own text)
    assert isinstance(namespace["opt"].compression, namespace["RandomK"])
    return namespace["RandomK"]


RandomK = _readme_compressor()


def _grads(num_replicas, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=(num_replicas, *s)).astype(np.float32) for s in SHAPES]
        for _ in range(steps)
    ]


def _w0():
    rng = np.random.default_rng(1)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _train(strategy, make_optimizer, grads):
    """Plain steps, replica r's gradient `grads[t][i][r]`; returns (params, opt)."""
    with strategy.scope():
        params = [tf.Variable(w) for w in _w0()]
        opt = make_optimizer()
        opt.build(params)

    @tf.function
    def step(gs):
        def replica(gs):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            opt.apply_gradients([tf.gather(g, r) for g in gs], params)

        strategy.run(replica, (gs,))

    for gs in grads:
        step([tf.constant(g) for g in gs])
    return params, opt


def _picked(seed, i, t, d, fraction):
    """The entries RandomK sends: TensorFlow's seeded RNG, as the class draws."""
    keys = tf.random.stateless_uniform([d], seed=tf.constant([seed + i, t], tf.int64))
    k = max(1, math.ceil(fraction * d))
    return tf.math.top_k(keys, k).indices.numpy()


def _reference(grads, fraction, seed, num_replicas):
    """Error-feedback random-k, mean aggregation, plain GD, in NumPy."""
    w = [np.float64(x) for x in _w0()]
    e = [np.zeros((num_replicas, x.size)) for x in w]
    for t, gs in enumerate(grads):
        for i, g in enumerate(gs):
            x = np.float64(g).reshape(num_replicas, -1) / num_replicas + e[i]
            sent = np.zeros_like(x)
            idx = _picked(seed, i, t, x.shape[1], fraction)
            sent[:, idx] = x[:, idx]
            e[i] = x - sent
            w[i] = w[i] - LR * sent.sum(axis=0).reshape(w[i].shape)
    return w


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_the_readmes_random_k_equals_its_numpy_reference(num_replicas):
    strategy = mirrored(num_replicas)
    grads = _grads(num_replicas, 4)
    make = lambda: optimizers.GradientDescent(LR, compression=RandomK(0.3, seed=5))
    params, opt = _train(strategy, make, grads)
    assert_replicas_identical(strategy, params)
    w0 = _w0()
    for p, w, start in zip(params, _reference(grads, 0.3, 5, num_replicas), w0):
        np.testing.assert_allclose(
            local_copies(strategy, p)[0] - start, w - start, rtol=1e-5, atol=1e-6
        )
    sent = sum(4 * math.ceil(0.3 * math.prod(s)) for s in SHAPES)
    assert opt.reducer.counters()["bytes_sent"] == 4 * sent


def test_all_entries_sent_is_uncompressed_training():
    strategy = mirrored(2)
    grads = _grads(2, 3)
    compressed, _ = _train(
        strategy,
        lambda: optimizers.GradientDescent(LR, compression=RandomK(1.0)),
        grads,
    )
    plain, _ = _train(strategy, lambda: optimizers.GradientDescent(LR), grads)
    for c, p in zip(compressed, plain):
        np.testing.assert_allclose(
            local_copies(strategy, c)[0], local_copies(strategy, p)[0], atol=1e-6
        )


def test_sharded_state_equals_unsharded_with_it():
    strategy = mirrored(2)
    grads = _grads(2, 3)
    runs = [
        _train(
            strategy,
            lambda s=s: optimizers.Adam(
                LR, compression=RandomK(0.3, seed=2), shard_state=s
            ),
            grads,
        )[0]
        for s in (False, True)
    ]
    for a, b in zip(*runs):
        np.testing.assert_allclose(
            local_copies(strategy, a)[0], local_copies(strategy, b)[0], atol=1e-6
        )


def test_a_nan_left_unsent_skips_the_step_and_no_residual_keeps_it():
    strategy = mirrored(2)
    grads = _grads(2, 3)
    unsent = min(set(range(12)) - set(_picked(0, 0, 1, 12, 0.25)))
    grads[1][0][0].reshape(-1)[unsent] = np.nan  # replica 0, step 1
    params, opt = _train(
        strategy,
        lambda: optimizers.GradientDescent(
            LR, compression=RandomK(0.25), skip_nonfinite=True
        ),
        grads,
    )
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 2
    for residual in opt.compression.residuals.values():
        for copy in local_copies(strategy, residual.storage):
            assert np.isfinite(copy).all()
    for p in params:
        assert np.isfinite(local_copies(strategy, p)).all()


class QuietTopK(compression.TopK):
    """Unregistered, and named "topk" as the built-in it extends."""


def test_diloco_compresses_its_outer_gradient_with_the_users_class():
    strategy = mirrored(2)
    with strategy.scope():
        params = [tf.Variable(w) for w in _w0()]
        opt = optimizers.GradientDescent(
            LR,
            compression=QuietTopK(0.5),
            sync=distopt.sync.DiLoCo(
                2, outer_optimizer=optimizers.GradientDescent(1.0)
            ),
        )
        opt.build(params)
    outer = opt.sync.outer_compression
    assert type(outer) is QuietTopK and outer is not opt.compression
    assert outer.get_config() == opt.compression.get_config()


class DampedTopK(compression.TopK):
    """A subclass of a built-in: inherits `name = "topk"` unless it sets one."""

    name = "damped_topk"

    def __init__(self, fraction=0.01, damping=0.5, **kwargs):
        super().__init__(fraction, **kwargs)
        self.damping = damping

    def get_config(self):
        return {**super().get_config(), "damping": self.damping}


def test_a_spec_loads_as_the_users_class_registered_or_given():
    spec = optimizers.Adam(1e-3, compression=DampedTopK(0.1, damping=0.25)).spec()
    assert spec["config"]["compression"]["class"] == "DampedTopK"
    with pytest.raises(
        ValueError, match=r"distopt\.compression\.register\(DampedTopK\)"
    ):
        optimizers.from_config(spec)
    loaded = compression.from_config(
        spec["config"]["compression"], classes=[DampedTopK]
    )
    assert type(loaded) is DampedTopK and loaded.damping == 0.25
    assert type(optimizers.from_config(_random_k_spec()).compression) is RandomK


def _random_k_spec():
    return optimizers.Adam(1e-3, compression=RandomK(0.2, seed=4)).spec()


def test_register_refuses_a_built_ins_name_and_what_is_not_a_compressor():
    class Unnamed(compression.TopK):
        pass

    with pytest.raises(ValueError, match=r"Unnamed\.name to a name of its own"):
        compression.register(Unnamed)
    with pytest.raises(ValueError, match="not a Compressor subclass"):
        compression.register(int)
    assert (
        compression.get("topk") is not None
        and type(compression.get("topk")) is compression.TopK
    )


def test_get_by_registered_name_passes_the_bases_arguments():
    made = compression.get("random_k", fraction=0.2, error_feedback=False)
    assert type(made) is RandomK and made.fraction == 0.2 and not made.error_feedback
    with pytest.raises(ValueError, match="bogus: not an argument of 'random_k'"):
        compression.get("random_k", bogus=1)


def test_a_config_without_an_init_argument_is_refused_at_the_spec():
    class Forgetful(RandomK):
        name = "forgetful"

        def __init__(self, fraction=0.1, scale=2.0, **kwargs):
            super().__init__(fraction, **kwargs)
            self.scale = scale

    opt = optimizers.Adam(1e-3, compression=Forgetful(scale=3.0))
    with pytest.raises(
        NotImplementedError, match="Forgetful.get_config: lacks 'scale'"
    ):
        opt.spec()


def test_keras_load_model_keeps_the_users_compressor(tmp_path):
    strategy = mirrored(2)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(
            optimizer=distopt.keras.wrap(
                optimizers.Adam(1e-3, compression=DampedTopK(0.5, damping=0.25))
            ),
            loss="mse",
        )
    x = np.ones((8, 3), np.float32)
    model.fit(x, np.zeros((8, 2), np.float32), batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(
            path, custom_objects={"DampedTopK": DampedTopK}
        )
    inner = loaded.optimizer.distopt_optimizer.compression
    assert type(inner) is DampedTopK and inner.damping == 0.25


# --- The contract of `exchange`, held -------------------------------------------


class _Broken(RandomK):
    name = "broken"
    slip = None

    def exchange(self, reducer, strategy, xs, indices):
        if self.slip == "no_collective":  # each replica its own "aggregate"
            return list(xs), list(xs), []
        agg, own, extra = super().exchange(reducer, strategy, xs, indices)
        if self.slip == "one_aggregate_too_few":
            agg = agg[:-1]
        elif self.slip == "own_part_none":
            own = [None, *own[1:]]
        elif self.slip == "own_part_flattened":
            own = [
                distribute.map_per_replica(
                    strategy, lambda x: tf.reshape(x, [-1]), own[0]
                ),
                *own[1:],
            ]
        elif self.slip == "not_a_triple":
            return agg, own
        return agg, own, extra


@pytest.mark.parametrize(
    "slip,message",
    [
        ("one_aggregate_too_few", "returned 2 aggregate values, not 3"),
        ("own_part_none", r"local\[0\] is None"),
        ("own_part_flattened", r"local\[0\]: float32 of shape \(12,\)"),
        ("no_collective", "made no collective through the reducer"),
        ("not_a_triple", r"must return \(aggregate, local, extra\)"),
    ],
)
def test_a_slip_in_exchange_is_named_when_the_step_is_traced(slip, message):
    def make():
        broken = _Broken(0.5)
        broken.slip = slip
        return optimizers.GradientDescent(LR, compression=broken)

    with pytest.raises(ValueError, match=message):
        _train(mirrored(2), make, _grads(2, 1))
