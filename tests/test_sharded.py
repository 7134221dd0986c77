"""Optimizer state sharded across replicas (ZeRO stage 1, `shard_state=True`).

The sharded update must be the unsharded update: bit for bit for the
element-wise rules, to float32 rounding for Lamb and Lars (their norms are
summed from per-shard partial sums). Each test compares against an
unsharded run and, where it can, the NumPy reference; the problem and the
table of optimizers are in `sharded_harness.py`, shared with the 2-worker
run (`mw_worker.py`).

Most runs here are op by op (`jit_compile=False`, no XLA compilation to
pay for) with Grappler off for the module: its arithmetic optimizer
rewrites `x / sqrt(y)` into `x * rsqrt(y)`, which is not correctly rounded,
and not in every graph alike; with it, sharded and unsharded Adagrad and
RMSprop differed in the last bit, op by op (without it they agree bit for
bit). The XLA kernels (`jit_compile=True`, the default) agree bit for bit
with Grappler on: the 2-worker run uses the default options throughout.
"""

import dataclasses

import keras
import numpy as np
import numpy_reference as ref
import pytest
import sharded_harness as harness
import tensorflow as tf
from conftest import local_copies, mirrored

import distopt
from distopt import checkpoints, optimizers
from distopt import distribute as dist

STRATEGIES = {2: mirrored(2), 4: mirrored(4)}
NAMES = sorted(harness.CONFIGS)
REGISTRY = [k for k in NAMES if k not in harness.LOSS_BASED]
OP_BY_OP = {"jit_compile": False}


@pytest.fixture(scope="module", autouse=True)
def no_grappler():
    """Grappler off while this module runs (see the module docstring)."""
    before = tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer", False
    )
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def assert_same(got, want, msg, exact=True):
    """Bitwise if `exact`, else equal to float32 rounding (Lamb, Lars)."""
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=msg)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=msg)


def assert_trajectories(got, want, name, exact=True, first_step=1):
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for i, (a, b) in enumerate(zip(g, w, strict=True)):
            assert_same(a, b, f"{name} var{i} step {first_step + k}", exact)


# --- 1. Every optimizer: sharded == unsharded == NumPy --------------------------


@pytest.fixture(scope="module")
def single_device():
    """Every registry optimizer, unsharded, on one device with the mean gradient."""
    return harness.single_device(REGISTRY, **OP_BY_OP)


@pytest.mark.parametrize("n", [2, 4])
def test_every_optimizer_sharded_equals_unsharded_and_reference(n, single_device):
    """20 steps of every optimizer of the library under Mirrored(n).

    Against the unsharded update (one device, same aggregated gradient; SAM
    and Heun: unsharded under the same strategy) at every step, the NumPy
    reference's update, and identical replicas at every step (`train`).
    """
    assert set(optimizers.names()) <= set(NAMES)  # a new optimizer joins the table
    strategy = STRATEGIES[n]
    unsharded = [(k, False) for k in harness.LOSS_BASED]
    runs = harness.train(strategy, [(k, True) for k in NAMES] + unsharded, **OP_BY_OP)
    w0 = harness.problem(n)[0]
    for name in NAMES:
        got, opt, variables = runs[(name, True)]
        base = opt.base_optimizer if name == "sam" else opt
        assert base._sharded_slots is not None, name
        if name in harness.LOSS_BASED:
            want, want_opt, want_vars = runs[(name, False)]
        else:
            want, want_opt, want_vars = single_device[name]
        exact = name not in harness.LAYERWISE
        assert_trajectories(got, want, name, exact)
        reference = harness.numpy_trajectory(name, n)
        for t, (g, w) in enumerate(zip(got, reference)):
            for i in range(len(g)):
                np.testing.assert_allclose(
                    g[i] - w0[i],
                    w[i] - w0[i],
                    rtol=1e-4,
                    atol=1e-5,
                    err_msg=f"{name} var{i} step {t + 1}: NumPy reference",
                )
        # The slots, read whole from their shards.
        for v, u in zip(variables, want_vars):
            slots, want_slots = opt.slots(v), want_opt.slots(u)
            assert slots.keys() == want_slots.keys(), name
            for key, s in slots.items():
                assert_same(s.numpy(), want_slots[key].numpy(), f"{name} {key}", exact)
        assert int(opt.iterations.numpy()) == harness.STEPS


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "op_by_op"])
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_layerwise_norms_of_an_mlp_sized_layer(name, jit_compile):
    """Lamb and Lars sharded over a 784x700 layer. XLA-compiled, as the
    trainer runs them, it failed ("UnsortedSegmentSum requires indices shape
    to be prefix of data_shape"); op by op each shard's norm summed element
    after element (1.7e-5 off after 2 steps, against ~1e-7)."""
    shapes = [(784, 700), (700,), (700, 500), (500,)]
    rng = np.random.default_rng(5)
    w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
    m2 = STRATEGIES[2]
    updates = {}
    for shard in (True, False):
        with m2.scope():
            variables = [tf.Variable(w) for w in w0]
            opt = optimizers.get(
                name, learning_rate=0.01, shard_state=shard, jit_compile=jit_compile
            )

        @tf.function
        def step(gs, opt=opt, variables=variables):
            m2.run(lambda: opt.apply_gradients(zip(gs, variables)))

        for gs in grads:
            step([tf.constant(g) for g in gs])
        updates[shard] = [
            [c - w for c in local_copies(m2, v)] for v, w in zip(variables, w0)
        ]
    # Weights up to about 4 round the updates to 2.4e-7: 2 of their ulps.
    for i, (sharded, unsharded) in enumerate(zip(updates[True], updates[False])):
        for copy in sharded[1:]:
            np.testing.assert_array_equal(copy, sharded[0])
        np.testing.assert_allclose(
            sharded[0], unsharded[0], rtol=1e-5, atol=5e-7, err_msg=f"var{i}"
        )


