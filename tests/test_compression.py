"""Gradient compression with error feedback (issue 25), against NumPy references.

Every compressor is followed replica by replica against
`tests/numpy_reference.py` (`ef_sgd`, written from the papers), through
`tests/compression_harness.py`, which feeds each replica its own gradient as
data. Plain gradient descent tests the scale (Adam would hide a wrong one).
"""

import logging

import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from compression_harness import (
    COMPRESSORS,
    DECAYED,
    SHAPES,
    check_chained,
    check_run,
    gradients,
    initial_params,
    make_optimizer,
    reference,
    run,
    setup,
    shares_of,
    snapshot,
)
from conftest import local_copies, mirrored

import distopt
from distopt.compression import powersgd

LR = 0.1
M2 = mirrored(2)


# --- Each compressor against its reference, replica by replica ------------------


@pytest.mark.parametrize("num_replicas", [2, 4])
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_matches_reference_replica_by_replica(compressor, num_replicas):
    """20 steps, each replica with its own gradient, against `ef_sgd`.

    Every step: what each replica hands to the collectives and what it
    receives (the payload), each replica's residual row, PowerSGD's Q, the
    update and `w - w0`, identical copies on every replica, and the bytes
    each replica sent (`bytes_sent`) equal to the reference's payload size.
    """
    strategy = M2 if num_replicas == 2 else mirrored(4)
    grads = gradients(20, num_replicas, seed=num_replicas)
    params, opt = setup(strategy, lambda: make_optimizer(compressor, learning_rate=LR))
    q0 = snapshot(strategy, opt, params)["q"]
    _, _, _, records = run(strategy, opt, grads, params=params)
    shares = shares_of(grads)
    replicas = list(range(num_replicas))
    check_run(compressor, records, shares, initial_params(), LR, replicas, q0)
    if compressor != "powersgd":
        check_chained(compressor, records, shares, replicas)
        # What each replica receives grows with the replica count: R rows.
        counters = records[-1]["counters"]
        assert counters["allgather_bytes"] == num_replicas * counters["bytes_sent"]


@pytest.mark.parametrize("function", [True, False], ids=["function", "eager"])
@pytest.mark.parametrize("compressor", sorted(DECAYED))
def test_decayed_error_feedback_matches_reference(compressor, function):
    """SparseLoCo's residual decay (Sarfi et al. 2025), x_r = s_r + 0.5 e_r:
    6 steps on 2 replicas against `ef_sgd` with the same decay. Eagerly on
    a strategy made now, after M2 has run in this process (as users run)."""
    strategy = M2 if function else mirrored(2)
    grads = gradients(6, 2, seed=41)
    params, opt = setup(strategy, lambda: make_optimizer(compressor, learning_rate=LR))
    assert opt.compression.get_config()["error_feedback_decay"] == 0.5
    q0 = snapshot(strategy, opt, params)["q"]
    _, _, _, records = run(strategy, opt, grads, params=params, function=function)
    shares = shares_of(grads)
    check_run(compressor, records, shares, initial_params(), LR, [0, 1], q0)
    if not compressor.startswith("powersgd"):
        check_chained(compressor, records, shares, [0, 1])


def test_adam_row():
    # Adam is invariant to the gradient's scale, so it is a row, not the test
    # of the scale: the reference's aggregates through Keras's Adam rule.
    grads = gradients(5, 2, seed=5)
    params, _, _, records = run(
        M2, lambda: make_optimizer("topk", "adam", learning_rate=0.01), grads
    )
    want = check_chained("topk", records, shares_of(grads), [0, 1])
    final, _ = ref.run("adam", initial_params(), [w["aggregate"] for w in want], 0.01)
    for p, f in zip(params, final):
        np.testing.assert_allclose(p.numpy(), f, rtol=1e-4, atol=1e-6)


#: The optimizers that take gradients (SAM and Heun evaluate a loss: their
#: own test is test_sam_and_heun_compress_their_update_once).
GRADIENT_OPTIMIZERS = [
    n for n in distopt.optimizers.names() if n not in ("sam", "heun")
]


@pytest.mark.parametrize("name", GRADIENT_OPTIMIZERS)
def test_every_optimizer_takes_compression(name):
    """Every optimizer with `compression=OneBit()`, on gradients scaled sign
    sends exactly: each replica's share is 2^-(r+1) times a +-1 pattern, so
    its sign times its mean magnitude is the share itself. The compressed
    run then equals the uncompressed one bit for bit (weights and slots, on
    every replica), and every residual stays zero.
    """
    rng = np.random.default_rng(71)
    steps = [
        [
            [
                2.0 ** (1 - r) * np.sign(rng.normal(size=s)).astype(np.float32)
                for s in SHAPES
            ]
            for r in range(2)
        ]
        for _ in range(2)
    ]
    state = {}
    for compressed in (True, False):
        comp = distopt.compression.OneBit() if compressed else None
        params, opt, _, records = run(
            M2,
            lambda comp=comp: distopt.optimizers.get(
                name, learning_rate=LR, compression=comp, jit_compile=False
            ),
            steps,
            record=False,
        )
        slots = [s for p in params for s in opt.slots(p).values()]
        state[compressed] = [
            [np.asarray(c) for c in M2.experimental_local_results(v)]
            for v in [*params, *slots]
        ]
        if compressed:  # sent as 1 bit a sign, one all-gather a step
            assert records[-1]["counters"]["allgather_calls"] == len(steps)
            for residual in records[-1]["residual"]:
                np.testing.assert_array_equal(residual, 0.0)
    for i, (a, b) in enumerate(zip(state[True], state[False])):
        assert len(a) == 2
        for copy_a, copy_b in zip(a, b):
            np.testing.assert_array_equal(copy_a, copy_b, err_msg=f"{name} {i}")
        np.testing.assert_array_equal(a[0], a[1], err_msg=f"{name} {i}")


# --- Error feedback -------------------------------------------------------------


def test_error_feedback_fixes_scaled_sign():
    """Karimireddy et al. (2019): scaled sign without feedback stalls.

    Two replicas disagree on the first coordinate (targets +1 and -1), so
    their scaled signs disagree there and the sum of signs points away from
    the mean gradient in the others: without feedback the iterate stalls
    about 0.3 from the optimum of the averaged quadratic; with it, it
    converges (decaying rate, as in their analysis).
    """
    targets = np.array([[1.0, 0.0, 0.3, -0.2], [-1.0, 0.0, -0.1, 0.1]], np.float32)
    optimum = targets.mean(axis=0)

    def distance(error_feedback):
        with M2.scope():
            x = tf.Variable(np.full(4, 0.5, np.float32))
            opt = distopt.optimizers.GradientDescent(
                distopt.optimizers.schedules.ExponentialDecay(0.3, 1, 0.95),
                compression=distopt.compression.OneBit(error_feedback=error_feedback),
                jit_compile=False,
            )

        @tf.function
        def steps(n):
            def replica_fn():
                rid = tf.distribute.get_replica_context().replica_id_in_sync_group
                # The gradient of 0.5 * ||x - target_r||^2.
                opt.apply_gradients([x - tf.gather(targets, rid)], [x])

            for _ in tf.range(n):
                M2.run(replica_fn)

        steps(tf.constant(60))
        return np.linalg.norm(x.numpy() - optimum), opt

    with_feedback, opt = distance(True)
    assert set(opt.compression.residuals) == {"0"}
    without, opt = distance(False)
    assert opt.compression.residuals == {}
    assert with_feedback < 0.03, with_feedback
    assert without > 0.2, without


# --- Composition ------------------------------------------------------------------


@pytest.mark.parametrize(
    "aggregation,compressor", [("sum", "powersgd"), ("weighted_mean", "onebit")]
)
def test_aggregations_compress_the_normalised_share(aggregation, compressor):
    # The share is P_r / N: g_r for the sum, w_r g_r / sum(w) for the
    # weighted mean (uneven weights); the mean is the tests above.
    grads = gradients(6, 2, seed=11)
    weights = [[1.0, 3.0], [5.0, 2.0], [0.5, 0.25], [1.0, 1.0], [7.0, 1.0], [2.0, 6.0]]
    weighted = aggregation == "weighted_mean"
    params, opt = setup(
        M2,
        lambda: make_optimizer(compressor, learning_rate=0.05, aggregation=aggregation),
    )
    q0 = snapshot(M2, opt, params)["q"]
    _, _, _, records = run(
        M2, opt, grads, params=params, weights=weights if weighted else None
    )
    shares = shares_of(grads, weights, aggregation)
    check_run(
        compressor,
        records,
        shares,
        initial_params(),
        0.05,
        [0, 1],
        q0,
        weighted=weighted,
    )


