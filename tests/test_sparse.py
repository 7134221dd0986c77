"""Sparse gradients (`tf.IndexedSlices`) travel sparse and update sparsely.

An embedding of 10,000 x 16 is looked up at 32 rows per replica (duplicates
included) on 4 replicas. Each test compares the update `w - w0` with a
float64 NumPy reference and with the dense path (the same gradients passed
densified), and counts the bytes on the wire. Plain gradient descent checks
every scale (weighted mean, clipping, the float16 wire).
"""

import keras
import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, local_copies, mirrored

from distopt import optimizers, sync

V, D, R, N = 10_000, 16, 4, 32
M4 = mirrored(R)
TABLE_BYTES = V * D * 4
WEIGHTS = np.array([1.0, 2.0, 3.0, 10.0], np.float32)

_rng = np.random.default_rng(7)
# Step 1 looks up rows in [0, 200), step 2 rows in [100, 300): rows below 100
# are touched at step 1 only, and ids repeat within and across replicas.
IDS = np.stack([_rng.integers(0, 200, (R, N)), _rng.integers(100, 300, (R, N))]).astype(
    np.int32
)
COEF = _rng.standard_normal((2, R, N, D)).astype(np.float32)
BIAS_COEF = _rng.standard_normal((2, R, D)).astype(np.float32)
W0 = _rng.standard_normal((V, D)).astype(np.float32)
B0 = _rng.standard_normal(D).astype(np.float32)
ONLY_STEP1 = np.setdiff1d(np.unique(IDS[0]), np.unique(IDS[1]))
NEVER = np.setdiff1d(np.arange(V), np.unique(IDS))
# Bytes of one step: the bias and the weight (dense, float32), then every
# replica's 32 int32 indices and 32 float32 rows.
SPARSE_STEP_BYTES = (D + 1) * 4 + R * N * (4 + D * 4)
DENSE_STEP_BYTES = (V * D + D + 1) * 4


def _grad(t, r):
    """Replica r's gradient at step t (0-based), dense, float64."""
    g = np.zeros((V, D))
    np.add.at(g, IDS[t, r], COEF[t, r].astype(np.float64))
    return g


def _train(cases, steps=2, build=True):
    """Trains one table and one bias per case, all in one `tf.function`.

    Args:
        cases: dicts with `opt` (an optimizer), `sparse` (pass the lookup's
            `IndexedSlices`, or the same gradient densified), and optionally
            `weighted` (pass `WEIGHTS[r]`) and `poison` (replica 3's gradient
            is NaN).
        steps: How many steps.
        build: Build the optimizers first (else inside the function, where
            TensorFlow traces it twice).

    Returns:
        The tables after each step (`[case][step]`), checked identical on
        every replica; the biases after the last step.
    """
    with M4.scope():
        tables = [tf.Variable(W0) for _ in cases]
        biases = [tf.Variable(B0) for _ in cases]
        if build:
            for case, table, bias in zip(cases, tables, biases):
                case["opt"].build([table, bias])
    ids, coef, bias_coef = tf.constant(IDS), tf.constant(COEF), tf.constant(BIAS_COEF)

    @tf.function
    def step(t):
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            for case, table, bias in zip(cases, tables, biases):
                c = coef[t, r]
                if case.get("poison"):
                    c = c * tf.where(tf.equal(r, 3), np.nan, 1.0)
                with tf.GradientTape() as tape:
                    rows = tf.nn.embedding_lookup(table, ids[t, r])
                    loss = tf.reduce_sum(rows * c) + tf.reduce_sum(
                        bias * bias_coef[t, r]
                    )
                g, gb = tape.gradient(loss, [table, bias])
                assert isinstance(g, tf.IndexedSlices)
                if not case["sparse"]:
                    g = tf.convert_to_tensor(g)
                weight = tf.gather(WEIGHTS, r) if case.get("weighted") else None
                case["opt"].apply_gradients([(g, table), (gb, bias)], weight=weight)

        M4.run(replica_fn)

    history = [[] for _ in cases]
    for t in range(steps):
        step(tf.constant(t))
        for h, table in zip(history, tables):
            h.append(local_copies(M4, table)[0])
    assert_replicas_identical(M4, tables + biases)
    return history, [local_copies(M4, b)[0] for b in biases]