def test_a_lazy_build_in_a_function_keeps_the_initial_slots():
    """Built by the first step's tf.function: Adagrad's initial accumulator
    (0.1) must survive the function's initialisation of its variables."""
    strategy = STRATEGIES[2]
    entries = [("adagrad", True), ("adagrad", False)]
    runs = harness.train(strategy, entries, stop=2, build=False, **OP_BY_OP)
    (got, opt, variables), (want, ref_opt, ref_vars) = (runs[e] for e in entries)
    assert_trajectories(got, want, "adagrad")
    for v, u in zip(variables, ref_vars):
        np.testing.assert_array_equal(
            opt.slots(v)["accumulator"].numpy(), ref_opt.slots(u)["accumulator"].numpy()
        )


# --- 2. Composition -------------------------------------------------------------

F32, F16, BF16 = tf.float32, tf.float16, tf.bfloat16
ABSENT = 2  # The variable without a gradient in the cases that say so.


@dataclasses.dataclass(frozen=True)
class Case:
    """Options of the optimizer, sharded and not, side by side."""

    name: str = "adam"
    kwargs: tuple = ()  # Optimizer arguments, as items.
    dtypes: tuple = (F32,) * len(harness.SHAPES)
    weight: bool = False  # Pass each replica's weight (see `_weight`).
    invalid_at: tuple = ()  # Steps where replica 1's weight is -1.
    nan_at: tuple = ()  # Steps where replica 1's gradient has a NaN.
    grad_scale: float = 1.0
    minimize: bool = False  # Through `minimize` (loss scaling), linear loss.
    absent: bool = False  # Variable ABSENT never gets a gradient.
    micro: bool = False  # Two `apply_gradients` per step (see "accumulate").
    exact: bool = True


CASES = {
    # Momentum: unlike Adam's, its step is not invariant to the gradient's
    # scale, so a clip taken over a shard would show. Each clip binds.
    "sum_clipvalue": Case("momentum", (("aggregation", "sum"), ("clipvalue", 0.5))),
    "weighted_mean_global_clipnorm": Case(
        "momentum",
        (("aggregation", "weighted_mean"), ("global_clipnorm", 1.0)),
        weight=True,
    ),
    "clipnorm_ema": Case(
        "momentum",
        (
            ("clipnorm", 0.5),
            ("use_ema", True),
            ("ema_momentum", 0.9),
            ("ema_overwrite_frequency", 7),
        ),
    ),
    # An invalid weight at step 3, a NaN at step 11: both skipped.
    "skips": Case(
        kwargs=(("aggregation", "weighted_mean"), ("skip_nonfinite", True)),
        weight=True,
        invalid_at=(3,),
        nan_at=(11,),
    ),
    # float16 and bfloat16 groups next to float32 ones; gradients 4x larger
    # overflow float16 at the first scales, which skips those steps. XLA
    # kernels, one per variable when unsharded.
    "loss_scale_mixed_dtypes_xla_not_fused": Case(
        kwargs=(("loss_scale", "dynamic"), ("jit_compile", True), ("fused", False)),
        dtypes=(F32, F16, BF16, F32, F16),
        grad_scale=4.0,
        minimize=True,
    ),
    # With weight decay an absent variable treated as a zero gradient would
    # shrink: it must stay as it is, and its slots too. It is alone in its
    # (bfloat16) group: a group with nothing to update.
    "absent_lamb_not_fused": Case(
        "lamb",
        (("weight_decay", 0.1), ("fused", False)),
        dtypes=(F32, F32, BF16, F32, F32),
        absent=True,
        exact=False,
    ),
    # Two micro-steps per step: variable ABSENT has no gradient in the whole
    # window (kept: `var_ok` False), variable 3 none in the last micro-step
    # only (still applied at the flush: `var_ok` True).
    "accumulate": Case(
        kwargs=(("sync", ("accumulate", 2)), ("weight_decay", 0.1)),
        absent=True,
        micro=True,
    ),
}