def test_clipping_acts_on_the_decompressed_aggregate():
    grads = gradients(4, 2, seed=13)
    params, _, _, records = run(
        M2,
        lambda: make_optimizer(
            "topk", learning_rate=LR, clipnorm=0.3, global_clipnorm=0.4
        ),
        grads,
        record=False,
    )
    # The residuals hold the compression error only (the reference has no
    # clipping); clipping then acts on the sum every replica receives:
    # Keras's clipnorm per variable, then the global norm.
    want = check_chained("topk", records, shares_of(grads), [0, 1])
    w = [np.float64(p) for p in initial_params()]
    active = set()
    for step in want:
        g = []
        for a in step["aggregate"]:
            norm = np.linalg.norm(a)
            if norm > 0.3:
                active.add("clipnorm")
            g.append(a * min(1.0, 0.3 / norm))
        total = np.sqrt(sum(np.sum(x * x) for x in g))
        if total > 0.4:
            active.add("global")
        w = [p - LR * x * min(1.0, 0.4 / total) for p, x in zip(w, g)]
    assert active == {"clipnorm", "global"}  # both clip something here
    for p, want_p in zip(params, w):
        np.testing.assert_allclose(p.numpy(), want_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_nonfinite_step_is_skipped_with_residuals_and_q_untouched(compressor):
    grads = gradients(5, 2, seed=17)
    # One NaN on replica 1 at step 2, in an entry of small magnitude (top-k
    # would not pick it on its magnitude), and one Inf at step 3.
    grads[2][1][0][3, 4] = np.nan
    grads[3][0][1][0, 0, 0] = np.inf
    params, opt = setup(
        M2, lambda: make_optimizer(compressor, learning_rate=LR, skip_nonfinite=True)
    )
    q0 = snapshot(M2, opt, params)["q"]
    _, _, _, records = run(M2, opt, grads, params=params)
    assert int(opt.skipped_steps) == 2
    check_run(
        compressor,
        records,
        shares_of(grads),
        initial_params(),
        LR,
        [0, 1],
        q0,
        skip={2, 3},
    )


def test_invalid_weight_skips_with_residuals_and_q_untouched():
    grads = gradients(5, 2, seed=19)
    weights = [[1.0, 2.0], [-1.0, 2.0], [3.0, 1.0], [1.0, np.nan], [2.0, 2.0]]
    params, opt = setup(
        M2,
        lambda: make_optimizer(
            "powersgd", learning_rate=LR, aggregation="weighted_mean"
        ),
    )
    q0 = snapshot(M2, opt, params)["q"]
    _, _, _, records = run(M2, opt, grads, params=params, weights=weights)
    assert int(opt.invalid_weight_steps) == 2
    assert int(opt.skipped_steps) == 2
    shares = shares_of(grads, weights, "weighted_mean")
    check_run(
        "powersgd",
        records,
        shares,
        initial_params(),
        LR,
        [0, 1],
        q0,
        weighted=True,
        skip={1, 3},
    )


# --- A dynamic loss scale: the residuals follow the scale -----------------------

#: How the scale moves (initial scale 2^10): the LossScale's growth_steps and
#: the step whose scaled gradient overflows (or None).
SCALE_CHANGES = {
    # 1e37 is finite, times 2^10 it is Inf: step 2 is skipped, the scale halves.
    "halve": (1000, 2),
    # Two finite steps in a row: the scale doubles after steps 1, 3 and 5.
    "double": (2, None),
    # Halved after step 1, doubled after step 4.
    "both": (3, 1),
}


def numpy_scales(growth_steps, overflow, num_steps, initial=2.0**10):
    """The scale after each step (Keras's schedule), in plain Python."""
    scale, good, out = initial, 0, []
    for t in range(num_steps):
        if t == overflow:
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good == growth_steps:
                scale, good = scale * 2, 0
        out.append(scale)
    return out


def run_loss_scaled(
    strategy, compressor, change, function=True, record=True, micro=1, **kwargs
):
    """7 steps of `compressor` under a dynamic loss scale moving as `change` says.

    Args:
        micro: Micro-steps per step (with `sync=Accumulate(micro)`).

    Returns:
        (the records of the steps, each step's gradients (the mean over its
        micro-steps), the overflow step, the scales expected, PowerSGD's Q0).
    """
    growth_steps, overflow = SCALE_CHANGES[change]
    grads = gradients(7 * micro, 2, seed=29)
    if overflow is not None:
        grads[overflow * micro][1][0][3, 4] = 1e37
    params, opt = setup(
        strategy,
        lambda: make_optimizer(
            compressor,
            learning_rate=LR,
            loss_scale=distopt.transforms.LossScale(2.0**10, growth_steps=growth_steps),
            **kwargs,
        ),
    )
    q0 = snapshot(strategy, opt, params)["q"]
    _, _, _, records = run(
        strategy, opt, grads, params=params, function=function, record=record
    )
    assert int(opt.skipped_steps) == (overflow is not None)
    if micro > 1:
        # Float32 sums, then a power of two: as the accumulator rounds.
        grads = [
            [
                [
                    sum(grads[t + k][r][i] for k in range(micro)) / np.float32(micro)
                    for i in range(len(SHAPES))
                ]
                for r in range(2)
            ]
            for t in range(0, len(grads), micro)
        ]
        records = records[micro - 1 :: micro]
    return records, grads, overflow, numpy_scales(growth_steps, overflow, 7), q0


def check_true_units(compressor, records, grads, overflow, scales, q0):
    """The run against error feedback in true (unscaled) units, chained.

    `ef_sgd` on the loss's own shares, the overflowing step skipped (its
    residuals and Q kept, nothing applied): `w - w0` after every step, every
    replica's copy identical, and the state the run keeps in loss-scaled
    units (each replica's residual, PowerSGD's Q) divided by the scale.
    """
    skip = set() if overflow is None else {overflow}
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference(compressor, shares_of(grads), q0=q0, skip=skip)
    # PowerSGD's reference runs in float64: chained over 7 steps, the power
    # iteration takes the float32 run 2e-6 away (a lost rescale: 1e-2 and more).
    atol = 1e-5 if compressor == "powersgd" else 1e-6
    w0 = initial_params()
    total = [np.zeros(np.shape(w)) for w in w0]
    for t, (rec, ref_t) in enumerate(zip(records, want)):
        msg = f"{compressor} step {t}"
        assert [float(s) for s in rec["loss_scale"]] == [scales[t]] * 2, msg
        for i, w in enumerate(w0):
            copies = rec["params"][i]
            for c in copies[1:]:
                np.testing.assert_array_equal(c, copies[0], err_msg=msg)
            if t not in skip:
                total[i] += -LR * np.float64(ref_t["aggregate"][i])
            np.testing.assert_allclose(
                copies[0] - w, total[i], rtol=1e-4, atol=1e-5, err_msg=f"{msg} w - w0"
            )
            for key in ("residual", "q"):
                if ref_t[key][i] is not None:
                    np.testing.assert_allclose(
                        rec[key][i] / scales[t],
                        ref_t[key][i],
                        rtol=1e-4,
                        atol=atol,
                        err_msg=f"{msg} {key} {i}",
                    )


@pytest.mark.parametrize("change", ["halve", "double"])
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_residuals_follow_a_dynamic_loss_scale(compressor, change):
    """A halved (overflow) or doubled (growth) scale rescales every residual:
    the updates are those of compression in true units."""
    check_true_units(compressor, *run_loss_scaled(M2, compressor, change))


@pytest.mark.parametrize(
    "compressor, mode",
    [
        ("powersgd", "eager"),
        ("topk", "sharded_xla"),
        ("onebit", "sharded_xla"),
        ("topk", "accumulate"),
    ],
)
def test_residuals_follow_a_dynamic_loss_scale_eagerly_and_sharded(compressor, mode):
    """Halved, then doubled: eagerly on a strategy made after M2 ran; in a
    function with sharded slots (ZeRO-1) and XLA-compiled updates; and with
    `Accumulate(2)`, whose update (and rescale) runs in a tf.cond."""
    if mode == "eager":
        out = run_loss_scaled(mirrored(2), compressor, "both", function=False)
    elif mode == "accumulate":
        sync = distopt.sync.Accumulate(2)
        out = run_loss_scaled(M2, compressor, "both", record=False, micro=2, sync=sync)
    else:
        # Not recorded: the sharded update gathers inside a tf.cond.
        out = run_loss_scaled(
            M2, compressor, "both", record=False, shard_state=True, jit_compile=True
        )
    check_true_units(compressor, *out)


def _accumulate_windows(compressor, grads, given_at, k):
    """Runs Accumulate(k) with `compressor` on 2 replicas, GD, over `grads`
    (`[step][replica][variable]`), variables outside `given_at(t)` None at
    step t. Returns each variable's replica copies after each window, and
    the initial Q (PowerSGD's; None otherwise)."""
    params, opt = setup(
        M2,
        lambda: make_optimizer(
            compressor, learning_rate=LR, sync=distopt.sync.Accumulate(k)
        ),
    )
    q0 = snapshot(M2, opt, params)["q"]
    steps = {}

    def step_fn(given):
        def replica(g):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            opt.apply_gradients(
                [tf.gather(x, rid) if i in given else None for i, x in enumerate(g)],
                params,
            )

        return tf.function(lambda g: M2.run(replica, (g,)))

    after_window = []
    for t in range(len(grads)):
        given = frozenset(given_at(t))
        if given not in steps:
            steps[given] = step_fn(given)
        steps[given](
            [
                tf.constant(np.stack([grads[t][r][i] for r in range(2)]))
                for i in range(3)
            ]
        )
        if t % k == k - 1:
            after_window.append([local_copies(M2, p) for p in params])
    return after_window, q0


def _check_windows(compressor, grads, given_at, k, after_window, q0):
    """Each variable's update against `ef_sgd` on the windows where some step
    gave it a gradient (a None gradient adds nothing to its window), and
    every replica's copy identical."""
    for i, w0 in enumerate(initial_params()):
        had = [
            [
                [
                    sum(grads[t + j][r][i] for j in range(k) if i in given_at(t + j))
                    / np.float32(k)
                ]
                for r in range(2)
            ]
            for t in range(0, len(grads), k)
            if any(i in given_at(t + j) for j in range(k))
        ]
        steps = reference(compressor, shares_of(had), q0=[q0[i]])
        want = -LR * sum(np.float64(s["aggregate"][0]) for s in steps)
        copies = after_window[-1][i]
        np.testing.assert_array_equal(copies[1], copies[0])
        np.testing.assert_allclose(
            copies[0] - w0, want, rtol=1e-4, atol=1e-5, err_msg=f"variable {i}"
        )


@pytest.mark.parametrize("compressor", ["topk", "powersgd"])
def test_accumulate_leaves_a_variable_without_gradient_in_a_window(compressor):
    """A variable whose gradient is None in a whole `Accumulate` window is
    left as it is and keeps its residual (and Q), as a None gradient leaves
    it in every other mode: it moved by its compressed residual, which was
    spent. Against `ef_sgd` on the windows each variable had (2 replicas,
    GD, windows of 2; variable 0 absent from the second)."""
    k, absent = 2, 0
    grads = gradients(3 * k, 2, seed=73)

    def given_at(t):
        return {1, 2} if t // k == 1 else {0, 1, 2}

    after_window, q0 = _accumulate_windows(compressor, grads, given_at, k)
    np.testing.assert_array_equal(after_window[1][absent], after_window[0][absent])
    _check_windows(compressor, grads, given_at, k, after_window, q0)


@pytest.mark.parametrize("compressor", ["topk", "powersgd"])
def test_accumulate_applies_a_window_that_only_one_replica_filled(compressor):
    """A variable absent from a window's last step whose earlier gradient was
    zero on replica 0 and not on replica 1 (a sparse gradient that missed one
    replica's rows leaves that): one replica's buffer holds something, so
    the window is applied on both, as `ef_sgd` with replica 0's share zero.
    Deciding on one replica's buffer alone (the first's, or each its own)
    would drop replica 1's gradient or diverge the copies; on every
    replica's, it would drop it too."""
    k, partial = 2, 0
    grads = gradients(3 * k, 2, seed=79)
    grads[k][0][partial] = np.zeros_like(grads[k][0][partial])

    def given_at(t):
        return {1, 2} if t == 2 * k - 1 else {0, 1, 2}

    after_window, q0 = _accumulate_windows(compressor, grads, given_at, k)
    moved = after_window[1][partial][0] - after_window[0][partial][0]
    assert np.any(moved != 0), "the window replica 1 filled was not applied"
    _check_windows(compressor, grads, given_at, k, after_window, q0)


#: Loss scales (`loss_scale=`) before and after a resume: float16 turned
#: off and on; and the same scale from a checkpoint that has no record of it
#: (`state_scale` 0, as one written before the record existed).
SCALE_RESUMES = {
    "off": (2.0**10, None),
    "on": (None, "dynamic"),
    "unrecorded": (2.0**10, 2.0**10),
}


@pytest.mark.parametrize(
    "compressor, micro, resume",
    [
        ("topk", 1, "off"),
        ("powersgd", 1, "off"),
        ("onebit", 1, "off"),
        ("topk", 1, "on"),
        ("topk", 1, "unrecorded"),
        (None, 3, "off"),
        ("topk", 3, "on"),
    ],
)
def test_loss_scaled_state_follows_the_scale_across_a_resume(
    tmp_path, compressor, micro, resume
):
    """The residuals, Q and `Accumulate`'s buffers are kept in loss-scaled
    units. Resumed under another scale (mid-window with `Accumulate`), the
    run is error feedback (or accumulation) in true units throughout: a
    float16 run resumed without a loss scale read them 2^15 times too large
    (the trainer's float16 with top-k then ended at 31% accuracy)."""
    before, after = SCALE_RESUMES[resume]
    grads = gradients(4 * micro, 2, seed=71)
    saved_at = 2 * micro - (micro > 1)

    def make(loss_scale):
        sync = {"sync": distopt.sync.Accumulate(micro)} if micro > 1 else {}
        return lambda: make_optimizer(
            compressor, learning_rate=LR, loss_scale=loss_scale, **sync
        )

    params, opt = setup(M2, make(before))
    q0 = snapshot(M2, opt, params).get("q")
    run(M2, opt, grads[:saved_at], params=params, record=False)
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    params, opt = setup(M2, make(after))
    # The dropped (or missing) loss scale's variables are the point here.
    tf.train.Checkpoint(params=params, optimizer=opt).restore(path).expect_partial()
    if resume == "unrecorded":
        opt.state_scale.assign(0.0)
    run(M2, opt, grads[saved_at:], params=params, record=False)
    # Each update's gradient: the mean of its window's micro-steps.
    windows = [
        [
            [sum(grads[t + k][r][i] for k in range(micro)) / micro for i in range(3)]
            for r in range(2)
        ]
        for t in range(0, len(grads), micro)
    ]
    if compressor is None:
        aggregates = [
            [(np.float64(step[0][i]) + step[1][i]) / 2 for i in range(3)]
            for step in windows
        ]
    else:
        steps = reference(compressor, shares_of(windows), q0=q0)
        aggregates = [s["aggregate"] for s in steps]
    for i, w0 in enumerate(initial_params()):
        copies = local_copies(M2, params[i])
        np.testing.assert_array_equal(copies[1], copies[0])
        want = -LR * sum(np.float64(a[i]) for a in aggregates)
        np.testing.assert_allclose(
            copies[0] - w0, want, rtol=1e-4, atol=1e-5, err_msg=f"variable {i}"
        )


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_accumulate_resumed_mid_window_is_bit_for_bit(tmp_path, num_replicas):
    # Top-k selects from each replica's own buffer: a checkpoint that kept
    # only their sum (each replica resumed with 1/R of it) was 2e-2 off.
    strategy = M2 if num_replicas == 2 else mirrored(4)
    grads = gradients(8, num_replicas, seed=67)
    make = lambda: make_optimizer(
        "topk", name="adam", learning_rate=0.01, sync=distopt.sync.Accumulate(3)
    )
    params, opt, step_fn, _ = run(strategy, make, grads[:4], record=False)
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    _, _, _, straight = run(
        strategy, opt, grads[4:], params=params, record=False, step_fn=step_fn
    )
    params2, opt2 = setup(strategy, make)
    tf.train.Checkpoint(params=params2, optimizer=opt2).restore(path).assert_consumed()
    _, _, _, resumed = run(strategy, opt2, grads[4:], params=params2, record=False)
    for key in ("params", "residual"):
        for x, y in zip(straight[-1][key], resumed[-1][key]):
            np.testing.assert_array_equal(x, y, err_msg=key)


def test_accumulate_compresses_at_the_flush_only():
    k, steps = 2, 4
    grads = gradients(steps, 2, seed=23)
    params, _, _, records = run(
        M2,
        lambda: make_optimizer(
            "onebit", learning_rate=LR, sync=distopt.sync.Accumulate(k)
        ),
        grads,
        record=False,
    )
    # One all-gather per flush, none in between; the compressor ran twice.
    assert [r["counters"]["allgather_calls"] for r in records] == [0, 1, 1, 2]
    assert [r["steps"] for r in records] == [0, 1, 1, 2]
    assert records[-1]["counters"]["allreduce_calls"] == 0
    # A flush's share is the accumulated gradient over R * k: the mean of a
    # k-times-larger batch.
    flushes = [
        [
            [
                (grads[t][r][i] + grads[t + 1][r][i]) * np.float32(1 / (2 * k))
                for i in range(3)
            ]
            for r in range(2)
        ]
        for t in range(0, steps, k)
    ]
    want = ref.ef_sgd("onebit", flushes)
    for t, w in zip((1, 3), want):
        for i in range(3):
            np.testing.assert_allclose(
                records[t]["residual"][i], w["residual"][i], rtol=1e-5, atol=1e-6
            )
    total = [sum(w["aggregate"][i] for w in want) for i in range(3)]
    for p, w0, g in zip(params, initial_params(), total):
        np.testing.assert_allclose(p.numpy() - w0, -LR * g, rtol=1e-5, atol=1e-6)


def test_diloco_compresses_its_outer_gradient():
    """DiLoCo(k) with GradientDescent(1.0) outside: local SGD on the outer
    gradient `sum_r C((anchor - w_r) / R + e_r)`, with its own residuals."""
    k, steps, inner_lr = 2, 4, 0.1
    grads = gradients(steps, 2, seed=29)
    with M2.scope():
        # A float64 variable too: it travels uncompressed, in the all-reduce.
        params = [tf.Variable(p) for p in initial_params()]
        params.append(tf.Variable(np.arange(3.0)))
        opt = make_optimizer(
            "topk",
            learning_rate=inner_lr,
            sync=distopt.sync.DiLoCo(
                k, outer_optimizer=distopt.optimizers.GradientDescent(1.0)
            ),
        )
    f64 = [[[np.full(3, r + t, np.float64)] for r in range(2)] for t in range(steps)]
    grads = [[g + f for g, f in zip(gt, ft)] for gt, ft in zip(grads, f64)]
    run(M2, opt, grads, params=params, record=False)
    outer = opt.sync.outer_compression
    assert opt.compression.steps.numpy() == 0  # the inner one never ran
    assert int(outer.steps) == steps // k
    counters = opt.reducer.counters()
    assert counters["allgather_calls"] == steps // k  # one per outer step
    # The float64 variable's weights, once per outer step; nothing else.
    assert counters["allreduce_calls"] == steps // k
    # Per outer step: top-k values and indices of 18 + 9 + 1 entries (of
    # 180 + 84 + 5: 1076 bytes uncompressed), and the float64 vector whole.
    assert counters["bytes_sent"] == steps // k * (4 * 2 * (18 + 9 + 1) + 8 * 3)
    # Reference: each replica's local GD, then the compressed outer step.
    anchor = [np.float32(p) for p in initial_params()] + [np.arange(3.0)]
    residual = None
    for t0 in range(0, steps, k):
        local = [
            [
                a - inner_lr * sum(grads[t][r][i] for t in range(t0, t0 + k))
                for i, a in enumerate(anchor)
            ]
            for r in range(2)
        ]
        shares = [
            [(anchor[i] - local[r][i]) * np.float32(0.5) for i in range(3)]
            for r in range(2)
        ]
        (w,) = ref.ef_sgd("topk", [shares], fraction=0.1, residual0=residual)
        residual = w["residual"]
        anchor = [a - g for a, g in zip(anchor, w["aggregate"])] + [
            np.mean([local[r][3] for r in range(2)], axis=0)
        ]
    for i, (p, a) in enumerate(zip(params, anchor)):
        for copy in M2.experimental_local_results(p):
            np.testing.assert_allclose(
                copy.numpy(), a, rtol=1e-5, atol=1e-6, err_msg=str(i)
            )
    # `residual` by the anchors (the README's accessor); the float64 one has none.
    for i in range(3):
        np.testing.assert_allclose(
            outer.residual(opt.sync.anchors[i]).numpy(),
            residual[i],
            rtol=1e-5,
            atol=1e-6,
        )
    assert outer.residual(opt.sync.anchors[3]) is None


@pytest.mark.parametrize(
    "outer, compressor, warns",
    [
        (None, distopt.compression.TopK(0.1), True),  # Nesterov(0.7, 0.9)
        ("momentum_0.5", distopt.compression.PowerSGD(), True),
        ("gd", distopt.compression.TopK(0.1), False),
        ("momentum_0", distopt.compression.TopK(0.1), False),
        (None, distopt.compression.TopK(0.1, error_feedback=False), False),
        (None, distopt.compression.TopK(0.1, error_feedback_decay=0.5), False),
    ],
)
def test_diloco_warns_of_error_feedback_behind_outer_momentum(
    outer, compressor, warns, caplog
):
    """Together they trained worse than either alone (README, "DiLoCo: error
    feedback or outer momentum, not both"): said once, at build; each way
    out (no momentum, no error feedback, a decayed residual) says nothing."""
    outers = {
        None: None,
        "momentum_0.5": distopt.optimizers.Momentum(1.0, 0.5),
        "gd": distopt.optimizers.GradientDescent(1.0),
        "momentum_0": distopt.optimizers.Momentum(1.0, 0.0),
    }
    with M2.scope():
        params = [tf.Variable(p) for p in initial_params()]
        opt = make_optimizer(
            compressor, sync=distopt.sync.DiLoCo(2, outer_optimizer=outers[outer])
        )
    with caplog.at_level(logging.WARNING, logger="absl"), M2.scope():
        opt.build(params)
    said = [r.getMessage() for r in caplog.records if "DiLoCo" in r.getMessage()]
    assert len(said) == int(warns), said
    if warns:
        momentum = 0.9 if outer is None else 0.5
        assert said[0].startswith(
            f"DiLoCo with compression {compressor.name!r}: error feedback behind "
            f"the outer optimizer's momentum ({momentum:g})"
        ), said[0]


def test_sparse_gradients_travel_uncompressed():
    # An embedding's IndexedSlices gradient goes in the sparse all-gather,
    # uncompressed, its residual left at zero; the dense one is compressed.
    grads = gradients(3, 2, seed=31, shapes=[(15, 12)])
    rows = np.random.default_rng(3).normal(size=(3, 2, 2, 4)).astype(np.float32)
    indices = np.array([[[1, 7], [7, 9]], [[0, 2], [3, 2]], [[5, 6], [6, 5]]], np.int32)
    table0 = np.random.default_rng(4).normal(size=(10, 4)).astype(np.float32)
    with M2.scope():
        w = tf.Variable(initial_params()[0])
        table = tf.Variable(table0)
        opt = make_optimizer("topk", learning_rate=LR)
        opt.build([w, table])

    @tf.function
    def step(g, values, idx):
        def replica_fn(g, values, idx):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            sparse = tf.IndexedSlices(values[r], idx[r], tf.constant([10, 4]))
            opt.apply_gradients([g[r], sparse], [w, table])

        M2.run(replica_fn, args=(g, values, idx))

    for t in range(3):
        step(
            tf.constant(np.stack([grads[t][r][0] for r in range(2)])),
            rows[t],
            indices[t],
        )
    want = ref.ef_sgd("topk", shares_of(grads), fraction=0.1)
    np.testing.assert_allclose(
        w.numpy() - initial_params()[0],
        -LR * sum(s["aggregate"][0] for s in want),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = table0.astype(np.float64)
    for t in range(3):
        for r in range(2):
            np.add.at(expected, indices[t, r], -LR * rows[t, r] / 2)
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(opt.compression.residuals["1"].numpy(), 0.0)
    counters = opt.reducer.counters()
    assert counters["allgather_calls"] == 3  # the dense top-k only
    # The sparse all-gathers: every replica's 2 rows of 4 floats plus an
    # int32 index each, per step.
    assert counters["allreduce_bytes"] == 3 * 2 * 2 * (4 * 4 + 4)


def _quadratic_targets(num_replicas, seed):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=s).astype(np.float32) for s in SHAPES]
        for _ in range(num_replicas)
    ]