def _reference(name, hyper, steps, rows_only=False, weights=None,
               global_clipnorm=None, clipnorm=None, clipvalue=None):  # fmt: skip
    """The float64 table and bias after `steps` updates of rule `name`.

    `rows_only`: the rule runs on the rows the step touches (distopt's
    sparse Momentum); otherwise on every row, as for a dense gradient.
    """
    rule = ref.RULES[name]
    w = np.array(W0, np.float64)
    b = np.array(B0, np.float64)
    sw, sb = {}, {}
    lr = hyper.pop("learning_rate")
    wr = np.ones(R) if weights is None else np.asarray(weights, np.float64)
    for t in range(steps):
        g = sum(wr[r] * _grad(t, r) for r in range(R)) / wr.sum()
        gb = (
            sum(wr[r] * BIAS_COEF[t, r].astype(np.float64) for r in range(R)) / wr.sum()
        )
        if clipvalue is not None:
            g, gb = (
                np.clip(g, -clipvalue, clipvalue),
                np.clip(gb, -clipvalue, clipvalue),
            )
        if clipnorm is not None:
            # Each variable by its own norm; the table's must be clipped.
            assert np.linalg.norm(g) > clipnorm
            g = g * min(1.0, clipnorm / np.linalg.norm(g))
            gb = gb * min(1.0, clipnorm / np.linalg.norm(gb))
        if global_clipnorm is not None:
            norm = np.sqrt(np.sum(g * g) + np.sum(gb * gb))
            scale = min(1.0, global_clipnorm / norm)
            g, gb = g * scale, gb * scale
        if rows_only:
            touched = np.unique(IDS[t])
            sub = {k: v[touched] for k, v in sw.items()}
            w[touched] = rule(w[touched], g[touched], sub, lr, t + 1, **hyper)
            for k, v in sub.items():
                sw.setdefault(k, np.zeros_like(w))[touched] = v
        else:
            w = rule(w, g, sw, lr, t + 1, **hyper)
        b = rule(b, gb, sb, lr, t + 1, **hyper)
    return w, b


def _assert_update(got, want, w0=W0, rtol=1e-5):
    """`got - w0` equals `want - w0` within `rtol` of the largest step."""
    step = np.asarray(want, np.float64) - w0
    np.testing.assert_allclose(
        np.asarray(got, np.float64) - w0, step, rtol=0, atol=rtol * np.abs(step).max()
    )


RULES = [
    ("gradient_descent", {"learning_rate": 0.5}),
    ("momentum", {"learning_rate": 0.5, "momentum": 0.9}),
    ("adagrad", {"learning_rate": 0.5}),
    ("adam", {"learning_rate": 0.05}),
]


def test_embedding_on_4_replicas_travels_sparse_and_updates_like_the_dense_path():
    cases = [
        {"name": n, "hyper": h, "sparse": s, "opt": optimizers.get(n, **h)}
        for n, h in RULES
        for s in (True, False)
    ]
    history, biases = _train(cases)
    assert len(np.unique(IDS[0, 0])) < N  # duplicates within one replica
    by_key = {
        (c["name"], c["sparse"]): (c, h, b) for c, h, b in zip(cases, history, biases)
    }
    for name, hyper in RULES:
        (sparse, (after1, final), bias), (dense, (_, dense_final), _) = (
            by_key[(name, True)],
            by_key[(name, False)],
        )
        rows_only = name == "momentum"
        want, want_bias = _reference(name, dict(hyper), 2, rows_only=rows_only)
        _assert_update(final, want)
        _assert_update(bias, want_bias, B0)
        # Sparse on the wire: indices and values of the rows looked up.
        assert int(sparse["opt"].allreduce_bytes.numpy()) == 2 * SPARSE_STEP_BYTES
        assert SPARSE_STEP_BYTES < 0.1 * TABLE_BYTES
        assert int(dense["opt"].allreduce_bytes.numpy()) == 2 * DENSE_STEP_BYTES
        # One all-reduce (bias and weight) and one all-gather per step.
        assert int(sparse["opt"].allreduce_calls.numpy()) == 4
        # Rows never looked up keep their value, bit for bit.
        np.testing.assert_array_equal(final[NEVER], W0[NEVER])
        if name == "adam":
            # Keras 3's semantics: the moments of a row touched at step 1
            # move it again at step 2, exactly as a dense gradient does.
            assert np.all(final[ONLY_STEP1] != after1[ONLY_STEP1])
        else:
            np.testing.assert_array_equal(final[ONLY_STEP1], after1[ONLY_STEP1])
        if rows_only:
            # The dense path's momentum keeps moving those rows.
            assert np.all(dense_final[ONLY_STEP1] != after1[ONLY_STEP1])
        else:
            _assert_update(final, dense_final)