def _make_case(case, shard):
    kwargs = {"learning_rate": 0.1, **OP_BY_OP, **dict(case.kwargs)}
    if isinstance(kwargs.get("sync"), tuple):
        kwargs["sync"] = distopt.sync.get(kwargs["sync"][0], k=kwargs["sync"][1])
    return optimizers.get(case.name, shard_state=shard, **kwargs)


def _weight(case, t, r):
    if t in case.invalid_at and r == 1:
        return -1.0
    return float((t % 3 + 1) * (2 * r + 1)) if case.weight else 1.0


def _case_data(case, grads, t, r):
    g = [case.grad_scale * x for x in grads[t][r]]
    if t in case.nan_at and r == 1:
        g[2] = g[2].copy()
        g[2].flat[3] = np.nan
    return g, _weight(case, t, r)


def _run_cases(strategy, cases, steps=harness.STEPS):
    """Every case, sharded and unsharded, stepped together in one function.

    Returns `{(label, shard): [per step: (params, shards, counters)]}`:
    replica 0's copy of each variable (every copy checked identical), every
    replica's copy of each shard (sharded only), and `iterations` and
    `skipped_steps`; and the optimizers and variables.
    """
    n = strategy.num_replicas_in_sync
    params, grads, _ = harness.problem(n)
    keys = [(label, shard) for label in cases for shard in (True, False)]
    with strategy.scope():
        opts = {k: _make_case(cases[k[0]], k[1]) for k in keys}
        var_sets = {
            k: [tf.Variable(tf.cast(p, d)) for p, d in zip(params, cases[k[0]].dtypes)]
            for k in keys
        }
        for k in keys:
            opts[k].build(var_sets[k])

    def replica_fn(data):
        for k in keys:
            case, opt, variables = cases[k[0]], opts[k], var_sets[k]
            g, w = data[k[0]]
            g = [tf.cast(x, v.dtype) for x, v in zip(g, variables)]
            if case.absent:
                g[ABSENT] = None
            weight = w if case.weight else None
            if case.minimize:

                def loss_fn(variables=variables, g=g):
                    return tf.add_n(
                        [
                            tf.reduce_sum(tf.cast(x * v, tf.float32))
                            for x, v in zip(g, variables)
                            if x is not None
                        ]
                    )

                opt.minimize(loss_fn, variables, weight=weight)
            elif case.micro:
                opt.apply_gradients(g, variables)
                opt.apply_gradients([*g[:3], None, g[4]], variables)
            else:
                opt.apply_gradients(g, variables, weight=weight)

    def copies(v):
        return [tf.identity(c) for c in strategy.experimental_local_results(v)]

    def read(k):
        opt = opts[k]
        shards = (
            [copies(s) for s in opt._sharded_slots.storage_variables()]
            if opt._sharded_slots is not None
            else []
        )
        counters = [opt.iterations.variable, opt.skipped_steps.variable]
        return (
            [copies(v) for v in var_sets[k]],
            shards,
            [copies(c)[0] for c in counters],
        )

    @tf.function
    def step(data):
        strategy.run(replica_fn, args=(data,))
        return {k: read(k) for k in keys}

    out = {k: [] for k in keys}
    for t in range(steps):
        data = strategy.experimental_distribute_values_from_function(
            lambda ctx, t=t: {
                label: tuple(
                    tf.nest.map_structure(
                        tf.constant,
                        _case_data(case, grads, t, ctx.replica_id_in_sync_group),
                    )
                )
                for label, case in cases.items()
            }
        )
        result = tf.nest.map_structure(lambda x: x.numpy(), step(data))
        for k in keys:
            local, shards, counters = result[k]
            for i, c in enumerate(local):
                for r in range(1, len(c)):
                    np.testing.assert_array_equal(
                        c[r], c[0], err_msg=f"{k} var{i} step {t + 1}: replica {r}"
                    )
            out[k].append(([c[0] for c in local], shards, counters))
    return out, opts, var_sets


def _clipped_reference(label):
    """A momentum case's parameters after each step, in NumPy (float64).

    Returns them and whether a clip changed the gradient at some step.
    """
    case = CASES[label]
    params, grads, _ = harness.problem(2)
    kwargs = dict(case.kwargs)
    steps, bound = [], False
    for t, per_replica in enumerate(grads):
        w = [_weight(case, t, r) for r in range(2)]
        g = [
            sum(np.float64(wr) * x[i] for wr, x in zip(w, per_replica))
            for i in range(len(params))
        ]
        if kwargs.get("aggregation") != "sum":
            g = [x / sum(w) for x in g]
        raw = g
        if "clipvalue" in kwargs:
            g = [np.clip(x, -kwargs["clipvalue"], kwargs["clipvalue"]) for x in g]
        if "clipnorm" in kwargs:
            g = [x * min(1.0, kwargs["clipnorm"] / np.linalg.norm(x)) for x in g]
        if "global_clipnorm" in kwargs:
            norm = np.sqrt(sum(np.sum(x * x) for x in g))
            g = [x * min(1.0, kwargs["global_clipnorm"] / norm) for x in g]
        bound |= any(not np.array_equal(x, y) for x, y in zip(g, raw))
        steps.append(g)
    ema = ("use_ema", "ema_momentum", "ema_overwrite_frequency")
    hyper = {k: v for k, v in kwargs.items() if k in ema}
    want = [
        ref.run("momentum", params, steps[: t + 1], 0.1, **hyper)[0]
        for t in range(len(steps))
    ]
    return want, bound