@pytest.mark.parametrize("method", ["sam", "heun"])
def test_sam_and_heun_compress_their_update_once(method):
    """Replica r's loss is 0.5 ||p - c_r||^2, so its gradient is p - c_r.

    SAM ("aggregated"): e = rho * g / ||g|| from the uncompressed mean g,
    then each replica's gradient at p + e is compressed. Heun: the trial
    point p - lr * mean(g1), uncompressed; then each replica's (g1 + g2) / 2
    is compressed. One compression (one all-gather) and one plain
    all-reduce per step.
    """
    steps, rho = 3, 0.05
    targets = _quadratic_targets(2, seed=37)
    with M2.scope():
        params = [tf.Variable(p) for p in initial_params()]
        compressor = distopt.compression.OneBit()
        if method == "sam":
            base = distopt.optimizers.GradientDescent(
                LR, compression=compressor, jit_compile=False
            )
            opt = distopt.optimizers.SAM(base, rho=rho, perturbation="aggregated")
        else:
            opt = base = distopt.optimizers.Heun(
                LR, compression=compressor, jit_compile=False
            )
        opt.build(params)
    c = [tf.constant(np.stack([targets[r][i] for r in range(2)])) for i in range(3)]

    @tf.function
    def step():
        def replica_fn():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            loss = lambda: sum(
                0.5 * tf.reduce_sum(tf.square(p - ci[r])) for p, ci in zip(params, c)
            )
            opt.minimize(loss, params)

        M2.run(replica_fn)

    for _ in range(steps):
        step()
    counters = base.reducer.counters()
    assert counters["allgather_calls"] == steps
    assert counters["allreduce_calls"] == steps
    assert int(compressor.steps) == steps
    # Reference, chained in float32.
    p = [np.float32(x) for x in initial_params()]
    residual = None
    for _ in range(steps):
        g1 = [[p[i] - targets[r][i] for i in range(3)] for r in range(2)]
        mean = [(g1[0][i] + g1[1][i]) / 2 for i in range(3)]
        if method == "sam":
            norm = np.sqrt(sum(np.sum(np.float64(m) ** 2) for m in mean))
            e = [np.float32(rho / norm) * m for m in mean]
            update = [[p[i] + e[i] - targets[r][i] for i in range(3)] for r in range(2)]
        else:
            trial = [p[i] - np.float32(LR) * mean[i] for i in range(3)]
            g2 = [[trial[i] - targets[r][i] for i in range(3)] for r in range(2)]
            update = [[(g1[r][i] + g2[r][i]) / 2 for i in range(3)] for r in range(2)]
        shares = [[u * np.float32(0.5) for u in update[r]] for r in range(2)]
        (w,) = ref.ef_sgd("onebit", [shares], residual0=residual)
        residual = w["residual"]
        p = [x - np.float32(LR) * a for x, a in zip(p, w["aggregate"])]
    for var, want in zip(params, p):
        np.testing.assert_allclose(var.numpy(), want, rtol=1e-5, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(
            compressor.residual(params[i]).numpy(), residual[i], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("sync", ["local_sgd", "hierarchical"])
def test_weight_averaging_modes_refuse_compression(sync):
    with pytest.raises(ValueError) as e:
        distopt.optimizers.get(
            "gradient_descent",
            learning_rate=0.1,
            sync=distopt.sync.get(sync, k=2),
            compression="topk",
        )
    message = str(e.value)
    assert message.startswith("compression:") and "\n" not in message
    assert sync in message


# --- State --------------------------------------------------------------------------


def test_residual_is_none_where_nothing_is_kept_and_refuses_what_it_does_not_know():
    with M2.scope():
        params = [tf.Variable(p) for p in initial_params()]
        other = tf.Variable([1.0, 2.0])
        with_ef = make_optimizer(distopt.compression.TopK(0.5), learning_rate=LR)
        without = make_optimizer(
            distopt.compression.TopK(0.5, error_feedback=False), learning_rate=LR
        )
    with pytest.raises(ValueError, match=r"^residual: topk is not built yet"):
        with_ef.compression.residual(params[0])
    with M2.scope():
        with_ef.build(params)
        without.build(params)
    with pytest.raises(ValueError, match=r"^residual: topk is built for other"):
        with_ef.compression.residual(other)
    with pytest.raises(ValueError, match=r"^residual: .* got 'w'"):
        with_ef.compression.residual("w")
    # Built, before any step: every replica's row, all zeros.
    rows = with_ef.compression.residual(params[1])
    assert rows.shape == (2, *params[1].shape)
    np.testing.assert_array_equal(rows.numpy(), 0.0)
    assert without.compression.residual(params[1]) is None


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path):
    grads = gradients(6, 2, seed=41)
    make = lambda: make_optimizer("powersgd", learning_rate=LR)
    params, opt = setup(M2, make)
    _, _, step_fn, _ = run(M2, opt, grads[:3], params=params, record=False)
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    _, _, _, straight = run(
        M2, opt, grads[3:], params=params, record=False, step_fn=step_fn
    )
    # Fresh objects: their Q is the first step's, their residuals zero, so
    # that only a restore of everything makes the runs agree.
    params2, opt2 = setup(M2, make)
    checkpoint = tf.train.Checkpoint(params=params2, optimizer=opt2)
    checkpoint.restore(path).assert_consumed()
    _, _, _, resumed = run(M2, opt2, grads[3:], params=params2, record=False)
    for a, b in zip(straight, resumed):
        for key in ("params", "residual", "q"):
            for x, y in zip(a[key], b[key]):
                np.testing.assert_array_equal(x, y, err_msg=key)
        assert a["steps"] == b["steps"]
    assert straight[-1]["steps"] == resumed[-1]["steps"] == 6
    assert np.any(straight[-1]["residual"][0] != 0)


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_a_restore_before_the_first_step_continues_in_a_function(tmp_path, compressor):
    # A notebook's order: fresh objects, restore, then train in a
    # tf.function, which builds the optimizer inside its trace (deferred
    # restoration). It failed: "Input to reshape is a tensor with 0 values".
    grads = gradients(5, 2, seed=59)
    make = lambda: make_optimizer(compressor, learning_rate=LR)
    params, opt, step_fn, _ = run(M2, make, grads[:2], record=False)
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    _, _, _, straight = run(
        M2, opt, grads[2:], params=params, record=False, step_fn=step_fn
    )
    with M2.scope():
        params2 = [tf.Variable(p, name=f"v{i}") for i, p in enumerate(initial_params())]
        opt2 = make()
    status = tf.train.Checkpoint(params=params2, optimizer=opt2).restore(path)

    @tf.function
    def step(g):
        def replica_fn(g):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            opt2.apply_gradients([x[r] for x in g], params2)

        M2.run(replica_fn, args=(g,))

    for t in range(2, 5):
        step(
            [
                tf.constant(np.stack([grads[t][r][i] for r in range(2)]))
                for i in range(3)
            ]
        )
    status.assert_consumed()
    resumed = snapshot(M2, opt2, params2)
    for key in ("params", "residual", "q"):
        for x, y in zip(straight[-1][key], resumed[key]):
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert resumed["steps"] == 5


def _owed_notes(caplog):
    return [r for r in caplog.records if "still owed" in r.getMessage()]


def test_another_replica_count_starts_from_the_residuals_sum(tmp_path, caplog):
    """Saved on 2 replicas, resumed on 4: every replica starts with the saved
    rows' sum / 4, which keeps what is still owed (sum_r e_r), then the run
    follows the reference from there; one log line for all residuals."""
    make = lambda: make_optimizer("topk", learning_rate=LR)
    params, opt, _, records = run(M2, make, gradients(2, 2, seed=43), record=False)
    saved = records[-1]["residual"]
    assert all(r is None or np.any(r != 0) for r in saved)
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    m4 = mirrored(4)
    params4, opt4 = setup(m4, make)
    with caplog.at_level(logging.INFO):
        tf.train.Checkpoint(params=params4, optimizer=opt4).restore(
            path
        ).assert_consumed()
    notes = _owed_notes(caplog)
    assert len(notes) == 1, [r.getMessage() for r in notes]
    assert "2 replicas" in notes[0].getMessage() and "sum / 4" in notes[0].getMessage()
    start = [
        None if r is None else np.repeat(r.sum(axis=0, keepdims=True) / 4, 4, axis=0)
        for r in saved
    ]
    for i, want in enumerate(start):
        if want is not None:
            np.testing.assert_array_equal(
                opt4.compression.residuals[str(i)].numpy(), want
            )
    w0 = [p.numpy() for p in params4]
    np.testing.assert_array_equal(w0[0], params[0].numpy())
    assert int(opt4.compression.steps) == 2
    # Two more steps on 4 replicas, against `ef_sgd` started from those rows.
    grads4 = gradients(2, 4, seed=45)
    _, _, _, after = run(m4, opt4, grads4, params=params4, record=False)
    steps = reference("topk", shares_of(grads4), residual0=start)
    for i in range(len(w0)):
        update = -LR * (steps[0]["aggregate"][i] + steps[1]["aggregate"][i])
        for r in range(4):
            np.testing.assert_allclose(
                after[-1]["params"][i][r] - w0[i], update, rtol=1e-5, atol=1e-7
            )
        if start[i] is not None:
            np.testing.assert_allclose(
                after[-1]["residual"][i], steps[1]["residual"][i], rtol=1e-5, atol=1e-7
            )


@pytest.mark.parametrize("name", ["powersgd", "topk", "onebit"])
def test_a_checkpoint_restores_under_the_default_strategy(tmp_path, caplog, name):
    # The trainer's default strategy, a notebook's evaluation on one device
    # and Keras's load_model outside any scope restore here. Compression is
    # off with one replica: the residuals' sum is carried as it is, for a
    # later run on more replicas, through steps and a save.
    default = tf.distribute.get_strategy()
    make = lambda: make_optimizer(name, learning_rate=LR)
    params, opt, _, records = run(M2, make, gradients(2, 2, seed=44), record=False)
    owed = [
        r.sum(axis=0, keepdims=True) for r in records[-1]["residual"] if r is not None
    ]
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "a"))

    def restored(path, want, steps=0):
        params1, opt1 = setup(default, make)
        with caplog.at_level(logging.INFO):
            tf.train.Checkpoint(params=params1, optimizer=opt1).restore(
                path
            ).assert_consumed()
        for a, b in zip(params1, want):
            np.testing.assert_array_equal(a.numpy(), b)
        assert int(opt1.compression.steps) == 2
        if steps:
            run(
                default,
                opt1,
                gradients(steps, 1, seed=46),
                params=params1,
                record=False,
            )
        residuals = [v.numpy() for v in opt1.compression.residuals.values()]
        assert len(residuals) == len(owed)
        for got, carried in zip(residuals, owed):
            np.testing.assert_array_equal(got, carried)
        return params1, opt1

    # Saved on 2 replicas; two steps on one.
    params1, opt1 = restored(path, [p.numpy() for p in params], steps=2)
    restored(  # Saved under the default strategy.
        tf.train.Checkpoint(params=params1, optimizer=opt1).save(str(tmp_path / "b")),
        [p.numpy() for p in params1],
    )
    notes = _owed_notes(caplog)
    assert len(notes) == 1 and "2 replicas" in notes[0].getMessage()


