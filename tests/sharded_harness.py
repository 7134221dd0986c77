"""Every optimizer, sharded and not, on one problem: the table of test_sharded.

Shared by `tests/test_sharded.py` (MirroredStrategy with 2 and 4 replicas)
and the multi-worker run (`tests/mw_worker.py`, 2 localhost workers), so
that both run the same program.

The problem. Variables of awkward shapes (7x5, 6, 3x3x2, 1 and a scalar:
61 elements, so that shards cut variables and the last shard is padded for
N = 2 and N = 4), one of them zero (the layer-wise rules' fallback). Every
replica gets its own gradient at every step. The gradients are dyadic
(multiples of 1/64 below 2), so their mean over 2 or 4 replicas is exact in
float32 whatever the order of summation: the aggregated gradient is then
bit-identical to the mean computed on one device, and one unsharded run on
one device is the unsharded update of every strategy, bit for bit (checked
against an unsharded run under the strategy itself in `train`). The
2-replica gradients are the pairwise means of the 4-replica ones, so both
strategies share that mean.

SAM and Heun evaluate the loss: replica r's loss at step t is
`sum_i 0.5 a_ri p_i^2 + c_tri p_i`, with `c_tri` the gradient above, so
their gradients depend on the parameters; they are compared with their
unsharded run under the same strategy.
"""

from __future__ import annotations

import os

import numpy as np
import numpy_reference as ref
import tensorflow as tf

from distopt import optimizers

SHAPES = [(7, 5), (6,), (3, 3, 2), (1,), ()]
#: Variable 1 starts at zero: Lamb's and Lars's trust-ratio fallback.
ZERO = 1
STEPS = 20
MAX_REPLICAS = 4

#: One configuration per optimizer of the library, options on.
CONFIGS = {
    "adagrad": {"learning_rate": 0.1},
    "adam": {"learning_rate": 0.1, "amsgrad": True},
    "adamax": {"learning_rate": 0.1},
    "adamw": {"learning_rate": 0.1, "weight_decay": 0.1},
    "gradient_descent": {"learning_rate": 0.1},
    "heun": {"learning_rate": 0.1},
    "lamb": {"learning_rate": 0.1},
    "lars": {"learning_rate": 1.0, "eta": 0.1, "weight_decay": 0.01},
    "lion": {"learning_rate": 0.1, "weight_decay": 0.1},
    "momentum": {"learning_rate": 0.1, "nesterov": True},
    "rmsprop": {"learning_rate": 0.1, "centered": True, "momentum": 0.5},
    # SAM around Adam (slots to shard); its own API, not the registry's get.
    "sam": {"rho": 0.05, "base": ("adam", {"learning_rate": 0.1})},
}

#: Rules that reduce over a variable: equal to float32 rounding, not bitwise.
LAYERWISE = ("lamb", "lars")
#: Optimizers that need `minimize` (they evaluate the loss).
LOSS_BASED = ("sam", "heun")


def problem(num_replicas, steps=STEPS, seed=24):
    """`(params, grads, curvature)`: the initial values and the data.

    `grads[t][r][i]` is replica r's gradient of variable i at step t (the
    `c` of SAM's and Heun's loss); `curvature[r][i]` is their `a`.
    """
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    params[ZERO][...] = 0
    # Odd multiples of 1/64: never zero on one replica, exact when summed.
    grads4 = [
        [
            [
                (2 * rng.integers(-63, 64, size=s) + 1).astype(np.float32) / 64
                for s in SHAPES
            ]
            for _ in range(MAX_REPLICAS)
        ]
        for _ in range(steps)
    ]
    group = MAX_REPLICAS // num_replicas
    grads = [
        [
            [
                np.mean([step[r * group + j][i] for j in range(group)], 0).astype(
                    np.float32
                )
                for i in range(len(SHAPES))
            ]
            for r in range(num_replicas)
        ]
        for step in grads4
    ]
    a4 = [
        [rng.integers(32, 96, size=s).astype(np.float32) / 64 for s in SHAPES]
        for _ in range(MAX_REPLICAS)
    ]
    curvature = [a4[r * group] for r in range(num_replicas)]
    return params, grads, curvature


def mean_grads(grads):
    """Per step and variable, the mean over replicas (float64; exact here)."""
    return [
        [np.mean([g[i] for g in step], 0, dtype=np.float64) for i in range(len(SHAPES))]
        for step in grads
    ]