def test_composition_sharded_equals_unsharded():
    """Each case of CASES, sharded and not, 20 steps of Mirrored(2).

    One test (its cases share one traced step): equal at every step,
    parameters and counters, and in the end their slots; then what each
    case must show of itself.
    """
    strategy = STRATEGIES[2]
    out, opts, var_sets = _run_cases(strategy, CASES)
    w0 = harness.problem(2)[0]
    for label, case in CASES.items():
        sharded, unsharded = out[(label, True)], out[(label, False)]
        for t, ((p, _, c), (q, _, d)) in enumerate(zip(sharded, unsharded)):
            for i, (a, b) in enumerate(zip(p, q)):
                assert_same(a, b, f"{label} var{i} step {t + 1}", case.exact)
            np.testing.assert_array_equal(c, d, err_msg=f"{label} counters {t + 1}")
        opt, ref_opt = opts[(label, True)], opts[(label, False)]
        assert opt._sharded_slots is not None
        for v, u in zip(var_sets[(label, True)], var_sets[(label, False)]):
            for key, s in opt.slots(v).items():
                want = ref_opt.slots(u)[key].numpy()
                assert_same(s.numpy(), want, f"{label} {key}", case.exact)

    # The clips bind (one global norm over all shards), the weights count.
    for label in ("sum_clipvalue", "weighted_mean_global_clipnorm", "clipnorm_ema"):
        want, bound = _clipped_reference(label)
        assert bound, label
        for t, (p, _, _) in enumerate(out[(label, True)]):
            for i in range(len(p)):
                np.testing.assert_allclose(
                    p[i] - w0[i],
                    want[t][i] - w0[i],
                    rtol=1e-4,
                    atol=1e-5,
                    err_msg=f"{label} var{i} step {t + 1}: NumPy reference",
                )

    # The skipped steps (an invalid weight, then a NaN) left every replica's
    # parameters, every replica's shards and `iterations` as they were.
    skips = opts[("skips", True)]
    assert int(skips.skipped_steps.numpy()) == 2
    assert int(skips.invalid_weight_steps.numpy()) == 1
    traj = out[("skips", True)]
    for at in (*CASES["skips"].invalid_at, *CASES["skips"].nan_at):
        (p0, s0, c0), (p1, s1, c1) = traj[at - 1], traj[at]
        for a, b in zip(p0, p1):
            np.testing.assert_array_equal(a, b, err_msg=f"skipped step {at + 1}")
        for a, b in zip(s0, s1):
            np.testing.assert_array_equal(np.stack(a), np.stack(b))
        assert c1[0] == c0[0] and c1[1] == c0[1] + 1
        # ...which the step before did change.
        assert any(not np.array_equal(a, b) for a, b in zip(traj[at - 2][1], s0))

    scaled = opts[("loss_scale_mixed_dtypes_xla_not_fused", True)]
    assert int(scaled.skipped_steps.numpy()) >= 2  # float16 overflowed
    assert float(scaled.loss_scale.scale.numpy()) < 2.0**15

    # An absent variable stays, and so do its slots; its neighbours move.
    for label in ("absent_lamb_not_fused", "accumulate"):
        opt, variables = opts[(label, True)], var_sets[(label, True)]
        final = out[(label, True)][-1][0]
        start = tf.cast(w0[ABSENT], CASES[label].dtypes[ABSENT]).numpy()
        np.testing.assert_array_equal(final[ABSENT], start, err_msg=label)
        assert not np.array_equal(final[ABSENT + 1], w0[ABSENT + 1]), label
        for name, slot in opt.slots(variables[ABSENT]).items():
            np.testing.assert_array_equal(slot.numpy(), 0 * w0[ABSENT], err_msg=name)
    assert int(opts[("accumulate", True)].iterations.numpy()) == harness.STEPS

    # finalize_variable_values copies the (sharded) average into every copy.
    finals = {}
    for shard in (True, False):
        key = ("clipnorm_ema", shard)
        opt, variables = opts[key], var_sets[key]
        averages = [opt.slots(v)["ema"].numpy() for v in variables]
        assert not np.array_equal(averages[0], variables[0].numpy())
        with strategy.scope():
            opt.finalize_variable_values(variables)
        for v, ema in zip(variables, averages):
            for c in local_copies(strategy, v):
                np.testing.assert_array_equal(c, ema)
        finals[shard] = [v.numpy() for v in variables]
    for a, b in zip(finals[True], finals[False]):
        np.testing.assert_array_equal(a, b)