@pytest.mark.parametrize("name", ["gradient_descent", "momentum", "adagrad"])
def test_weight_decay_shrinks_every_row_under_a_sparse_update(name):
    # Decoupled decay is a dense term: rows the gradient never touches still
    # shrink by (1 - lr * wd) every step, as in Keras. The touched rows then
    # take the rule on their decayed value. Default strategy, a small table.
    lr, wd = 0.5, 0.1
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((8, 3)).astype(np.float32)
    steps = [
        (np.array([1, 3, 1]), rng.standard_normal((3, 3))),
        (np.array([3, 5]), rng.standard_normal((2, 3))),
    ]
    table = tf.Variable(w0)
    opt = optimizers.get(name, learning_rate=lr, weight_decay=wd)
    for ids, coef in steps:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.embedding_lookup(table, ids) * coef)
        g = tape.gradient(loss, table)
        assert isinstance(g, tf.IndexedSlices)
        opt.apply_gradients([(g, table)])
    # NumPy: decay every row, then the rule. A zero gradient leaves a row
    # alone under gradient descent and Adagrad; distopt's sparse Momentum
    # moves the touched rows only (see test above).
    w, slots = w0.astype(np.float64), {}
    for t, (ids, coef) in enumerate(steps):
        g = np.zeros_like(w)
        np.add.at(g, ids, coef)
        w = w * (1 - lr * wd)
        if name != "momentum":
            w = ref.RULES[name](w, g, slots, lr, t + 1)
            continue
        touched = np.unique(ids)
        sub = {k: v[touched] for k, v in slots.items()}
        w[touched] = ref.RULES[name](w[touched], g[touched], sub, lr, t + 1)
        for k, v in sub.items():
            slots.setdefault(k, np.zeros_like(w))[touched] = v
    got = table.numpy()
    _assert_update(got, w, w0)
    never = np.setdiff1d(np.arange(8), np.concatenate([i for i, _ in steps]))
    np.testing.assert_allclose(
        got[never] - w0[never], w0[never] * ((1 - lr * wd) ** 2 - 1), rtol=1e-5
    )


GD = {"learning_rate": 0.5}
OPTIONS = [
    ({"aggregation": "weighted_mean"}, {"weights": WEIGHTS}, 1e-5),
    ({"global_clipnorm": 1.0}, {"global_clipnorm": 1.0}, 1e-5),
    ({"clipnorm": 0.5}, {"clipnorm": 0.5}, 1e-5),
    ({"clipvalue": 0.1}, {"clipvalue": 0.1}, 1e-5),
    # One rounding of each normalised row to float16, then sums of up to 8.
    ({"wire_dtype": "float16"}, {}, 2.0**-11 * 8),
    (
        {
            "aggregation": "weighted_mean",
            "global_clipnorm": 1.0,
            "wire_dtype": "float16",
        },
        {"weights": WEIGHTS, "global_clipnorm": 1.0},
        2.0**-11 * 8,
    ),
]


