"""Optimizer state sharded across replicas (ZeRO stage 1).

Rajbhandari et al. (SC 2020), "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", arXiv 1910.02054, stage 1 (P_os): each of the N
replicas keeps 1/N of every slot and updates 1/N of every variable; the
parameters stay whole on every replica.

Layout. The variables of one dtype (and slot set) are laid end to end in a
flat buffer of T elements, in build order, padded to N * S with S =
ceil(T / N); replica r owns elements [r S, (r + 1) S). Every replica holds
the same number of elements whatever the variable shapes (torch_xla's even
split, not PyTorch's whole-parameter assignment, which can be unbalanced),
and the padding is at most N - 1 elements per group. A variable may span
several shards.

One step, per group, after the Reducer (unchanged: the transforms and the
skip verdict are those of the whole aggregated gradient):

    g_r, p_r     replica r's elements of the aggregated gradient and of its
                 own copy of the parameters (static slices, no communication)
    rule         the optimizer's update on the shard, with the slots' shard
                 (one kernel; the same `_rule` as the unsharded update)
    all-gather   every replica's updated shard, into every replica's copy
                 (`Reducer.all_gather`, counted); skipped with the step

Layer-wise rules (Lamb, Lars) need each variable's norms over the whole
variable: the rule runs once on the shard to collect each variable's partial
sums of squares, one all-reduce sums them (2 floats per variable), and the
rule runs again with the true norms. A variable absent from a step (no
gradient) or kept by `var_ok` is kept element by element.

Checkpoints hold the logical state: each slot of each variable is a
`SlotView` (a `distribute.LogicalState`) at the path where an unsharded
optimizer keeps that slot's variable, so a checkpoint restores on any
number of replicas, sharded or not, with no consolidation call.

Communication: the gradient is all-reduced as without sharding (the
strategies' public collectives offer no reduce-scatter; TensorFlow's
`CollectiveReduceScatterV2` is a raw op with keys of its own) and each
replica takes its slice; the parameters then travel in one all-gather of
T elements per group. A ring reduce-scatter plus all-gather would move the
bytes of one all-reduce (ZeRO's claim); here the all-gather is extra.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from distopt import distribute as dist


@dataclasses.dataclass(frozen=True)
class Group:
    """Variables of one dtype and slot set, laid end to end, cut in N shards."""

    dtype: tf.DType
    slot_names: tuple
    members: tuple  # Indices of the variables in build order.
    sizes: tuple
    shapes: tuple
    num_shards: int

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def shard_size(self) -> int:
        return -(-self.total // self.num_shards)

    def offset(self, k: int) -> int:
        """Where member `k` starts in the flat buffer."""
        return sum(self.sizes[:k])

    def pieces(self, r: int) -> tuple:
        """Shard r's pieces: `(member, start in var, end in var)`, in order."""
        lo, hi = r * self.shard_size, (r + 1) * self.shard_size
        out, off = [], 0
        for k, n in enumerate(self.sizes):
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                out.append((k, a - off, b - off))
            off += n
        return tuple(out)

    def padding(self, r: int) -> int:
        return self.shard_size - sum(b - a for _, a, b in self.pieces(r))

    def segments(self, r: int) -> tuple:
        """`((segment, length), ...)` of shard r; the padding is segment `len(members)`."""
        segs = tuple((k, b - a) for k, a, b in self.pieces(r))
        pad = self.padding(r)
        return segs + (((len(self.members), pad),) if pad else ())


def make_groups(variables, slot_names, num_shards) -> list[Group]:
    """The groups of `variables`: by dtype and slot names, in build order."""
    by_key: dict[tuple, list[int]] = {}
    for i, v in enumerate(variables):
        by_key.setdefault((v.dtype, tuple(sorted(slot_names[i]))), []).append(i)
    return [
        Group(
            dtype=dtype,
            slot_names=names,
            members=tuple(idx),
            sizes=tuple(int(variables[i].shape.num_elements()) for i in idx),
            shapes=tuple(variables[i].shape for i in idx),
            num_shards=num_shards,
        )
        for (dtype, names), idx in by_key.items()
    ]


