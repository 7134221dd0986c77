"""A researcher's own update rule: what its flags promise is checked at build.

The fused update runs an element-wise or layer-wise rule on variables end
to end, and the sharded update on a slice of them; a rule that breaks the
promise gave wrong numbers on some paths only (found by a probe, 12-07).
Each refusal here is paired with the same rule, honestly flagged, against
its NumPy reference, so the check does not refuse what works.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, assert_replicas_identical, local_copies, mirrored

import distopt
import distopt.keras
from distopt import optimizers

LR = 0.1
SHAPES = [(4, 3), (5,), (2, 2)]
STEPS = 3


class Normalized(optimizers.Optimizer):
    """`p <- p - lr * g / ||g||` (one norm over each variable)."""

    def update_step(self, grad, var, slots, lr, step):
        return var - lr * grad / tf.norm(grad), {}


class NormalizedHonest(Normalized):
    elementwise = False


class Factored(optimizers.Optimizer):
    """Adafactor-like: a row and a column second moment of a 2-D variable."""

    elementwise = True

    def slot_initializers(self, var):
        return {"vr": tf.zeros(var.shape[:1]), "vc": tf.zeros(var.shape[-1:])}

    def update_step(self, grad, var, slots, lr, step):
        sq = tf.square(grad)
        vr = 0.5 * slots["vr"] + 0.5 * tf.reduce_mean(sq, axis=-1)
        vc = 0.5 * slots["vc"] + 0.5 * tf.reduce_mean(sq, axis=0)
        v = vr[:, None] * vc[None, :] / tf.reduce_mean(vr)
        return var - lr * grad / tf.sqrt(v + 1e-8), {"vr": vr, "vc": vc}


class FactoredHonest(Factored):
    elementwise = False


class NestedTrust(optimizers.Optimizer):
    """`m <- 0.9 m + g / ||g||; p <- p - lr (||p|| / ||m||) m`: the third
    norm's argument depends on the first's."""

    elementwise, layerwise = False, True

    def slot_initializers(self, var):
        return {"m": tf.zeros(var.shape)}

    def update_step(self, grad, var, slots, lr, step, norm):
        m = 0.9 * slots["m"] + grad / norm(grad)
        return var - lr * norm(var) / norm(m) * m, {"m": m}


class Trust(optimizers.Optimizer):
    """`m <- 0.9 m + g; p <- p - lr (||p|| / ||m||) m`: independent norms."""

    elementwise, layerwise = False, True

    def slot_initializers(self, var):
        return {"m": tf.zeros(var.shape)}

    def update_step(self, grad, var, slots, lr, step, norm):
        m = 0.9 * slots["m"] + grad
        return var - lr * norm(var) / norm(m) * m, {"m": m}


def _l2(x):
    return np.sqrt(np.sum(np.square(x, dtype=np.float64)))


def _reference(name, w, grads):
    """The rule of class `name` on one variable, float64."""
    w, state = np.float64(w), {}
    for g in map(np.float64, grads):
        if name.startswith("Normalized"):
            w = w - LR * g / _l2(g)
        elif name.startswith("Factored"):
            sq = g * g
            vr = 0.5 * state.get("vr", 0) + 0.5 * sq.mean(-1)
            vc = 0.5 * state.get("vc", 0) + 0.5 * sq.mean(0)
            state = {"vr": vr, "vc": vc}
            w = w - LR * g / np.sqrt(np.outer(vr, vc) / vr.mean() + 1e-8)
        else:
            m = 0.9 * state.get("m", 0) + (g / _l2(g) if name == "NestedTrust" else g)
            state = {"m": m}
            w = w - LR * _l2(w) / _l2(m) * m
    return w


def _problem(shapes, seed=5):
    rng = np.random.default_rng(seed)
    w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [
        [rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(STEPS)
    ]
    return w0, grads


def _train(strategy, cls, shapes, **kwargs):
    """`cls` trained on `_problem(shapes)` in a tf.function under `strategy`
    (every replica the same gradient); the variables and the initial values."""
    w0, grads = _problem(shapes)
    with strategy.scope():
        params = [tf.Variable(w) for w in w0]
        opt = cls(learning_rate=LR, **kwargs)
        opt.build(params)
    step = tf.function(
        lambda g: strategy.run(lambda: opt.apply_gradients(list(zip(g, params))))
    )
    for gs in grads:
        step([tf.constant(g) for g in gs])
    return params, w0, grads


def _check(strategy, cls, params, w0, grads):
    assert_replicas_identical(strategy, params)
    for i, p in enumerate(params):
        want = _reference(cls.__name__, w0[i], [g[i] for g in grads]) - w0[i]
        np.testing.assert_allclose(
            local_copies(strategy, p)[0] - w0[i], want, rtol=2e-5, atol=1e-6
        )


def test_a_rule_that_reduces_over_its_variable_must_not_say_elementwise():
    """A norm inside an 'element-wise' rule took the norm over every small
    variable at once in the fused update (0.78 off), and was right unfused."""
    with pytest.raises(ValueError) as e:
        _train(tf.distribute.get_strategy(), Normalized, SHAPES)
    assert str(e.value).startswith(
        "Normalized: update_step mixes elements (Sum) but the class sets "
        "elementwise=True, layerwise=False"
    )
    for kwargs in [{}, {"fused": False}, {"jit_compile": False}]:
        strategy = tf.distribute.get_strategy()
        _check(
            strategy,
            NormalizedHonest,
            *_train(strategy, NormalizedHonest, SHAPES, **kwargs),
        )


def test_slots_shaped_otherwise_need_a_rule_that_is_not_elementwise():
    """A factored slot under an 'element-wise' rule failed with a broadcast
    error on some sizes, or was cut short; unflagged, the rule runs per
    variable and matches its reference (fused or not)."""
    shapes = [(4, 3), (5, 2)]
    with pytest.raises(ValueError) as e:
        _train(tf.distribute.get_strategy(), Factored, shapes)
    assert str(e.value).startswith(
        "Factored.slot_initializers: slot 'vr' of variable 'Variable:0' has shape "
        "(4,), the variable (4, 3); an element-wise or layer-wise rule needs slots "
        "shaped like their variable"
    )
    for kwargs in [{}, {"fused": False}]:
        strategy = mirrored(2)
        _check(
            strategy,
            FactoredHonest,
            *_train(strategy, FactoredHonest, shapes, **kwargs),
        )


def test_shard_state_needs_an_elementwise_or_layerwise_rule():
    """Sharded, the rule ran on a slice of the variables end to end: an
    inf-norm or a factored rule was silently wrong, or failed obscurely."""
    for cls in (NormalizedHonest, FactoredHonest):
        with pytest.raises(ValueError) as e:
            cls(LR, shard_state=True)
        assert str(e.value) == (
            "shard_state: needs an element-wise or layer-wise update rule; "
            f"{cls.__name__} sets elementwise=False and layerwise=False (its "
            "update_step reduces over each variable)."
        )


def test_shard_state_checks_the_flags_again_at_build():
    """Flags set on the instance after construction ran a reducing rule on
    shards (0.74 off, a probe); `build` refuses it before making anything."""
    opt = Normalized(LR, shard_state=True)
    opt.elementwise = False
    strategy = mirrored(2)
    with strategy.scope():
        params = [tf.Variable(tf.ones(s)) for s in SHAPES]
    before = len(opt.variables)
    with (
        pytest.raises(ValueError, match="shard_state: needs an element-wise"),
        strategy.scope(),
    ):
        opt.build(params)
    assert len(opt.variables) == before  # no slot, no shard was made


def test_shard_state_refuses_a_norm_of_a_norm_and_frees_the_compressor():
    """Sharded, every norm comes from one pass over the shard, with ones for
    the norms: a norm of a value made with another norm was 0.63 off.
    Unsharded the fused update takes each norm in turn and is right; a rule
    with independent norms is right sharded. The refusal claims nothing: the
    compressor then serves the next optimizer."""
    strategy = mirrored(2)
    compressor = distopt.compression.TopK(0.5)
    with pytest.raises(ValueError) as e:
        _train(strategy, NestedTrust, SHAPES, shard_state=True, compression=compressor)
    assert str(e.value) == (
        "shard_state: NestedTrust.update_step takes norm() of a value that "
        "depends on an earlier norm() (call 3); the sharded update takes every "
        "norm from one pass over the shard. Use shard_state=False."
    )
    _train(strategy, NestedTrust, SHAPES, compression=compressor)
    _check(strategy, NestedTrust, *_train(strategy, NestedTrust, SHAPES))
    _check(strategy, Trust, *_train(strategy, Trust, SHAPES, shard_state=True))


def _readme_rule():
    """The README's `SignMomentum`, run from its text."""
    with open(f"{REPO}/README.md") as f:
        text = f.read()
    start = text.index("class SignMomentum(")
    code = text[start : text.index("```", start)]
    namespace = {"tf": tf, "distopt": distopt}
    exec(code, namespace)  # noqa: S102 (the README's own text)
    assert namespace["opt"].shard_state
    return namespace["SignMomentum"]