def test_a_compressor_serves_one_optimizer():
    # Its residuals are made for the first one's variables: a second
    # optimizer would train uncompressed without a word (it did).
    def variable():
        with M2.scope():
            return tf.Variable(tf.zeros([4, 3]))

    taken = "compression: this TopK instance already belongs to optimizer "
    compressor = distopt.compression.TopK(0.1)
    first, second = make_optimizer(compressor), make_optimizer(compressor)
    with M2.scope():
        first.build([variable()])
    with pytest.raises(ValueError) as e:
        make_optimizer(compressor)
    assert str(e.value).startswith(taken + "'gradient_descent'")
    # One made before the first was built is refused at its own build,
    # before it makes a slot.
    with pytest.raises(ValueError) as e, M2.scope():
        second.build([variable()])
    assert str(e.value).startswith(taken) and not second._slots
    make_optimizer("topk")  # Names and configs make new ones.
    make_optimizer("topk")
    # A constructor that raised claimed nothing: the corrected call works
    # (it was refused, naming an optimizer that never existed).
    compressor = distopt.compression.TopK(0.1)
    with pytest.raises(ValueError, match="sync"):
        make_optimizer(compressor, sync=distopt.sync.LocalSGD(4))
    with pytest.raises(ValueError, match="beta_1"):
        make_optimizer(compressor, name="adam", beta_1=2.0)
    with M2.scope():
        make_optimizer(compressor, name="adam").build([variable()])


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_a_gradient_given_outside_strategy_run_is_applied_uncompressed(compressor):
    # apply_gradients' contract: outside strategy.run the gradient is the
    # aggregate, applied as given. Compressed, it lost 90% of its entries
    # to top-k and left residuals behind. The next step inside strategy.run
    # is compressed again.
    params, opt = setup(M2, lambda: make_optimizer(compressor))
    given = gradients(1, 1, seed=53)[0][0]
    with M2.scope():
        opt.apply_gradients([tf.constant(g) for g in given], params)
    for p, p0, g in zip(params, initial_params(), given):
        for copy in local_copies(M2, p):
            np.testing.assert_allclose(copy - p0, -LR * g, rtol=1e-5, atol=1e-6)
    residuals = list(opt.compression.residuals.values())
    assert residuals
    for rows in residuals:
        np.testing.assert_array_equal(rows.logical_value().numpy(), 0.0)
    M2.run(lambda: opt.apply_gradients([tf.constant(g) for g in given], params))
    assert any(np.any(rows.logical_value().numpy() != 0) for rows in residuals)