class ShardedSlots(tf.Module):
    """Every slot's shards (one variable per group and slot name) and their views.

    Args:
        strategy: The strategy (N replicas).
        variables: The optimizer's variables, in build order.
        inits: For each variable, `{slot name: (initial value, dtype)}`.
    """

    def __init__(self, strategy, variables, inits):
        super().__init__(name="sharded_slots")
        self._strategy = strategy
        n = strategy.num_replicas_in_sync
        self.groups = make_groups(variables, [list(x) for x in inits], n)
        self._storage = {}
        views = [{} for _ in variables]
        # Not tracked here: the optimizer tracks each view where an unsharded
        # optimizer keeps that slot's variable.
        self._views = dist.Untracked(views)
        # Created and written eagerly even when a tf.function builds lazily:
        # a variable created in a trace is initialised by the function after
        # the trace (to its initial value, zeros here), which would undo the
        # slots' initial values and a deferred checkpoint restoration
        # written below. A mirrored variable's copies all start from the
        # first one's value, so the shards cannot be given their own
        # initial values; they are written after creation instead.
        with tf.init_scope(), strategy.scope():
            self._create(strategy, variables, inits, views)

    def _create(self, strategy, variables, inits, views):
        for g, group in enumerate(self.groups):
            for name in group.slot_names:
                dtype = inits[group.members[0]][name][1]
                store = dist.per_replica_zeros(
                    strategy,
                    None,
                    dtype,
                    shape=[group.shard_size],
                    name=f"{name}_shard",
                )
                self._storage[(g, name)] = dist.Untracked(store)
                for k, i in enumerate(group.members):
                    views[i][name] = SlotView(
                        strategy, group, k, store, variables[i].shape, dtype
                    )
        for i, slot_inits in enumerate(inits):
            for name, (init, dtype) in slot_inits.items():
                value = init() if callable(init) else init
                views[i][name].assign_logical(tf.cast(value, dtype))

    @property
    def views(self) -> list:
        """For each variable, `{slot name: SlotView}`."""
        return self._views.value

    def storage(self, g: int, name: str) -> tf.Variable:
        return self._storage[(g, name)].value

    def storage_variables(self) -> list:
        return [h.value for h in self._storage.values()]


class SlotView(dist.LogicalState):
    """One variable's slot, held in pieces in its group's shards.

    Its logical value is the slot as an unsharded optimizer holds it, so
    checkpoints, `numpy()`, `np.asarray`, `read_value()`, `assign()` and
    any TensorFlow op (`tf.norm(view)`) see the whole slot. Python's
    operators do not take it (`view + 1`): read it first.
    """

    def __init__(self, strategy, group, member, storage, shape, dtype):
        super().__init__(name="slot_view")
        self._strategy = strategy
        self._group = group
        self._member = member
        self._store = dist.Untracked(storage)
        self._shape = tf.TensorShape(shape)
        self._dtype = tf.as_dtype(dtype)

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    def storage_variables(self) -> list:
        return [self._store.value]

    def read_value(self):
        """The whole slot, as the unsharded slot variable's `read_value()`."""
        return self.logical_value()

    value = read_value

    def _locations(self):
        """`(replica, start in shard, end in shard, start in var)` of each piece."""
        group, k = self._group, self._member
        off, n = group.offset(k), group.sizes[k]
        s = group.shard_size
        out = []
        for r in range(group.num_shards):
            a, b = max(off, r * s), min(off + n, (r + 1) * s)
            if a < b:
                out.append((r, a - r * s, b - r * s, a - off))
        return out

    def logical_value(self):
        locations = self._locations()
        if not locations:
            # An empty variable has no piece in any shard (and `tf.concat`
            # takes no empty list): its slot is empty, nothing to gather.
            return tf.zeros(self._shape, self._dtype)
        with self._strategy.scope():
            shards = self._replica_shards()
            parts = [shards[r][a:b] for r, a, b, _ in locations]
            return tf.reshape(tf.concat(parts, 0), self._shape)

    def _replica_shards(self):
        """Every replica's shard, by replica id: local copies, else gathered."""
        strategy, store = self._strategy, self._store.value
        local = dist.local_values(strategy, store)
        if len(local) == strategy.num_replicas_in_sync:
            return [tf.convert_to_tensor(c) for c in local]
        flat = dist.map_per_replica(strategy, tf.convert_to_tensor, store)
        (rows,) = dist.all_gather_rows(strategy, [flat])
        return tf.unstack(dist.first_local(strategy, rows))

    def assign_logical(self, value):
        flat = tf.reshape(tf.cast(value, self._dtype), [-1])
        store = self._store.value
        with self._strategy.scope():
            ids = dist.local_replica_ids(self._strategy)
            for copy, r in zip(dist.local_values(self._strategy, store), ids):
                for rr, a, b, c in self._locations():
                    if rr == r:
                        copy[a:b].assign(flat[c : c + b - a])