def test_the_readmes_rule_trains_sharded_as_its_reference():
    cls = _readme_rule()
    strategy = mirrored(2)
    params, w0, grads = _train(strategy, cls, SHAPES, shard_state=True)
    assert_replicas_identical(strategy, params)
    for i, p in enumerate(params):
        w, m = np.float64(w0[i]), 0.0
        for g in grads:
            m = 0.9 * m + 0.1 * np.float64(g[i])
            w = w - LR * np.sign(m)
        np.testing.assert_allclose(
            local_copies(strategy, p)[0] - w0[i], w - w0[i], rtol=1e-6, atol=1e-6
        )


class FirstStepDouble(optimizers.Optimizer):
    """`p <- p - 2 lr g` at the first step, `p - lr g` after: Python control
    flow on a tensor, which runs eagerly only."""

    def update_step(self, grad, var, slots, lr, step):
        if step > 1:
            return var - lr * grad, {}
        return var - 2 * lr * grad, {}


def test_a_rule_the_check_cannot_trace_is_left_to_run_where_it_can():
    v = tf.Variable([1.0, 2.0])
    opt = FirstStepDouble(LR, jit_compile=False)
    for _ in range(2):
        opt.apply_gradients([tf.constant([1.0, 1.0])], [v])
    np.testing.assert_allclose(v.numpy() - [1.0, 2.0], -3 * LR, rtol=1e-6)