# --- Edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_an_empty_variable_travels_plain_and_changes_nothing_else(compressor):
    # A layer of 0 units: top-k failed on it at trace time.
    grads = gradients(2, 2, seed=61)
    _, _, _, want = run(M2, lambda: make_optimizer(compressor), grads, record=False)
    with M2.scope():
        params = [tf.Variable(p) for p in initial_params()] + [
            tf.Variable(tf.zeros([0, 3]))
        ]
        opt = make_optimizer(compressor)

    @tf.function
    def step(g):
        def replica_fn(g):
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            opt.apply_gradients([x[r] for x in g] + [tf.zeros([0, 3])], params)

        M2.run(replica_fn, args=(g,))

    for t in range(2):
        step(
            [
                tf.constant(np.stack([grads[t][r][i] for r in range(2)]))
                for i in range(3)
            ]
        )
    assert str(len(SHAPES)) not in opt.compression.residuals
    for p, w in zip(params, want[-1]["params"]):
        for copy, expected in zip(local_copies(M2, p), w):
            np.testing.assert_array_equal(copy, expected)


@pytest.mark.parametrize(
    "compressor",
    [
        distopt.compression.PowerSGD(rank=2, epsilon=0.0),
        distopt.compression.PowerSGD(rank=2, epsilon=1e-8),
        distopt.compression.TopK(0.1),
        distopt.compression.OneBit(),
    ],
    ids=["powersgd_eps0", "powersgd_eps1e-8", "topk", "onebit"],
)
def test_zero_gradients_then_training_goes_on(compressor):
    # Two all-zero steps (a layer with no gradient yet), then ordinary ones.
    grads = gradients(5, 2, seed=47)
    for t in range(2):
        grads[t] = [[np.zeros_like(g) for g in rep] for rep in grads[t]]
    compressor = distopt.compression.from_config(compressor.get_config())
    params, _, _, records = run(
        M2, lambda: make_optimizer(compressor, learning_rate=LR), grads
    )
    if compressor.name != "powersgd":
        # Step by step too, payload included: a zero's sign is +, and top-k
        # picks the lowest indices among equal magnitudes. (PowerSGD's fresh
        # Q after the zero steps comes from TensorFlow's random numbers.)
        shares = shares_of(grads)
        check_run(compressor.name, records, shares, initial_params(), LR, [0, 1], None)
    for rec in records:
        for key in ("params", "residual", "q"):
            for x in rec[key]:
                assert x is None or np.all(np.isfinite(x)), key
    for t in range(2):
        for x, w0 in zip(records[t]["params"], initial_params()):
            np.testing.assert_array_equal(x[0], w0)
        for x in records[t]["residual"]:
            assert x is None or not np.any(x)
    # Error feedback loses nothing: what was applied plus what the replicas
    # still hold is everything they were given, sum_t sum_r s_r.
    shares = shares_of(grads)
    for i, w0 in enumerate(initial_params()):
        applied = (np.float64(w0) - params[i].numpy()) / LR
        held = records[-1]["residual"][i]
        given = sum(shares[t][r][i] for t in range(5) for r in range(2))
        if held is not None:
            applied = applied + held.sum(axis=0)
            # Something is sent: a zero warm start must not stay zero.
            assert np.any(params[i].numpy() != w0), i
        np.testing.assert_allclose(applied, given, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 4, 12])
