"""Runs a compressed optimizer on given per-replica gradients, recording each step.

Shared by tests/test_compression.py and the multi-worker subprocesses
(tests/mw_worker.py), so that MirroredStrategy and 2 localhost workers run
the same program, compared against tests/numpy_reference.py (`ef_sgd`).

Each replica applies its own gradient, given as data (`grads[t][r][i]`), so
that the reference needs no model: every replica's share, residual and
payload can be followed step by step. After each step the harness records
this worker's copies of each variable, of each residual (one row per local
replica), of PowerSGD's Q, the counters, and what the compressor handed to
the Reducer's collectives (their per-replica inputs and outputs).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import distopt

#: The variables: a matrix, a tensor of rank 3 (PowerSGD's matrix view: 12 x
#: 7, compressed at rank 2; a view of its first dimension, 3 x 28, is not),
#: and a vector (PowerSGD leaves it uncompressed). Sizes are not multiples of
#: 32 (1-bit packing pads the last word) and small (the suite's time).
SHAPES = [(15, 12), (3, 4, 7), (5,)]

#: The compressors the reference runs, by name: (kind, constructor kwargs).
COMPRESSORS = {
    "powersgd": ("powersgd", {"rank": 2}),
    "topk": ("topk", {"fraction": 0.1}),
    "onebit": ("onebit", {}),
}
#: The same with SparseLoCo's decayed residual (its own test, not every table).
DECAYED = {
    f"{name}_decayed": (kind, {**args, "error_feedback_decay": 0.5})
    for name, (kind, args) in COMPRESSORS.items()
}
_ALL = {**COMPRESSORS, **DECAYED}


def gradients(num_steps, num_replicas, seed=0, shapes=SHAPES):
    """`grads[t][r][i]`: a different float32 gradient per step and replica."""
    rng = np.random.default_rng(seed)
    return [
        [
            [rng.normal(size=s).astype(np.float32) for s in shapes]
            for _ in range(num_replicas)
        ]
        for _ in range(num_steps)
    ]


def initial_params(seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def make_optimizer(compressor, name="gradient_descent", learning_rate=0.1, **kwargs):
    """A distopt optimizer with `compressor` (a key of COMPRESSORS or an instance)."""
    if isinstance(compressor, str):
        kind, args = _ALL[compressor]
        compressor = distopt.compression.get(kind, **args)
    kwargs.setdefault("jit_compile", False)
    return distopt.optimizers.get(
        name, learning_rate=learning_rate, compression=compressor, **kwargs
    )


class Recorder:
    """Records the per-replica inputs and outputs of a Reducer's collectives.

    Wraps `reducer.all_reduce` and `reducer.all_gather` on the instance. The
    tensors of one step are returned by the step function (a `tf.function`
    cannot hand out values any other way); `kinds` says which call each is.
    """

    def __init__(self, strategy, reducer):
        self.strategy = strategy
        self.kinds = []
        self.calls = []
        for kind in ("all_reduce", "all_gather"):
            original = getattr(reducer, kind)
            setattr(reducer, kind, self._wrap(kind, original))

    def _locals(self, values):
        return [list(self.strategy.experimental_local_results(v)) for v in values]

    def _wrap(self, kind, original):
        def wrapped(strategy, tensors, *args, **kwargs):
            tensors = list(tensors)
            out = original(strategy, tensors, *args, **kwargs)
            if not tensors:  # nothing sent (no tensor of that kind this step)
                return out
            self.kinds.append(kind)
            self.calls.append(
                {"inputs": self._locals(tensors), "outputs": self._locals(out)}
            )
            return out

        return wrapped

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def setup(strategy, make):
    """Fresh variables and an optimizer from `make()`, built in `strategy.scope()`.

    Built before the first step, so that the first Q can be read.
    """
    with strategy.scope():
        params = [tf.Variable(p, name=f"v{i}") for i, p in enumerate(initial_params())]
        opt = make()
        opt.build(params)
    return params, opt


def run(
    strategy,
    opt,
    grads,
    *,
    params=None,
    weights=None,
    function=True,
    record=True,
    step_fn=None,
):
    """Applies `grads` (`[t][r][i]`, every replica's) for len(grads) steps.

    Args:
        strategy: The strategy; replica r takes `grads[t][r]`.
        opt: The optimizer (with `params`), or a callable making it (then
            `params` is None: see `setup`).
        grads: Per step, per replica (all replicas, across workers), per variable.
        params: The variables to continue with, or None for fresh ones.
        weights: `weights[t][r]` for `weighted_mean`, or None.
        function: Run the step as a `tf.function` (else eagerly).
        record: Record the collectives (not inside a `tf.cond`: an
            `Accumulate` flush cannot be recorded).
        step_fn: A step function from an earlier call, to reuse its trace.

    Returns:
        (params, opt, step_fn, records): `records[t]` is a dict of NumPy
        values after step t (`params`, `residual`, `q`, `counters`, `calls`,
        `loss_scale`: this worker's copies of the scale, or None).
    """
    if params is None:
        params, opt = setup(strategy, opt)
    else:
        # Built outside the step: a tf.function that creates variables is
        # traced twice.
        with strategy.scope():
            opt.build(params)
    recorder = None
    if record and step_fn is None:
        recorder = Recorder(strategy, opt.reducer)
    n = strategy.num_replicas_in_sync

    if step_fn is None:

        def replica_fn(g, w):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            rid = rid if n > 1 else 0
            # The gradients given are the loss's; with a loss scale, those of
            # the scaled loss are applied (as `minimize` does): times the
            # scale of this step.
            opt.apply_gradients(
                [opt.scale_loss(x[rid]) for x in g],
                params,
                weight=None if w is None else w[rid],
            )

        def step(g, w):
            strategy.run(replica_fn, args=(g, w))
            return recorder.take() if recorder is not None else []

        step_fn = tf.function(step) if function else step
    records = []
    for t in range(len(grads)):
        g = [
            tf.constant(np.stack([grads[t][r][i] for r in range(n)]))
            for i in range(len(grads[t][0]))
        ]
        w = None if weights is None else tf.constant(weights[t], tf.float32)
        calls = step_fn(g, w)
        records.append(snapshot(strategy, opt, params, calls))
    return params, opt, step_fn, records


def snapshot(strategy, opt, params, calls=()):
    """This worker's copies of the params, residuals and Q, and the counters."""

    def local(v):
        return [np.asarray(x) for x in strategy.experimental_local_results(v)]

    comp = opt.compression
    num = len(params)
    scale = None if opt.loss_scale is None else local(opt.loss_scale.scale)
    if comp is None:
        return {
            "params": [local(p) for p in params],
            "counters": opt.reducer.counters(),
            "loss_scale": scale,
        }
    residual = [
        np.stack(local(comp.residuals[str(i)].storage))
        if str(i) in comp.residuals
        else None
        for i in range(num)
    ]
    qs = getattr(comp, "q", {})
    return {
        "params": [local(p) for p in params],
        "residual": residual,
        "q": [local(qs[str(i)])[0] if str(i) in qs else None for i in range(num)],
        "counters": opt.reducer.counters(),
        "steps": int(comp.steps),
        "calls": tf.nest.map_structure(np.asarray, list(calls)),
        "loss_scale": scale,
    }


# --- The comparison with tests/numpy_reference.py ---------------------------------


def shares_of(grads, weights=None, aggregation="mean"):
    """Each replica's normalised share `s_r = P_r / N` (see distopt.reduce), float32.

    The definition, not distopt's code: mean g_r / R, sum g_r, weighted mean
    w_r g_r / sum(w). Formed in float32 as `(w_r g_r) * (1 / sum w)`, the
    rounding float32 code makes, so that top-k and sign choices agree.
    """
    out = []
    for t, step in enumerate(grads):
        num = len(step)
        if aggregation == "weighted_mean":
            w = np.asarray(weights[t], np.float32)
            inv = np.float32(1.0) / np.sum(w, dtype=np.float32)
            out.append([[(w[r] * g) * inv for g in step[r]] for r in range(num)])
        else:
            inv = np.float32(1.0 / num) if aggregation == "mean" else np.float32(1.0)
            out.append([[g * inv for g in step[r]] for r in range(num)])
    return out


def reference(compressor, shares, q0=None, **kwargs):
    """`numpy_reference.ef_sgd` for a key of COMPRESSORS, PowerSGD in float64."""
    import numpy_reference as ref

    kind, args = _ALL[compressor]
    if kind == "powersgd":
        shares = [[[np.float64(g) for g in rep] for rep in step] for step in shares]
    return ref.ef_sgd(kind, shares, q0=q0, **args, **kwargs)


def wire_entries(ref_step):
    """How many 32-bit words each replica sends in a step, from the reference."""
    count = 0
    for sent in ref_step["sent"]:
        first = sent[0]
        if isinstance(first, tuple):  # compressed: one (a, b) pair per replica
            count += sum(np.size(part) for part in first)
        else:  # uncompressed: the tensor itself
            count += np.size(first)
    return count


def _decode_rows(kind, buf, sizes):
    """Splits one replica's int32 buffer into per-variable (a, b) pairs."""
    out, start = [], 0
    for a_len in sizes:
        if kind == "topk":
            values = buf[start : start + a_len].view(np.float32)
            idx = buf[start + a_len : start + 2 * a_len]
            order = np.argsort(idx, kind="stable")
            out.append((idx[order], values[order]))
            start += 2 * a_len
        else:
            words = buf[start : start + a_len]
            scale = buf[start + a_len : start + a_len + 1].view(np.float32)[0]
            out.append((words, scale))
            start += a_len + 1
    assert start == buf.size, (start, buf.size)
    return out


def check_payload(kind, calls, ref_step, q_before, replica_ids):
    """What each local replica sent, and received, equals the reference's.

    Top-k: each replica's indices and values (bitcast to int32 on the wire);
    scaled sign: the packed words bit for bit, and the scale; both in the
    gathered rows of every replica (this replica's own row is what it put
    in). PowerSGD: the Q_r each replica sends, and the P_r: distopt
    orthonormalises the warm start before multiplying (P_r = M_r Q~) where
    the paper multiplies by Q itself; Q~ = Q T with T upper triangular with
    a positive diagonal, so both give the same P^ (checked too).
    """
    import numpy_reference as ref

    num_replicas = len(ref_step["sent"][0])
    if kind in ("topk", "onebit"):
        assert len(calls) == 1, "one all-gather per step"
        (call,) = calls
        sizes = [len(sent[0][0]) for sent in ref_step["sent"]]
        for j, r in enumerate(replica_ids):
            rows = call["outputs"][0][j]
            assert rows.shape[0] == num_replicas
            np.testing.assert_array_equal(rows[r], call["inputs"][0][j])
            for other in range(num_replicas):
                got = _decode_rows(kind, rows[other], sizes)
                for i, (a, b) in enumerate(got):
                    want_a, want_b = ref_step["sent"][i][other]
                    msg = f"replica {other}, variable {i}"
                    np.testing.assert_array_equal(a, want_a, err_msg=msg)
                    np.testing.assert_allclose(
                        b, want_b, rtol=1e-5, atol=1e-7, err_msg=msg
                    )
        return
    assert len(calls) == 2, "two all-reduces per step (P with the rest, then Q)"
    first, second = calls
    comp = [i for i, s in enumerate(ref_step["sent"]) if isinstance(s[0], tuple)]
    plain = [i for i in range(len(ref_step["sent"])) if i not in comp]
    for k, i in enumerate(comp):
        m = ref_step["x"][i].shape[-1]
        start = ref.gram_schmidt(q_before[i])
        p_sum = first["outputs"][len(plain) + k][0]
        np.testing.assert_allclose(
            ref.gram_schmidt(np.float64(p_sum)), ref_step["p_hat"][i], atol=1e-4
        )
        for j, r in enumerate(replica_ids):
            m_r = ref_step["x"][i][r].reshape(-1, m)
            np.testing.assert_allclose(
                first["inputs"][len(plain) + k][j], m_r @ start, rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                second["inputs"][k][j], ref_step["sent"][i][r][1], rtol=1e-4, atol=1e-5
            )
    for k, i in enumerate(plain):
        for j, r in enumerate(replica_ids):
            np.testing.assert_allclose(
                first["inputs"][k][j], ref_step["sent"][i][r], rtol=1e-6
            )


def check_run(
    compressor,
    records,
    shares,
    w0,
    lr,
    replica_ids,
    q0,
    rows=None,
    weighted=False,
    skip=(),
):
    """Compares a run's records with the reference, step by step, replica by replica.

    Each step is checked from the run's own state before it (its residuals
    and Q after the step before): the reference makes that one step, and
    the run's payload, residuals, Q and update must match it within float32
    rounding. Chaining the reference over 20 steps instead would compare
    two trajectories of a power iteration with error feedback, which
    amplifies a float32-versus-float64 difference of 1e-7 past 1e-3 within
    20 steps (measured on PowerSGD here); top-k and scaled sign, run in
    float32 by the reference, are also chained over the whole run
    (`check_chained`). Plain gradient descent: the update of step t is
    `-lr * aggregate_t`, and `w_t - w_0` their sum.

    Args:
        compressor: A key of COMPRESSORS or DECAYED.
        records: The run's records (`run`).
        shares: `shares_of(grads, ...)`: every replica's share per step.
        w0: The initial values.
        lr: The learning rate.
        replica_ids: The replicas whose copies `records` hold (this worker's).
        q0: The Q before the first step (PowerSGD; else Nones).
        rows: Per step, every replica's residual rows ([R, ...] per
            variable) when `records` hold only some replicas (a worker);
            None: `records` hold them all.
        weighted: Weighted mean: the weights travel first, in a scalar
            all-reduce of 4 bytes.
        skip: Steps that must have been skipped: they still send, but every
            copy of every variable, residual and Q stays bit for bit as it
            was.
    """
    kind = _ALL[compressor][0]
    num_replicas = len(shares[0])
    state_rows = rows or [rec["residual"] for rec in records]
    residual = [
        None if r is None else np.zeros((num_replicas, *r.shape[1:]), r.dtype)
        for r in records[0]["residual"]
    ]
    q = q0
    total = [np.zeros(np.shape(w)) for w in w0]
    prev = [np.asarray(w) for w in w0]
    sent_before = 0
    before = None
    for t, rec in enumerate(records):
        msg = f"{compressor} step {t}"
        # A skipped step's shares may be NaN: only its sizes are used.
        with np.errstate(invalid="ignore", over="ignore"):
            (want,) = reference(compressor, [shares[t]], q0=q, residual0=residual)
        if t in skip:
            for key in ("params", "residual", "q"):
                for i, (a, b) in enumerate(zip(rec[key], before[key])):
                    np.testing.assert_array_equal(a, b, err_msg=f"{msg} {key} {i}")
            sent = rec["counters"]["bytes_sent"]
            assert sent - sent_before == 4 * wire_entries(want) + 4 * weighted, msg
            sent_before = sent
            continue
        before = rec
        for i, w in enumerate(w0):
            copies = rec["params"][i]
            for c in copies[1:]:
                np.testing.assert_array_equal(c, copies[0], err_msg=msg)
            step = -lr * np.float64(want["aggregate"][i])
            total[i] += step
            np.testing.assert_allclose(
                copies[0] - prev[i],
                step,
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{msg} update {i}",
            )
            np.testing.assert_allclose(
                copies[0] - w,
                total[i],
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{msg} w - w0 {i}",
            )
            prev[i] = copies[0]
            if want["residual"][i] is None:
                assert rec["residual"][i] is None, msg
            else:
                np.testing.assert_allclose(
                    rec["residual"][i],
                    want["residual"][i][replica_ids],
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{msg} residual {i}",
                )
            if want["q"][i] is not None:
                np.testing.assert_allclose(
                    rec["q"][i],
                    want["q"][i],
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{msg} Q {i}",
                )
        calls = rec["calls"]
        if weighted and calls:
            assert [np.size(x) for x in calls[0]["inputs"][0]] == [1] * len(
                replica_ids
            ), msg
            calls = calls[1:]
        if calls:
            check_payload(kind, calls, want, q, replica_ids)
        # The counter: what one replica put on the wire this step, in bytes.
        sent = rec["counters"]["bytes_sent"]
        assert sent - sent_before == 4 * wire_entries(want) + 4 * weighted, msg
        sent_before = sent
        residual, q = state_rows[t], rec["q"]


def check_chained(compressor, records, shares, replica_ids):
    """The whole run against the reference chained over every step (float32).

    For top-k and scaled sign, whose reference runs in float32: each
    replica's residual after every step, and the final update.
    """
    want = reference(compressor, shares)
    for t, (rec, w) in enumerate(zip(records, want)):
        for i, r in enumerate(w["residual"]):
            np.testing.assert_allclose(
                rec["residual"][i],
                r[replica_ids],
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{compressor} step {t} residual {i}",
            )
    return want