def test_weighted_mean_clipping_float16_wire_and_nonfinite_skip_on_sparse_gradients():
    # The dense path with these options is checked against the same
    # references in test_numerics.py.
    cases = [
        {
            "sparse": True,
            "weighted": kw.get("aggregation") == "weighted_mean",
            "opt": optimizers.GradientDescent(**GD, **kw),
        }
        for kw, _, _ in OPTIONS
    ]
    cases.append(
        {
            "sparse": True,
            "poison": True,
            "opt": optimizers.GradientDescent(**GD, skip_nonfinite=True),
        }
    )
    # Built inside the step: a lazy build with sparse gradients.
    history, biases = _train(cases, steps=1, build=False)
    for i, (kw, ref_kw, tol) in enumerate(OPTIONS):
        (got,) = history[i]
        want, want_bias = _reference("gradient_descent", dict(GD), 1, **ref_kw)
        _assert_update(got, want, rtol=tol)
        _assert_update(biases[i], want_bias, B0, rtol=tol)
        np.testing.assert_array_equal(got[NEVER], W0[NEVER])
        narrow = "wire_dtype" in kw
        # A narrow wire: weights first (4 bytes), then float16 bias and rows.
        want_bytes = 4 + D * 2 + R * N * (4 + D * 2) if narrow else SPARSE_STEP_BYTES
        assert int(cases[i]["opt"].allreduce_bytes.numpy()) == want_bytes, kw
        assert want_bytes < 0.1 * TABLE_BYTES
    # Replica 3's rows are NaN: every replica skips the step.
    np.testing.assert_array_equal(history[-1][0], W0)
    assert int(cases[-1]["opt"].skipped_steps.numpy()) == 1


def test_local_steps_and_accumulation_with_sparse_gradients():
    lr, mu = 0.5, 0.9
    # Replica groups of 2: each group sums its rows, then updates the rows it
    # touched. (A group of one replica takes the single-device path, which
    # the Keras test covers.) Not compiled, to keep the test short.
    modes = {
        "hierarchical": lambda: sync.Hierarchical(2, group_size=2),
        "accumulate": lambda: sync.Accumulate(2),
    }
    cases = [
        {
            "mode": m,
            "sparse": True,
            "opt": optimizers.Momentum(lr, momentum=mu, sync=f(), jit_compile=False),
        }
        for m, f in modes.items()
    ]
    history, _ = _train(cases)

    def momentum_rows(groups, rows_only):
        """Each group's own momentum steps on its mean gradient, then the average."""
        finals = []
        for group in groups:
            w, m = np.array(W0, np.float64), np.zeros((V, D))
            for t in range(2):
                g = sum(_grad(t, r) for r in group) / len(group)
                rows = np.unique(IDS[t][list(group)]) if rows_only else slice(None)
                m[rows] = mu * m[rows] - lr * g[rows]
                w[rows] = w[rows] + m[rows]
            finals.append(w)
        return sum(finals) / len(finals)

    for case, (_, final) in zip(cases, history):
        if case["mode"] == "accumulate":
            # Densified at accumulation; one update on the mean of 8 gradients.
            g = sum(_grad(t, r) for t in range(2) for r in range(R)) / (2 * R)
            want = W0 - lr * g
        else:
            want = momentum_rows([[0, 1], [2, 3]], rows_only=True)
            # The dense path's momentum would move the rows touched at step 1.
            dense = momentum_rows([[0, 1], [2, 3]], rows_only=False)
            assert np.all(want[ONLY_STEP1] != dense[ONLY_STEP1])
        _assert_update(final, want)