def test_powersgd_is_exact_on_gradients_of_lower_rank(rank):
    # The replicas' gradients sum to rank 1 (a small batch, dead units): P^
    # spans their column space, so P^ P^T M is M. A column of P^ that was
    # rounding normalised to unit length made it up to twice M at full rank.
    rng = np.random.default_rng(5)
    u = [rng.normal(size=16) for _ in range(2)]
    grads = [
        [np.outer(u[t], rng.normal(size=12)).astype(np.float32) for _ in range(2)]
        for t in range(2)
    ]
    means = [(g[0] + g[1]) / 2 for g in grads]
    # The reference itself, in float64 and float32.
    for dtype in (np.float64, np.float32):
        xs = [g.astype(dtype) / 2 for g in grads[0]]
        q = rng.normal(size=(12, rank)).astype(dtype)
        out = ref.powersgd_round(xs, q)
        np.testing.assert_allclose(out["aggregate"], means[0], rtol=1e-5, atol=1e-6)
    compressor = distopt.compression.PowerSGD(rank=rank, min_compression_rate=0.01)
    with M2.scope():
        w = tf.Variable(tf.zeros([16, 12]))
        opt = distopt.optimizers.GradientDescent(1.0, compression=compressor)
        opt.build([w])

    @tf.function
    def step(g):
        M2.run(lambda g: opt.apply_gradients([(g, w)]), (g,))

    for t, mean in enumerate(means):  # The second from a warm start.
        w0 = w.numpy()
        step(
            M2.experimental_distribute_values_from_function(
                lambda ctx, g=grads[t]: tf.constant(g[ctx.replica_id_in_sync_group])
            )
        )
        for copy in local_copies(M2, w):
            # float32 rounding, and step 0's left in the residuals (the bug
            # was off by 38% at rank 2).
            np.testing.assert_allclose(w0 - copy, mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "fraction, d, k",
    # 0.07 * 100 and 0.28 * 100 are a hair over 7 and 28 in binary floating
    # point; 0.57 * 100 a hair under 57.
    [(0.07, 100, 7), (0.28, 100, 28), (0.57, 100, 57), (1 / 3, 9, 3), (1e-3, 10, 1)],
)
def test_topk_sends_the_ceiling_of_the_fraction_as_written(fraction, d, k):
    assert distopt.compression.TopK(fraction).k([d]) == k
    idx, _, _ = ref.topk_compress(np.arange(d, dtype=np.float32), fraction)
    assert len(idx) == k