def make(name, **extra):
    """Optimizer `name` of `CONFIGS`, with `extra` (e.g. `shard_state`)."""
    config = dict(CONFIGS[name])
    if name == "sam":
        base_name, base = config.pop("base")
        return optimizers.SAM(optimizers.get(base_name, **base, **extra), **config)
    return optimizers.get(name, **config, **extra)


def train(
    strategy, entries, start=0, stop=STEPS, seed=24, state=None, build=True, **extra
):
    """Runs `entries` side by side, steps `start` to `stop`, in one `tf.function`.

    Args:
        strategy: The strategy.
        entries: `(name, shard_state)` pairs.
        start, stop: The steps to run (0-based, of the `STEPS` of `problem`).
        seed: The problem's seed.
        state: `{entry: (optimizer, variables)}` to continue, or None: fresh
            ones from the initial values.
        build: Build fresh optimizers before the first step (else they build
            lazily, inside the function).
        **extra: More optimizer arguments for every fresh entry.

    Returns:
        `{entry: (trajectory, optimizer, variables)}`: `trajectory[k][i]`
        is variable i after step `start + k + 1` (replica 0's copy on this
        worker), after checking that every local copy is identical at every
        step.
    """
    n = strategy.num_replicas_in_sync
    params, grads, curvature = problem(n, STEPS, seed)
    if state is None:
        with strategy.scope():
            state = {
                e: (
                    make(e[0], shard_state=e[1], **extra),
                    [tf.Variable(p) for p in params],
                )
                for e in entries
            }
            for opt, variables in state.values():
                if build:
                    opt.build(variables)
    opts = {e: state[e][0] for e in entries}
    var_sets = {e: state[e][1] for e in entries}

    def replica_fn(data):
        g, a = data
        for e in entries:
            opt, variables = opts[e], var_sets[e]
            if e[0] in LOSS_BASED:

                def loss_fn(variables=variables):
                    return tf.add_n(
                        [
                            tf.reduce_sum(0.5 * ai * v * v + ci * v)
                            for v, ai, ci in zip(variables, a, g)
                        ]
                    )

                opt.minimize(loss_fn, variables)
            else:
                opt.apply_gradients(g, variables)

    @tf.function
    def step(data):
        strategy.run(replica_fn, args=(data,))
        # Every local copy, read in the function: one call per step.
        return {
            e: [
                [tf.identity(c) for c in strategy.experimental_local_results(v)]
                for v in var_sets[e]
            ]
            for e in entries
        }

    out = {e: [] for e in entries}
    for t in range(start, stop):
        data = strategy.experimental_distribute_values_from_function(
            lambda ctx, t=t: (
                [tf.constant(x) for x in grads[t][ctx.replica_id_in_sync_group]],
                [tf.constant(x) for x in curvature[ctx.replica_id_in_sync_group]],
            )
        )
        copies = step(data)
        for e in entries:
            for i, local in enumerate(copies[e]):
                for r, c in enumerate(local[1:], 1):
                    np.testing.assert_array_equal(
                        c.numpy(),
                        local[0].numpy(),
                        err_msg=f"{e} var{i} step {t + 1}: replica {r}",
                    )
            out[e].append([local[0].numpy() for local in copies[e]])
    return {e: (out[e], opts[e], var_sets[e]) for e in entries}


def single_device(names, steps=STEPS, seed=24, **extra):
    """Unsharded trajectories on one device with the (exact) mean gradient.

    Registry optimizers only (not SAM or Heun, whose gradients depend on
    the parameters). Returns `{name: (trajectory, optimizer, variables)}`
    as `train` does.
    """
    params, grads, _ = problem(MAX_REPLICAS, steps, seed)
    mean = mean_grads(grads)
    opts = {k: make(k, **extra) for k in names}
    var_sets = {k: [tf.Variable(p) for p in params] for k in names}

    @tf.function
    def step(g):
        for k in names:
            opts[k].apply_gradients(g, var_sets[k])

    out = {k: [] for k in names}
    for t in range(steps):
        step([tf.constant(m, tf.float32) for m in mean[t]])
        for k in names:
            out[k].append([v.numpy() for v in var_sets[k]])
    return {k: (out[k], opts[k], var_sets[k]) for k in names}


def numpy_trajectory(name, num_replicas, steps=STEPS, seed=24):
    """The NumPy reference's parameters after each step (float64)."""
    params, grads, curvature = problem(num_replicas, steps, seed)
    if name in LOSS_BASED:
        return _loss_based_reference(name, params, grads, curvature)
    hyper = dict(CONFIGS[name])
    lr = hyper.pop("learning_rate")
    mean = mean_grads(grads)
    return [ref.run(name, params, mean[: t + 1], lr, **hyper)[0] for t in range(steps)]