def _op_types(concrete):
    """Every op type in a traced function, its nested functions included."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for f in graph_def.library.function:
        nodes += list(f.node_def)
    return [n.op for n in nodes]


def test_accumulate_adds_a_sparse_gradient_in_place():
    # Each micro-step writes the rows it touched into the accumulator; adding
    # to the value read would copy the whole table every micro-step (5.3 ms
    # against 0.4 ms for a 1M x 16 table, BUILD_NOTES.md).
    table = tf.Variable(tf.zeros([1000, 4]))
    opt = optimizers.GradientDescent(0.1, sync=sync.Accumulate(3))

    @tf.function
    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.embedding_lookup(table, ids))
        opt.apply_gradients([(tape.gradient(loss, table), table)])

    ids = tf.constant([5, 7, 5])
    ops = _op_types(step.get_concrete_function(ids))
    assert "ResourceScatterAdd" in ops
    assert "TensorScatterAdd" not in ops
    for _ in range(3):
        step(ids)
    want = np.zeros((1000, 4))
    want[5], want[7] = -0.1 * 2, -0.1 * 1  # Mean of 3 equal micro-steps.
    np.testing.assert_allclose(table.numpy(), want, rtol=1e-6)


def test_keras_3_densifies_adam_and_momentum_but_not_adagrad():
    """The semantics the docstrings name, against Keras 3 itself (no strategy)."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((50, 4)).astype(np.float32)
    steps = [np.array([1, 3, 3, 7], np.int32), np.array([2, 3, 9, 9], np.int32)]
    vals = [rng.standard_normal((4, 4)).astype(np.float32) for _ in steps]
    cases = [
        ("Adam", "Adam", {"learning_rate": 0.05}),
        ("Adagrad", "Adagrad", {"learning_rate": 0.5}),
        ("Momentum", "SGD", {"learning_rate": 0.5, "momentum": 0.9}),
    ]
    for ours_name, keras_name, kw in cases:
        ours_var, keras_var = tf.Variable(w0), tf.Variable(w0)
        ours = getattr(optimizers, ours_name)(jit_compile=False, **kw)
        theirs = getattr(keras.optimizers, keras_name)(**kw)
        for idx, v in zip(steps, vals):
            g = tf.IndexedSlices(tf.constant(v), tf.constant(idx), tf.constant([50, 4]))
            ours.apply_gradients([(g, ours_var)])
            # Keras's Adagrad squares each slice before adding: give it each
            # row once, as the reduce does.
            u, pos = np.unique(idx, return_inverse=True)
            summed = np.zeros((len(u), 4), np.float32)
            np.add.at(summed, pos, v)
            theirs.apply([tf.IndexedSlices(summed, u, [50, 4])], [keras_var])
        ours_w, keras_w = ours_var.numpy(), keras_var.numpy()
        if ours_name == "Momentum":
            # Rows 1 and 7, touched at step 1 only: Keras 3 moves them again,
            # distopt (TF1's sparse momentum) does not.
            assert np.all(keras_w[[1, 7]] != ours_w[[1, 7]])
            np.testing.assert_allclose(ours_w[[2, 3, 9]], keras_w[[2, 3, 9]], rtol=1e-6)
        else:
            np.testing.assert_allclose(ours_w, keras_w, rtol=1e-6, atol=1e-7)


def test_sparse_gradient_with_rows_of_the_wrong_shape_names_grads():
    var = tf.Variable(tf.zeros([10, 4]))
    bad = tf.IndexedSlices(tf.ones([2, 3]), tf.constant([0, 1]), tf.constant([10, 3]))
    with pytest.raises(ValueError, match=r"grads: gradient 0 has rows of shape"):
        optimizers.GradientDescent().apply_gradients([(bad, var)])
    np.testing.assert_array_equal(var.numpy(), 0.0)


def test_sam_base_update_travels_sparse():
    # The loss is linear in the table, so the gradient at the perturbed point
    # is the gradient itself and SAM's step is gradient descent's.
    with M4.scope():
        table, bias = tf.Variable(W0), tf.Variable(B0)
        sam = optimizers.SAM(optimizers.GradientDescent(**GD), rho=0.05)
    ids, coef, bias_coef = tf.constant(IDS), tf.constant(COEF), tf.constant(BIAS_COEF)

    @tf.function
    def step():
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group

            def loss_fn():
                rows = tf.nn.embedding_lookup(table, ids[0, r])
                return tf.reduce_sum(rows * coef[0, r]) + tf.reduce_sum(
                    bias * bias_coef[0, r]
                )

            sam.minimize(loss_fn, [table, bias])

        M4.run(replica_fn)

    step()
    assert_replicas_identical(M4, [table, bias])
    want, _ = _reference("gradient_descent", dict(GD), 1)
    got = local_copies(M4, table)[0]
    _assert_update(got, want)
    np.testing.assert_array_equal(got[NEVER], W0[NEVER])
    assert int(sam.base_optimizer.allreduce_bytes.numpy()) == SPARSE_STEP_BYTES


# --- SAM's perturbation and Heun's trial point travel sparse ----------------------