def test_powersgd_orthonormalises_near_dependent_columns_and_zeroes_dependent_ones():
    # P^ P^T is then a projection: columns orthonormal, or zero where one
    # lies in the span of the earlier ones.
    from distopt.compression.powersgd import orthonormalise

    rng = np.random.default_rng(0)
    for _ in range(10):
        a, b, c = rng.normal(size=(3, 64))
        near = np.stack([a, a + 2e-3 * b, a + 1e-3 * b + 1e-3 * c], 1)
        p = orthonormalise(tf.constant(near, tf.float32)).numpy()
        # One Gram-Schmidt pass leaves them 2e-4 from orthogonal.
        np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
        dependent = np.stack([a, 2 * a, b, a - 3 * b], 1)
        p = orthonormalise(tf.constant(dependent, tf.float32)).numpy()
        np.testing.assert_allclose(p.T @ p, np.diag([1, 0, 1, 0]), atol=1e-5)


@pytest.mark.parametrize(
    "make,argument",
    [
        (lambda: distopt.compression.PowerSGD(rank=0), "rank"),
        (lambda: distopt.compression.PowerSGD(epsilon=-1.0), "epsilon"),
        (
            lambda: distopt.compression.PowerSGD(min_compression_rate=0),
            "min_compression_rate",
        ),
        (lambda: distopt.compression.TopK(fraction=0), "fraction"),
        (lambda: distopt.compression.TopK(fraction=1.5), "fraction"),
        (lambda: distopt.compression.get("gzip"), "compression"),
        (lambda: distopt.compression.get("topk", k=3), "compression_args: k"),
        (
            lambda: distopt.compression.get(distopt.compression.TopK(), fraction=0.5),
            "compression_args",
        ),
        (lambda: distopt.compression.get(None, rank=2), "compression_args"),
        (lambda: distopt.compression.get("powersgd", start_step=-1), "start_step"),
        # A string was truthy: "no" turned warm starts on.
        (lambda: distopt.compression.PowerSGD(warm_start="no"), "warm_start"),
        (lambda: distopt.compression.TopK(error_feedback="off"), "error_feedback"),
        (
            lambda: distopt.compression.OneBit(error_feedback_decay=1.5),
            "error_feedback_decay",
        ),
        (
            lambda: distopt.compression.TopK(error_feedback_decay=float("nan")),
            "error_feedback_decay",
        ),
        (
            lambda: distopt.compression.PowerSGD(error_feedback_decay="0.9"),
            "error_feedback_decay",
        ),
        # A decay without residuals would be ignored in silence.
        (
            lambda: distopt.compression.TopK(
                error_feedback=False, error_feedback_decay=0.9
            ),
            "error_feedback_decay",
        ),
        # These were a TypeError from tf.Module, and an error at the first step.
        (lambda: distopt.compression.PowerSGD(name=123), "name"),
        (lambda: distopt.compression.OneBit(name="one bit"), "name"),
        (lambda: distopt.compression.PowerSGD(seed=10**20), "seed"),
        (lambda: distopt.optimizers.get("adam", compression="gzip"), "compression"),
        # It was ignored in silence.
        (
            lambda: distopt.optimizers.get(
                "adam", compression="powersgd", wire_dtype="bfloat16"
            ),
            "wire_dtype",
        ),
        (
            lambda: distopt.optimizers.get(
                "adam", compression=distopt.compression.get("topk"), sync="local_sgd"
            ),
            "compression",
        ),
    ],
)
def test_bad_arguments_raise_one_error_naming_them_and_build_nothing(make, argument):
    made = []

    def creator(next_creator, **kwargs):
        made.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator), pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(f"{argument}:"), str(e.value)
    assert "\n" not in str(e.value)
    assert made == []


@pytest.mark.parametrize(
    "feedback", [{"error_feedback": False}, {"error_feedback_decay": 0.25}]
)
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_config_round_trip(compressor, feedback):
    kind, args = COMPRESSORS[compressor]
    made = distopt.compression.get(kind, **args, start_step=3, **feedback)
    assert made.get_config().items() >= feedback.items()
    config = made.get_config()
    again = distopt.compression.from_config(config)
    assert type(again) is type(made) and again.get_config() == config
    opt = make_optimizer(made)
    assert type(opt).from_config(opt.get_config()).compression.get_config() == config


# --- Counters, eagerly, after another strategy ---------------------------------