# --- 3. Refusals and sparse gradients -------------------------------------------


@pytest.mark.parametrize("sync", ["local_sgd", "diloco", "hierarchical"])
def test_diverging_sync_modes_refuse_shard_state(sync):
    with pytest.raises(ValueError, match="^shard_state: ") as err:
        optimizers.Adam(shard_state=True, sync=distopt.sync.get(sync, k=2))
    assert "\n" not in str(err.value)


def test_sparse_gradients_are_densified():
    """An `IndexedSlices` gradient gives the dense gradient's update.

    Unsharded, Momentum updates the touched rows only (`sparse_rows`): the
    momentum of a row not touched at a step does not decay. Sharded, the
    gradient is densified: every row's momentum decays, as with a dense
    gradient, and the result differs from the unsharded sparse update.
    """
    strategy = STRATEGIES[2]
    table0 = np.arange(35, dtype=np.float32).reshape(7, 5) / 10
    with strategy.scope():
        tables = [tf.Variable(table0) for _ in range(3)]
        opts = [
            optimizers.Momentum(0.1, shard_state=shard, **OP_BY_OP)
            for shard in (True, False, False)
        ]

    def replica_fn(rows):
        for k, (table, opt) in enumerate(zip(tables, opts)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(table, rows) ** 2)
            g = tape.gradient(loss, table)
            assert isinstance(g, tf.IndexedSlices)
            opt.apply_gradients([tf.convert_to_tensor(g) if k == 1 else g], [table])

    step = tf.function(lambda rows: strategy.run(replica_fn, args=(rows,)))
    for rows in ([[0, 1], [5, 1]], [[2, 2], [6, 0]], [[3, 4], [4, 3]]):
        step(
            strategy.experimental_distribute_values_from_function(
                lambda ctx, rows=rows: tf.constant(rows[ctx.replica_id_in_sync_group])
            )
        )
    sharded, dense, sparse_rows = (t.numpy() for t in tables)
    for c in local_copies(strategy, tables[0]):
        np.testing.assert_array_equal(c, dense)
    # Rows 0, 1, 5 and 6 were not touched at the last step: unsharded sparse
    # rows keep their momentum there; dense, it decays.
    assert not np.array_equal(sharded[0], sparse_rows[0])
    np.testing.assert_array_equal(sharded[3], sparse_rows[3])


#: A Dense(0) layer's variables: one among float32 variables, one alone in its
#: (float16) group, whose shards hold 0 elements.
EMPTY = [((3, 2), F32), ((4, 0), F32), ((5,), F32), ((0,), F16)]


def _empty_run(strategy, name, shard, w0, grads):
    with strategy.scope():
        variables = [tf.Variable(w) for w in w0]
        opt = optimizers.get(name, learning_rate=0.1, shard_state=shard, **OP_BY_OP)

    @tf.function
    def step(gs):
        strategy.run(lambda: opt.apply_gradients(zip(gs, variables)))

    for gs in grads:
        step([tf.constant(g) for g in gs])
    return opt, variables


def _assert_same_slots(opt, variables, want_opt, want_vars, exact=True):
    for i, (v, u) in enumerate(zip(variables, want_vars, strict=True)):
        want_slots = want_opt.slots(u)
        for key, s in opt.slots(v).items():
            got, want = s.numpy(), want_slots[key].numpy()
            assert (got.shape, got.dtype) == (want.shape, want.dtype), (i, key)
            assert_same(got, want, f"var{i} {key}", exact)


@pytest.mark.parametrize("name", ["adam", "lamb"])
def test_empty_variables(name, tmp_path):
    """Variables of 0 elements: the others' update is the unsharded one,
    the empty slots read as empty, and a checkpoint restores unsharded and
    on another number of replicas. Reading an empty slot (and so saving)
    failed (`tf.concat` of no pieces), and so did the step of a group of
    empty variables (`IndexError`)."""
    strategy = STRATEGIES[2]
    rng = np.random.default_rng(7)
    w0, *grads = (
        [rng.normal(size=s).astype(d.as_numpy_dtype) for s, d in EMPTY]
        for _ in range(3)
    )
    opt, variables = _empty_run(strategy, name, True, w0, grads)
    want_opt, want_vars = _empty_run(strategy, name, False, w0, grads)
    exact = name not in harness.LAYERWISE
    for i, (v, u) in enumerate(zip(variables, want_vars)):
        for copy in local_copies(strategy, v):
            assert_same(copy, u.numpy(), f"var{i}", exact)
    _assert_same_slots(opt, variables, want_opt, want_vars, exact)

    path = tf.train.Checkpoint(opt=opt).save(str(tmp_path / "c"))
    for other, shard in ((tf.distribute.get_strategy(), False), (STRATEGIES[4], True)):
        with other.scope():
            again = [tf.Variable(w) for w in w0]
            restored = optimizers.get(name, shard_state=shard, **OP_BY_OP)
            restored.build(again)
        assert (restored._sharded_slots is not None) == shard
        tf.train.Checkpoint(opt=restored).restore(
            path
        ).assert_existing_objects_matched()
        _assert_same_slots(restored, again, opt, variables)