# --- Saving and loading a rule of your own --------------------------------------


class Beta(optimizers.Optimizer):
    """`p <- p - lr * beta * g`, with an argument of its own."""

    def __init__(self, learning_rate=LR, beta=0.5, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta = beta

    def update_step(self, grad, var, slots, lr, step):
        return var - lr * self.beta * grad, {}


class BetaSaved(Beta):
    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


class Momentum(optimizers.Optimizer):
    """A user's heavy ball, named like distopt's `Momentum` (another rule)."""

    def slot_initializers(self, var):
        return {"m": tf.zeros(var.shape)}

    def update_step(self, grad, var, slots, lr, step):
        m = 0.5 * slots["m"] + grad
        return var - lr * m, {"m": m}


def test_an_argument_of_a_subclass_missing_from_its_config_is_refused():
    """A loaded `Beta(beta=0.9)` took beta=0.5 and trained 32% off, silently;
    the spec (which `wrap` takes at once) names the argument and the fix."""
    with pytest.raises(NotImplementedError) as e:
        distopt.keras.wrap(Beta(beta=0.9))
    assert str(e.value) == (
        "Beta.get_config: lacks 'beta', of Beta.__init__, so a saved optimizer "
        "would load with the default; override get_config to add it: "
        "{**super().get_config(), 'beta': self.beta}."
    )
    spec = BetaSaved(beta=0.9).spec()
    assert optimizers.from_config(spec, classes=[BetaSaved]).beta == 0.9


def test_a_class_of_yours_named_like_distopts_does_not_load_as_distopts():
    """Unregistered, it loaded as distopt's `Momentum` (the same slot count),
    which trained on with another rule (6.7 times the update). Its module is
    in the spec now; it loads only as itself."""
    spec = Momentum(0.1).spec()
    assert spec["module"] == __name__
    with pytest.raises(ValueError) as e:
        optimizers.from_config(spec)
    assert str(e.value) == (
        f"optimizer: unknown class '{__name__}.Momentum'; register it before "
        "loading (distopt.optimizers.register(Momentum), or Keras's "
        "custom_objects)."
    )
    with pytest.raises(ValueError, match="register: 'momentum' is distopt"):
        optimizers.register(Momentum)
    assert type(optimizers.from_config(spec, classes=[Momentum])) is Momentum
    # distopt's own still loads as itself, by its module, and by its name
    # alone from a spec saved before the module was kept (older .keras files).
    own = optimizers.Momentum(0.1, momentum=0.9).spec()
    assert type(optimizers.from_config(own)) is optimizers.Momentum
    del own["module"]
    assert optimizers.from_config(own).momentum == 0.9


def test_a_keras_model_with_a_rule_of_yours_loads_through_custom_objects(tmp_path):
    """`load_model` refused it ("unknown class") whatever `custom_objects`
    held; it now takes the class from there, and the loaded optimizer goes
    on with the same rule and state as the saved one."""
    import keras

    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = x @ np.ones((4, 2), np.float32)

    def fitted():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=distopt.keras.wrap(Momentum(0.05)), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model

    model = fitted()
    path = str(tmp_path / "m.keras")
    model.save(path)
    with pytest.raises(ValueError, match="unknown class .*register it"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, custom_objects={"Momentum": Momentum})
    assert type(loaded.optimizer.distopt_optimizer) is Momentum
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