def _loss_based_reference(name, params, grads, curvature):
    """SAM (replica perturbation, around Adam) and Heun, in float64."""
    p = [np.asarray(x, np.float64) for x in params]
    states = [{} for _ in p]
    out = []
    for t, gt in enumerate(grads, start=1):

        def grad_at(q, r, gt=gt):
            return [a * x + c for a, x, c in zip(curvature[r], q, gt[r])]

        reps = range(len(gt))
        if name == "heun":
            lr = CONFIGS["heun"]["learning_rate"]
            g1 = _mean([grad_at(p, r) for r in reps])
            trial = [x - lr * g for x, g in zip(p, g1)]
            g2 = _mean([grad_at(trial, r) for r in reps])
            p = [x - lr / 2 * (a + b) for x, a, b in zip(p, g1, g2)]
        else:
            rho = CONFIGS["sam"]["rho"]
            base_name, base = CONFIGS["sam"]["base"]
            perturbed = []
            for r in reps:
                g = grad_at(p, r)
                norm = np.sqrt(sum(np.sum(x * x) for x in g))
                e = [rho * x / norm for x in g]
                perturbed.append(grad_at([x + d for x, d in zip(p, e)], r))
            g = _mean(perturbed)
            rule = ref.RULES[base_name]
            p = [
                rule(x, gi, s, base["learning_rate"], t)
                for x, gi, s in zip(p, g, states)
            ]
        out.append([x.copy() for x in p])
    return out


def _mean(per_replica):
    """Per variable, the mean over replicas of lists of arrays."""
    return [np.mean([g[i] for g in per_replica], 0) for i in range(len(SHAPES))]


# --- The 2-worker run (mw_worker.py, test_multi_worker.py) ----------------------


def table_results(strategy, checkpoint_prefix):
    """Every optimizer sharded (SAM and Heun also not), with default options.

    Default options: the XLA kernels with Grappler on, as users run them
    (test_sharded.py runs op by op). Returns `{key: array}` for `np.savez`:
    `shard_table/<name>/<shard_state>/<variable>` the trajectories
    (`[steps, *shape]`), `shard_slots/<name>/<variable>/<slot>` the sharded
    registry optimizers' slots, read whole (on several workers, a read of a
    sharded slot is a collective: every worker reads). Also saves the
    sharded Adam and its variables to `checkpoint_prefix`.
    """
    entries = [(k, True) for k in sorted(CONFIGS)] + [(k, False) for k in LOSS_BASED]
    runs = train(strategy, entries)
    out = {
        f"shard_table/{name}/{int(shard)}/{i}": np.stack([step[i] for step in traj])
        for (name, shard), (traj, _, _) in runs.items()
        for i in range(len(SHAPES))
    }
    for (name, shard), (_, opt, variables) in runs.items():
        if shard and name not in LOSS_BASED:
            for i, v in enumerate(variables):
                for key, slot in opt.slots(v).items():
                    out[f"shard_slots/{name}/{i}/{key}"] = slot.numpy()
    _, opt, variables = runs[("adam", True)]
    tf.train.Checkpoint(opt=opt, params=variables).save(checkpoint_prefix)
    return out


def check_two_workers(w0, w1, checkpoint):
    """`table_results` of 2 workers: equal on both at every step, equal to
    the unsharded update (bitwise but for Lamb and Lars) and to NumPy; the
    slots too, and the checkpoint continues on one device, unsharded."""
    names = sorted(CONFIGS)
    single = single_device([k for k in names if k not in LOSS_BASED])
    params = problem(2)[0]
    for name in names:
        exact = name not in LAYERWISE
        reference = numpy_trajectory(name, 2)
        for i in range(len(SHAPES)):
            key = f"shard_table/{name}/1/{i}"
            got = w0[key]
            np.testing.assert_array_equal(got, w1[key], err_msg=key)
            if name in LOSS_BASED:
                other = f"shard_table/{name}/0/{i}"
                np.testing.assert_array_equal(w0[other], w1[other], err_msg=other)
                want = w0[other]
            else:
                want = np.stack([step[i] for step in single[name][0]])
                _, opt, variables = single[name]
                for slot, value in opt.slots(variables[i]).items():
                    skey = f"shard_slots/{name}/{i}/{slot}"
                    np.testing.assert_array_equal(w0[skey], w1[skey], err_msg=skey)
                    assert_close(w0[skey], value.numpy(), exact, skey)
            assert_close(got, want, exact, key)
            np.testing.assert_allclose(
                got - params[i],
                np.stack([step[i] for step in reference]) - params[i],
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{key}: NumPy reference",
            )
    # Saved on 2 sharded workers, restored unsharded on one device.
    _, adam, variables = single["adam"]
    fresh = make("adam")
    fresh_vars = [tf.Variable(tf.zeros_like(v)) for v in variables]
    fresh.build(fresh_vars)
    tf.train.Checkpoint(opt=fresh, params=fresh_vars).restore(
        checkpoint
    ).assert_consumed()
    for v, u in zip(fresh_vars, variables):
        np.testing.assert_array_equal(v.numpy(), u.numpy())
        for slot, value in adam.slots(u).items():
            np.testing.assert_array_equal(fresh.slots(v)[slot].numpy(), value.numpy())