def apply(optimizer, state, strategy, grads, variables, lr, step, scale, ok, var_ok):
    """The sharded update of `variables` with aggregated `grads` (see module doc).

    Args:
        optimizer: The optimizer (its `_rule`, `variable_index`, reducer).
        state: Its `ShardedSlots`.
        strategy: The strategy in scope.
        grads: Per-replica dense aggregated gradients, one per variable.
        variables: The variables to update.
        lr, step, scale, ok: As for `Optimizer._rule`.
        var_ok: A scalar bool or None per variable.
    """
    every = optimizer.built_variables()
    given = {optimizer.variable_index(v): j for j, v in enumerate(variables)}
    for g, group in enumerate(state.groups):
        # A group of empty variables (a float16 Dense(0) bias alone in its
        # dtype) has shards of 0 elements: nothing to update or to send.
        if group.total == 0 or not any(i in given for i in group.members):
            continue
        stores = [state.storage(g, n) for n in group.slot_names]
        members = [every[i] for i in group.members]
        gs = [grads[given[i]] if i in given else None for i in group.members]
        vok = [var_ok[given[i]] if i in given else None for i in group.members]
        present = [i in given for i in group.members]
        shards = _step_group(
            optimizer,
            strategy,
            group,
            stores,
            members,
            gs,
            present,
            vok,
            lr,
            step,
            scale,
            ok,
        )
        written = [v for v, p in zip(members, present) if p]

        def gather_and_assign(
            shards=shards,
            group=group,
            members=members,
            present=present,
            written=written,
        ):
            (rows,) = optimizer.reducer.all_gather(strategy, [shards])
            dist.update_together(
                strategy, written, _assign_from_rows, rows, group, tuple(present)
            )

        if ok is None:
            gather_and_assign()
        else:
            # A skipped step changes nothing: no need to send the shards.
            dist.cond(dist.first_local(strategy, ok), gather_and_assign, lambda: None)


def _step_group(
    optimizer,
    strategy,
    group,
    stores,
    members,
    grads,
    present,
    var_ok,
    lr,
    step,
    scale,
    ok,
):
    """Each replica's new parameter shard; writes the slot shards."""
    masked = not all(present) or any(x is not None for x in var_ok)
    dtype = optimizer.slot_dtype(members[0])

    def inputs(r, i):
        pick = lambda xs: [_local(strategy, x, i) for x in xs]
        p = _shard_of(group, r, pick(members), group.dtype)
        g = _shard_of(group, r, pick(grads), dtype)
        if not masked:
            return p, g
        return p, g, _keep_mask(group, r, present, pick(var_ok))

    p, g, *keep = dist.by_replica(strategy, inputs)
    keep = keep[0] if keep else None
    # Which replica a device's copy serves: its shard's place, static.
    devices = [c.device for c in dist.local_values(strategy, members[0])]
    rid = dict(zip(devices, dist.local_replica_ids(strategy)))
    totals = None
    if optimizer.layerwise:
        partial = dist.update_together(
            strategy,
            members,
            _partials_on_device(optimizer, group, rid),
            stores,
            p,
            g,
            lr,
            step,
            scale,
        )
        (totals,) = optimizer.reducer.all_reduce(strategy, [partial])
    # Anchored on the group's variables (a rule without slots has no
    # stores); nothing writes them here.
    return dist.update_together(
        strategy,
        members,
        _update_on_device(optimizer, group, rid),
        stores,
        p,
        g,
        lr,
        step,
        scale,
        ok,
        keep,
        totals,
    )