def test_a_sharded_slot_reads_as_the_unsharded_slot_variable_does():
    """`np.asarray`, `tf.convert_to_tensor`, a TensorFlow op (eagerly and in
    a function), `read_value()` and `value()` give the whole slot, as they
    do on the unsharded slot's variable. `np.asarray` gave a 0-d object
    array, in silence; the others raised."""
    strategy = STRATEGIES[2]
    rng = np.random.default_rng(3)
    w0, *grads = ([rng.normal(size=(5, 3)).astype(np.float32)] for _ in range(3))
    opt, (v,) = _empty_run(strategy, "adam", True, w0, grads)
    want_opt, (u,) = _empty_run(strategy, "adam", False, w0, grads)
    for key, view in opt.slots(v).items():
        want = want_opt.slots(u)[key]
        assert isinstance(view, dist.LogicalState), key
        reads = {
            "asarray": np.asarray(view),
            "asarray_float64": np.asarray(view, np.float64),
            "convert_to_tensor": tf.convert_to_tensor(view).numpy(),
            "read_value": view.read_value().numpy(),
            "value": view.value().numpy(),
        }
        for how, got in reads.items():
            assert got.shape == (5, 3), (key, how)
            np.testing.assert_array_equal(got, want.numpy(), err_msg=f"{key} {how}")
        assert reads["asarray_float64"].dtype == np.float64
        assert float(tf.norm(view)) == float(tf.norm(want)), key
        assert float(tf.function(lambda s: tf.norm(s))(view)) == float(
            tf.function(lambda s: tf.norm(s))(want)
        ), key
        # Never cast by a conversion, as for the variable.
        for x in (want, view):
            with pytest.raises((ValueError, TypeError)):
                tf.convert_to_tensor(x, tf.float64)


# --- 4. Checkpoints independent of N ---------------------------------------------

CKPT = [("adagrad", True), ("lamb", True)]
SPLIT = 10


def _fresh(strategy, shard, value=7.0):
    """New optimizers and variables (of other values than saved) for CKPT."""
    params = harness.problem(strategy.num_replicas_in_sync)[0]
    with strategy.scope():
        return {
            (name, True): (
                harness.make(name, shard_state=shard, **OP_BY_OP),
                [tf.Variable(np.full_like(p, value)) for p in params],
            )
            for name, _ in CKPT
        }


def _checkpoint(state):
    return tf.train.Checkpoint(
        opts=[state[e][0] for e in CKPT], params=[state[e][1] for e in CKPT]
    )


def _saved_on_4(directory):
    """Steps 1-10 sharded on Mirrored(4), saved as the trainer saves."""
    runs = harness.train(STRATEGIES[4], CKPT, stop=SPLIT, **OP_BY_OP)
    state = {e: runs[e][1:] for e in CKPT}
    writer = checkpoints.CheckpointWriter(
        _checkpoint(state), str(directory), chief=True, worker_id=0, keep=2
    )
    writer.save(SPLIT)
    return checkpoints.newest_loadable(str(directory), chief=True), state


def _continue_and_compare(strategy, state, single_device):
    runs = harness.train(strategy, CKPT, start=SPLIT, state=state)
    for e in CKPT:
        want = single_device[e[0]][0][SPLIT:]
        exact = e[0] not in harness.LAYERWISE
        assert_trajectories(runs[e][0], want, e, exact, first_step=SPLIT + 1)
        assert int(state[e][0].iterations.numpy()) == harness.STEPS


def test_checkpoint_from_4_sharded_continues_anywhere(single_device, tmp_path):
    """Saved on 4 sharded replicas (the trainer's writer), restored on 2
    sharded, 1 and 2 unsharded, and that unsharded state saved again and
    restored on 4 sharded: each continues as the run that never stopped."""
    path, saved = _saved_on_4(tmp_path / "ckpt4")

    # On 2 sharded replicas, restored before the optimizer is built, which it
    # then does lazily, inside the first step's tf.function.
    state = _fresh(STRATEGIES[2], shard=True)
    _checkpoint(state).restore(path)
    _continue_and_compare(STRATEGIES[2], state, single_device)

    for strategy, shard in (
        (tf.distribute.get_strategy(), True),
        (STRATEGIES[2], False),
    ):
        state = _fresh(strategy, shard)
        with strategy.scope():
            for opt, variables in state.values():
                opt.build(variables)
        _checkpoint(state).restore(path).assert_existing_objects_matched()
        for e in CKPT:  # every slot whole, as saved
            for v, u in zip(state[e][1], saved[e][1]):
                for key, s in state[e][0].slots(v).items():
                    np.testing.assert_array_equal(
                        s.numpy(), saved[e][0].slots(u)[key].numpy(), err_msg=key
                    )
        if not shard:
            # An unsharded save: the same keys and shapes as the sharded one.
            other = _checkpoint(state).save(str(tmp_path / "unsharded"))
            assert tf.train.list_variables(other) == tf.train.list_variables(path)
        _continue_and_compare(strategy, state, single_device)

    back = _fresh(STRATEGIES[4], shard=True, value=-3.0)
    with STRATEGIES[4].scope():
        for opt, variables in back.values():
            opt.build(variables)
    _checkpoint(back).restore(other).assert_existing_objects_matched()
    _continue_and_compare(STRATEGIES[4], back, single_device)