def assert_close(got, want, exact, msg):
    """Bitwise if `exact`, else to float32 rounding."""
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=msg)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=msg)


# --- Eagerly, in a process where another strategy ran collectives ---------------


def eager_scenario(strategy, directory):
    """Adagrad with a moving average, sharded and not, used eagerly.

    For tests/strategies_worker.py, which runs it in a process where another
    MirroredStrategy ran collectives (TensorFlow's shared collective keys):
    build, two eager steps and one in a tf.function (each replica its own
    gradient), every slot read whole (`numpy()`), a checkpoint saved and
    restored into a fresh sharded optimizer, `finalize_variable_values`.
    Returns JSON-able values; see `check_eager_scenario`.
    """
    params, grads, _ = problem(2, steps=3)
    out = {}
    for shard in (True, False):
        with strategy.scope():
            variables = [tf.Variable(p) for p in params]
            # XLA kernels (the default): op by op, Grappler's rewrites would
            # change the last bit of the tf.function step (see test_sharded).
            opt = optimizers.Adagrad(0.1, use_ema=True, shard_state=shard)
            opt.build(variables)

        def step(g, opt=opt, variables=variables):
            strategy.run(lambda g: opt.apply_gradients(g, variables), args=(g,))

        for t, run in enumerate((step, step, tf.function(step))):
            run(
                strategy.experimental_distribute_values_from_function(
                    lambda ctx, t=t: [
                        tf.constant(x) for x in grads[t][ctx.replica_id_in_sync_group]
                    ]
                )
            )
        slots = [
            {k: s.numpy().tolist() for k, s in opt.slots(v).items()} for v in variables
        ]
        prefix = os.path.join(directory, f"shard{int(shard)}", "c")
        path = tf.train.Checkpoint(opt=opt, params=variables).save(prefix)
        with strategy.scope():
            fresh_vars = [tf.Variable(tf.zeros_like(p)) for p in params]
            fresh = optimizers.Adagrad(0.1, use_ema=True, shard_state=True)
            fresh.build(fresh_vars)
        tf.train.Checkpoint(opt=fresh, params=fresh_vars).restore(path)
        restored = [
            {k: s.numpy().tolist() for k, s in fresh.slots(v).items()}
            for v in fresh_vars
        ]
        with strategy.scope():
            fresh.finalize_variable_values(fresh_vars)
        out[f"shard{int(shard)}"] = {
            "sharded": fresh._sharded_slots is not None,
            "params": [v.numpy().tolist() for v in variables],
            "slots": slots,
            "restored": restored,
            "finalized": [
                [np.asarray(c).tolist() for c in strategy.experimental_local_results(v)]
                for v in fresh_vars
            ],
        }
    return out


def check_eager_scenario(result):
    """`eager_scenario`'s values: sharded equal to unsharded, and to NumPy."""
    sharded, plain = result["shard1"], result["shard0"]
    assert sharded["sharded"] and plain["sharded"]
    for key in ("params", "slots", "restored", "finalized"):
        assert sharded[key] == plain[key], key
    assert sharded["restored"] == sharded["slots"]
    params, grads, _ = problem(2, steps=3)
    want, states = ref.run("adagrad", params, mean_grads(grads), 0.1, use_ema=True)
    for i, (w, s) in enumerate(zip(want, states)):
        np.testing.assert_allclose(sharded["params"][i], w, rtol=1e-5, atol=1e-6)
        for k in ("accumulator", "ema"):
            np.testing.assert_allclose(
                sharded["slots"][i][k], s[k], rtol=1e-5, atol=1e-6
            )
        for copy in sharded["finalized"][i]:  # every replica's copy: the average
            assert copy == sharded["slots"][i]["ema"]