def _update_on_device(optimizer, group, rid):
    def update(members, stores, p, g, lr, step, scale, ok, keep, totals):
        r = rid[members[0].device]
        old = {n: tf.convert_to_tensor(s) for n, s in zip(group.slot_names, stores)}
        layout = ("segments", group.segments(r), len(group.members) + 1)
        new_p, new = optimizer._flat_kernel(
            p,
            g,
            old,
            lr,
            step,
            scale,
            _combine(ok, keep),
            layout if totals is not None else None,
            totals,
        )
        for n, s in zip(group.slot_names, stores):
            s.assign(new[n], read_value=False)
        return new_p

    return update


def _partials_on_device(optimizer, group, rid):
    def partials(members, stores, p, g, lr, step, scale):
        r = rid[members[0].device]
        old = {n: tf.convert_to_tensor(s) for n, s in zip(group.slot_names, stores)}
        layout = ("segments", group.segments(r), len(group.members) + 1)
        return optimizer._norm_partials(p, g, old, lr, step, scale, layout)

    return partials


def _combine(ok, keep):
    """The element-wise verdict: `ok` (a scalar or None) and not `keep`."""
    if keep is None:
        return ok
    good = tf.logical_not(keep)
    return good if ok is None else tf.logical_and(ok, good)


def _keep_mask(group, r, present, var_ok):
    """True where shard r's elements must keep their values (or None: nowhere)."""
    if all(present) and all(x is None for x in var_ok):
        return None
    parts = []
    for k, a, b in group.pieces(r):
        keep = (
            tf.logical_not(var_ok[k]) if var_ok[k] is not None else tf.constant(False)
        )
        keep = tf.constant(True) if not present[k] else keep
        parts.append(tf.fill([b - a], keep))
    pad = group.padding(r)
    if pad:
        parts.append(tf.fill([pad], tf.constant(True)))
    return tf.concat(parts, 0)


def _shard_of(group, r, tensors, dtype):
    """Shard r of the flat buffer of `tensors` (None: zeros), padded with zeros."""
    parts = []
    for k, a, b in group.pieces(r):
        t = tensors[k]
        if t is None:
            parts.append(tf.zeros([b - a], dtype))
        else:
            parts.append(tf.cast(tf.reshape(tf.convert_to_tensor(t), [-1])[a:b], dtype))
    pad = group.padding(r)
    if pad:
        parts.append(tf.zeros([pad], dtype))
    return tf.concat(parts, 0) if len(parts) > 1 else parts[0]


def _assign_from_rows(copies, rows, group, present):
    """Writes the gathered shards (`[N, S]`) into this device's copies."""
    flat = tf.reshape(rows, [-1])
    written = [k for k, p in enumerate(present) if p]
    for var, k in zip(copies, written):
        off = group.offset(k)
        part = flat[off : off + group.sizes[k]]
        var.assign(
            tf.reshape(tf.cast(part, var.dtype), group.shapes[k]), read_value=False
        )


def _local(strategy, value, i):
    """Device i's component of `value` (a plain value is everyone's)."""
    if value is None or not isinstance(value, tf.distribute.DistributedValues):
        return value
    return dist.local_values(strategy, value)[i]