def test_eager_after_another_strategy_and_bytes_read_from_the_counters():
    """The way users run it: eagerly, in a process where another
    MirroredStrategy has already run (here M2, first, uncompressed).

    The compressed optimizers run on a strategy of their own, on an
    MLP-shaped layer (784 x 700 and its bias), one step each; the bytes each
    replica sent (`bytes_sent`, read from the run) against the uncompressed
    run's. Then two steps of the small problem, eagerly, against the
    reference.
    """
    rng = np.random.default_rng(53)
    shapes = [(784, 700), (700,)]
    grads = [
        [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
    ]

    def one_step(strategy, compression):
        with strategy.scope():
            params = [tf.Variable(tf.zeros(s)) for s in shapes]
            opt = distopt.optimizers.GradientDescent(
                LR, compression=compression, jit_compile=False
            )
        run(strategy, opt, grads, params=params, function=False, record=False)
        return opt.reducer.counters(), params

    plain, _ = one_step(M2, None)
    plain = plain["bytes_sent"]
    assert plain == 4 * (784 * 700 + 700) + 4  # the gradients and the weight
    strategy = mirrored(2)
    sent, ratios = {}, {}
    for name, compression in [
        ("powersgd", distopt.compression.PowerSGD(rank=2)),
        ("topk", distopt.compression.TopK(0.01)),
        ("onebit", distopt.compression.OneBit()),
    ]:
        counters, params = one_step(strategy, compression)
        sent[name] = counters["bytes_sent"]
        ratios[name] = plain / sent[name]
        if name != "powersgd":  # what each replica receives, R rows
            assert counters["allgather_bytes"] == 2 * sent[name]
        assert np.any(params[0].numpy() != 0), name
    print("gradient bytes sent per replica, uncompressed / compressed:", ratios)
    assert min(ratios.values()) >= 20, ratios
    # PowerSGD rank 2 on the matrix: (784 + 700) x 2 floats, and the bias
    # whole; top-k: 5488 values and indices and 7 of each for the bias;
    # 1 bit: 17150 words and a scale, 22 words and a scale.
    assert sent["powersgd"] == 4 * ((784 + 700) * 2 + 700)
    assert sent["topk"] == 4 * 2 * (5488 + 7)
    assert sent["onebit"] == 4 * (17150 + 1 + 22 + 1)

    grads = gradients(2, 2, seed=59)
    params, opt = setup(strategy, lambda: make_optimizer("powersgd", learning_rate=LR))
    q0 = snapshot(strategy, opt, params)["q"]
    _, _, _, records = run(strategy, opt, grads, params=params, function=False)
    check_run("powersgd", records, shares_of(grads), initial_params(), LR, [0, 1], q0)


def test_start_step_sends_plain_all_reduces_first():
    grads = gradients(4, 2, seed=61)
    params, _, _, records = run(
        M2,
        lambda: make_optimizer(
            distopt.compression.OneBit(start_step=2), learning_rate=LR
        ),
        grads,
        record=False,
    )
    calls = [
        (r["counters"]["allreduce_calls"], r["counters"]["allgather_calls"])
        for r in records
    ]
    assert calls == [(1, 0), (2, 0), (2, 1), (2, 2)]
    shares = shares_of(grads)
    for t in range(2):
        for x in records[t]["residual"]:
            np.testing.assert_array_equal(x, 0.0)
    want = ref.ef_sgd("onebit", shares[2:])
    for i, w0 in enumerate(initial_params()):
        exact = sum(shares[t][r][i] for t in range(2) for r in range(2))
        total = exact + sum(w["aggregate"][i] for w in want)
        np.testing.assert_allclose(
            params[i].numpy() - w0, -LR * total, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            records[-1]["residual"][i], want[-1]["residual"][i], rtol=1e-5, atol=1e-6
        )


def test_one_bit_adam_recipe_matches_numpy():
    """OneBit after 2 plain steps under Adam with its variance frozen at 2.

    1-bit Adam's compression stage (Tang et al. 2021): the NumPy reference
    feeds its own Adam (v frozen after update 2) the exact mean for two
    steps, then the error-feedback sign aggregate of the shares.
    """
    grads = gradients(5, 2, seed=67)
    hyper = {"freeze_variance_step": 2, "epsilon": 1e-4}
    params, _, _, _ = run(
        M2,
        lambda: make_optimizer(
            distopt.compression.OneBit(start_step=2),
            name="adam",
            learning_rate=LR,
            **hyper,
        ),
        grads,
        record=False,
    )
    shares = shares_of(grads)
    exact = [
        [sum(shares[t][r][i] for r in range(2)) for i in range(len(shares[t][0]))]
        for t in range(2)
    ]
    compressed = [w["aggregate"] for w in ref.ef_sgd("onebit", shares[2:])]
    want, _ = ref.run(
        "adam", initial_params(), exact + compressed, float(np.float32(LR)), **hyper
    )
    for p, w, w0 in zip(params, want, initial_params()):
        assert np.max(np.abs(w - w0)) > 1e-3  # the update is not a no-op
        np.testing.assert_allclose(p.numpy() - w0, w - w0, rtol=1e-4, atol=1e-6)


# Every constructor argument against the same bad values: a Python value of
# the wrong kind (a bool or a str where a number goes, None) is refused as an
# out-of-range one is, naming the argument, the value and the compressor.
# TopK("0.1") was accepted (float() took it) while PowerSGD(rank="2") was
# refused. The flag strings become numbers in the trainer's parse_kv.
_ARGUMENTS = {
    "TopK": ["fraction", "error_feedback", "error_feedback_decay", "start_step"],
    "PowerSGD": [
        "rank",
        "min_compression_rate",
        "epsilon",
        "seed",
        "warm_start",
        "error_feedback",
        "error_feedback_decay",
        "start_step",
    ],
    "OneBit": ["error_feedback", "error_feedback_decay", "start_step"],
}
_BOOLEAN_ARGUMENTS = ("error_feedback", "warm_start")
_BAD_VALUES = {
    "bool": True,
    "str": "0.1",
    "str_int": "2",
    "none": None,
    "negative": -1,
    "nan": float("nan"),
}


@pytest.mark.parametrize("bad", sorted(_BAD_VALUES))
@pytest.mark.parametrize(
    "cls,argument", [(c, a) for c, args in _ARGUMENTS.items() for a in args]
)
def test_a_bad_argument_is_refused_naming_it_the_value_and_the_compressor(
    cls, argument, bad
):
    value = _BAD_VALUES[bad]
    if argument in _BOOLEAN_ARGUMENTS and value is True:
        pytest.skip("True is a good value of a bool argument")
    with pytest.raises(ValueError) as e:
        getattr(distopt.compression, cls)(**{argument: value})
    message = str(e.value)
    assert message.startswith(f"{argument}: "), message
    assert repr(value) in message and message.endswith(f"(in {cls})."), message


@pytest.mark.parametrize(
    "make,check",
    [
        (lambda: distopt.compression.TopK(0.1), lambda c: c.fraction == 0.1),
        (lambda: distopt.compression.TopK(1), lambda c: c.fraction == 1.0),
        (
            lambda: distopt.compression.TopK(np.float32(0.5)),
            lambda c: c.fraction == 0.5,
        ),
        (
            lambda: distopt.compression.PowerSGD(
                rank=np.int64(2), epsilon=0, min_compression_rate=1
            ),
            lambda c: (c.rank, c.epsilon, c.min_compression_rate) == (2, 0.0, 1.0),
        ),
        (
            lambda: distopt.compression.OneBit(error_feedback=False),
            lambda c: c.error_feedback is False,
        ),
        (
            lambda: distopt.compression.OneBit(error_feedback_decay=0.5, start_step=3),
            lambda c: (c.error_feedback_decay, c.start_step) == (0.5, 3),
        ),
    ],
    ids=["topk", "topk_int", "topk_numpy", "powersgd_numpy", "onebit", "onebit_decay"],
)
def test_good_arguments_are_accepted(make, check):
    assert check(make())


@pytest.mark.parametrize(
    "name,text,want",
    [
        ("topk", "fraction=0.1,error_feedback=false", {"fraction": 0.1}),
        ("powersgd", "rank=2,epsilon=1e-8,warm_start=false", {"rank": 2}),
        ("onebit", "error_feedback_decay=0.5,start_step=3", {"start_step": 3}),
    ],
)
def test_flag_strings_are_numbers_by_the_time_they_reach_the_compressor(
    name, text, want
):
    # --compression_args arrives as one string; the trainer's parse_kv makes
    # its numbers and bools, so the library never needs to take a str.
    from distopt.trainer import config as config_lib

    config = config_lib.TrainConfig(
        compression=name, compression_args=config_lib.parse_kv(text)
    )
    made = config_lib.make_compression(config).get_config()
    assert {k: made[k] for k in want} == want
    assert made == {**made, **config.compression_args}


def test_onebit_refuses_a_positional_argument_naming_the_keywords():
    # OneBit has no hyperparameter of its own to take first (TopK's
    # fraction, PowerSGD's rank): OneBit(False) was Python's "takes 1
    # positional argument but 2 were given", about Compressor.__init__.
    with pytest.raises(TypeError) as e:
        distopt.compression.OneBit(False)
    message = str(e.value)
    assert message.startswith("OneBit: takes keyword arguments only"), message
    assert "error_feedback" in message and "False" in message, message
    # And a misspelt keyword names OneBit, not Compressor.__init__.
    with pytest.raises(TypeError) as e:
        distopt.compression.OneBit(error_fedback=False)
    assert str(e.value).startswith(
        "OneBit: unexpected keyword argument 'error_fedback'; it takes error_feedback"
    ), str(e.value)
    # get() lists what a keyword may be, not the refused `*positional`.
    with pytest.raises(ValueError, match="takes error_feedback, error_feedback_decay"):
        distopt.compression.get("onebit", positional=1)
    with pytest.raises(ValueError) as e:
        distopt.compression.get("onebit", positional=1)
    assert "positional" not in str(e.value).split("which takes")[1]


@pytest.mark.parametrize(
    "shape, rows",
    [
        ((3, 3, 64, 64), 576),
        ((3, 3, 256, 256), 2304),
        ((5, 5, 6, 16), 150),
        ((784, 700), 784),
    ],
)
def test_powersgd_views_a_conv_kernel_by_its_output_channels(shape, rows):
    """TensorFlow's conv kernels are (kh, kw, in, out): the matrix is the
    (kh*kw*in) x out one the convolution multiplies patches by, the paper's
    view. A view of the first dimension (3 rows) left 3x3 kernels
    uncompressed at rank 2 (and rank 1 compressed across kernel rows)."""
    comp = distopt.compression.PowerSGD(rank=2)
    assert powersgd.matrix_shape(shape) == (rows, shape[-1])
    assert comp.compresses(tf.TensorShape(shape))
    assert ref.powersgd_compresses(shape, rank=2)