# --- 5. Memory --------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_state_bytes_per_device_divide_by_n(n):
    """Adam with amsgrad and a moving average (4 slots), float32 and float16
    variables (2 groups, float32 slots): per device, sharded slot bytes are
    the unsharded ones / n, plus under one element per group and slot."""
    strategy = STRATEGIES[n]
    shapes = [*harness.SHAPES, (5,)]
    dtypes = [F32] * len(harness.SHAPES) + [F16]
    got = {}
    for shard in (True, False):
        with strategy.scope():
            variables = [tf.Variable(tf.zeros(s, d)) for s, d in zip(shapes, dtypes)]
            opt = optimizers.Adam(amsgrad=True, use_ema=True, shard_state=shard)
            opt.build(variables)
        got[shard] = opt.state_bytes_per_device()
    # Read from the devices the copies live on: the n replicas' own.
    assert sorted(got[True]) == sorted(got[False])
    assert sorted(got[True]) == sorted(strategy.extended.worker_devices)
    slots, elements = 4, [61, 5]  # per group
    whole = 4 * slots * sum(elements)
    shard = 4 * slots * sum(-(-e // n) for e in elements)
    for device in got[True]:
        # The counters are the same on both sides; the slots shrink by this:
        assert got[False][device] - got[True][device] == whole - shard
        assert whole / n <= shard <= whole / n + 4 * slots * len(elements)


# --- 6. TensorFlow's checkpoint hooks ------------------------------------------------


class _Doubled(dist.LogicalState):
    """A logical value of twice what one variable holds, to tell them apart."""

    def __init__(self):
        super().__init__(name="doubled")
        self._var = dist.Untracked(tf.Variable([1.0, 2.0]))
        self.serialized = self.restored = 0

    dtype = tf.float32

    def storage_variables(self):
        return [self._var.value]

    def logical_value(self):
        self.serialized += 1
        return 2 * self._var.value

    def assign_logical(self, value):
        self.restored += 1
        self._var.value.assign(value / 2)


def test_tensorflow_calls_the_logical_state_hooks(tmp_path):
    """If TensorFlow stopped calling `_serialize_to_tensors` and
    `_restore_from_tensors`, sharded slots would silently not be saved."""
    probe = _Doubled()
    path = tf.train.Checkpoint(state=probe).save(str(tmp_path / "c"))
    assert probe.serialized >= 1
    key = "state/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(
        tf.train.load_checkpoint(path).get_tensor(key), [2, 4]
    )
    again = _Doubled()
    tf.train.Checkpoint(state=again).restore(path).assert_consumed()
    assert again.restored == 1
    np.testing.assert_array_equal(again._var.value.numpy(), [1, 2])
    # Interchangeable with a plain variable at the same path, both ways.
    plain = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(state=plain).restore(path).assert_consumed()
    np.testing.assert_array_equal(plain.numpy(), [2, 4])
    plain.assign([6.0, 8.0])
    other = tf.train.Checkpoint(state=plain).save(str(tmp_path / "p"))
    tf.train.Checkpoint(state=again).restore(other).assert_consumed()
    np.testing.assert_array_equal(again._var.value.numpy(), [3, 4])


# --- 7. Eagerly, after another strategy's collectives ------------------------------
# In tests/strategies_worker.py ("sharded"), checked by
# tests/test_many_strategies.py: that process runs collectives on a
# default-ops MirroredStrategy first, which this test process must not do.


# --- 8. Keras -------------------------------------------------------------------------


def _keras_model(strategy, shard):
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])
        model.compile(
            optimizer=distopt.keras.wrap(
                optimizers.Adam(0.05, shard_state=shard, **OP_BY_OP)
            ),
            loss="mse",
            jit_compile=False,
        )
    return model