V2, D2, N2 = 1_000, 8, 12
QUARTIC = 0.05  # A row^4 term: the gradient at the moved point differs.
_rng2 = np.random.default_rng(11)
# 2 replicas, 2 steps; ids repeat within a replica and across the two.
IDS2 = _rng2.integers(0, 40, (2, 2, N2)).astype(np.int32)
COEF2 = _rng2.standard_normal((2, 2, N2, D2)).astype(np.float32)
TABLE2 = _rng2.standard_normal((V2, D2)).astype(np.float32)


def _grad2(table, t, r):
    """Replica r's gradient at step t of `sum(rows * c) + QUARTIC * sum(rows^4)`."""
    g = np.zeros_like(table)
    rows = table[IDS2[t, r]]
    np.add.at(g, IDS2[t, r], COEF2[t, r] + 4 * QUARTIC * rows**3)
    return g


def _reference2(kind, lr, rho, steps=2):
    """The float64 table after `steps` steps of SAM (aggregated) or Heun."""
    p = TABLE2.astype(np.float64)
    for t in range(steps):
        g1 = np.mean([_grad2(p, t, r) for r in range(2)], axis=0)
        if kind == "heun":
            g2 = np.mean([_grad2(p - lr * g1, t, r) for r in range(2)], axis=0)
            p = p - lr / 2 * (g1 + g2)
        else:
            e = rho * g1 / np.linalg.norm(g1)
            p = p - lr * np.mean([_grad2(p + e, t, r) for r in range(2)], axis=0)
    return p


@pytest.mark.parametrize("kind", ["sam_aggregated", "heun"])
def test_sam_perturbation_and_heun_trial_point_travel_sparse(kind):
    """Both reductions of a step keep an embedding's gradient sparse.

    The dense path looks the rows up with a one-hot matmul, whose gradient
    is the dense table: the same numbers, every row on the wire.
    """
    lr, rho = 0.1, 0.05
    strategy = mirrored(2)
    ids, coef = tf.constant(IDS2), tf.constant(COEF2)
    results = {}
    for sparse in (True, False):
        with strategy.scope():
            table = tf.Variable(TABLE2)
            if kind == "heun":
                opt = optimizers.Heun(lr)
                base = opt
            else:
                base = optimizers.GradientDescent(lr)
                opt = optimizers.SAM(base, rho=rho, perturbation="aggregated")
            opt.build([table])

        @tf.function
        def step(t, table=table, opt=opt, sparse=sparse):
            def replica_fn():
                r = tf.distribute.get_replica_context().replica_id_in_sync_group

                def loss_fn():
                    if sparse:
                        rows = tf.nn.embedding_lookup(table, ids[t, r])
                    else:
                        rows = tf.matmul(tf.one_hot(ids[t, r], V2), table)
                    return tf.reduce_sum(rows * coef[t, r]) + QUARTIC * tf.reduce_sum(
                        rows**4
                    )

                opt.minimize(loss_fn, [table])

            strategy.run(replica_fn)

        step_bytes = []
        for t in range(2):
            before = int(base.allreduce_bytes)
            step(tf.constant(t))
            step_bytes.append(int(base.allreduce_bytes) - before)
        assert_replicas_identical(strategy, [table])
        results[sparse] = (local_copies(strategy, table)[0], step_bytes)
    (got, sparse_bytes), (dense_got, dense_bytes) = results[True], results[False]
    want = _reference2(kind, lr, rho)
    _assert_update(got, want, TABLE2)
    _assert_update(got, dense_got, TABLE2, rtol=1e-6)
    untouched = np.setdiff1d(np.arange(V2), IDS2)
    np.testing.assert_array_equal(got[untouched], TABLE2[untouched])
    # Two reductions per step: the dense path sends the table twice (and the
    # weight); the sparse path sends the rows each replica looked up, with
    # their int32 indices, and the weight. Heun's update sends the rows of
    # (g1 + g2) / 2 each index once.
    table_bytes = V2 * D2 * 4
    row = 4 + D2 * 4
    for t in range(2):
        assert dense_bytes[t] == 2 * (table_bytes + 4)
        first = 4 + 2 * N2 * row
        if kind == "heun":
            update = 4 + sum(len(np.unique(IDS2[t, r])) for r in range(2)) * row
        else:
            update = first
        assert sparse_bytes[t] == first + update
        assert sparse_bytes[t] < table_bytes