def test_keras_fit_and_save_keep_the_sharded_state(tmp_path):
    strategy = STRATEGIES[2]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = rng.normal(size=(32, 5)).astype(np.float32)
    models = {}
    for shard in (True, False):
        models[shard] = _keras_model(strategy, shard)
        models[shard].fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    sharded, plain = models[True], models[False]
    inner = sharded.optimizer.distopt_optimizer
    assert inner._sharded_slots is not None
    for a, b in zip(sharded.trainable_weights, plain.trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    views = [s for s in inner.state_variables() if isinstance(s, dist.LogicalState)]
    assert len(views) == 2 * len(sharded.trainable_weights)  # m and v
    path = str(tmp_path / "model.keras")
    sharded.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path)
    again = loaded.optimizer.distopt_optimizer
    assert again._sharded_slots is not None
    for a, b in zip(inner.state_variables(), again.state_variables()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # On one device the same optimizer is not sharded (one replica): its
    # state, in the same file, goes to the same slots (`state_variables` is
    # in one order whether the slots are views or variables).
    single = keras.models.load_model(path)
    alone, plain_inner = (
        single.optimizer.distopt_optimizer,
        plain.optimizer.distopt_optimizer,
    )
    assert alone._sharded_slots is None
    assert int(alone.iterations.numpy()) == int(inner.iterations.numpy())
    for v, u in zip(alone.built_variables(), plain_inner.built_variables()):
        np.testing.assert_array_equal(v.numpy(), u.numpy())
        for key, s in alone.slots(v).items():
            np.testing.assert_array_equal(s.numpy(), plain_inner.slots(u)[key].numpy())


@pytest.mark.parametrize(
    "kwargs",
    [
        lambda: {"compression": "topk"},
        lambda: {"shard_state": True},
        lambda: {"sync": distopt.sync.Accumulate(2)},
    ],
    ids=["topk", "sharded", "accumulate"],
)
def test_a_saved_model_holds_the_views_as_a_checkpoint_does(tmp_path, kwargs):
    """`tf.saved_model.save` of a module holding an optimizer whose state is
    in `LogicalState` views (residuals, sharded slots, accumulator rows)
    raised a TypeError from the views' restore hook; it now saves, serves,
    and holds each value under the key and value a checkpoint has, which
    restores the optimizer on another replica count."""
    strategy = mirrored(2)
    rng = np.random.default_rng(5)
    with strategy.scope():
        root = tf.Module()
        root.w = tf.Variable(rng.normal(size=(4, 4)).astype(np.float32))
        root.opt = optimizers.Adam(1e-2, **kwargs())
        root.opt.build([root.w])
    root.f = tf.function(
        lambda x: x @ root.w, input_signature=[tf.TensorSpec([None, 4])]
    )
    views = [m for m in root.opt.submodules if isinstance(m, dist.LogicalState)]
    assert views
    for v in views:
        v.assign(rng.normal(size=v.shape).astype(v.dtype.as_numpy_dtype))
    tf.saved_model.save(root, str(tmp_path / "sm"))
    x = tf.constant(rng.normal(size=(2, 4)).astype(np.float32))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    np.testing.assert_array_equal(loaded.f(x), root.f(x))
    ckpt = tf.train.Checkpoint(w=root.w, opt=root.opt).write(str(tmp_path / "c"))
    saved = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    want = tf.train.load_checkpoint(ckpt)
    keys = [k for k in want.get_variable_to_shape_map() if k.startswith(("w/", "opt/"))]
    # The views' own keys among them (slots, residuals, accumulator rows).
    held = [k for k in keys if any(n in k for n in ("_slots/", "residual", "accum"))]
    assert len(held) >= len(views), keys
    for key in keys:
        np.testing.assert_array_equal(saved.get_tensor(key), want.get_tensor(key), key)
    with tf.distribute.get_strategy().scope():
        w = tf.Variable(tf.zeros((4, 4)))
        opt = optimizers.Adam(1e-2, **kwargs())
        opt.build([w])
    tf.train.Checkpoint(w=w, opt=opt).read(
        str(tmp_path / "sm" / "variables" / "variables")
    ).assert_existing_objects_matched()
    np.testing.assert_array_equal(w.numpy(), root.w.numpy())


def test_a_restore_traced_into_a_function_assigns_when_it_runs():
    """TensorFlow traces a checkpoint's restore into a function when it spans
    devices or tasks: the restored value then exists only in that graph (it
    raised "out of scope" from `tf.init_scope`); an eager value is still
    assigned eagerly (`test_checkpoint_from_4_sharded_continues_anywhere`, restored
    before a lazy build in the first step's function)."""
    strategy = mirrored(2)
    with strategy.scope():
        w = tf.Variable(tf.zeros((3, 5)))
        opt = optimizers.Adam(1e-2, shard_state=True)
        opt.build([w])
    view = opt.slots(w)["m"]
    value = np.arange(15, dtype=np.float32).reshape(3, 5)

    @tf.function
    def restore():
        view._restore_from_tensors({"VARIABLE_VALUE": tf.constant(value)})

    restore()
    np.testing.assert_array_equal(view.numpy(), value)
