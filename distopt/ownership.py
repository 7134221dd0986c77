"""One owner for each stateful part of an optimizer.

A compressor (its residuals and Q), a sync mode (its snapshots, anchors and
counters) and DiLoCo's outer optimizer (its slots) are built once, for the
variables of the optimizer that first uses them. Handed to a second
optimizer (a sweep that makes one `TopK(0.01)` and passes it to each trial),
a built compressor compressed nothing and said nothing, and a shared DiLoCo
failed with a `KeyError` at trace time. So each is claimed when an optimizer
(or a sync mode) takes it, and a second claim is refused, naming the
argument.
"""

from __future__ import annotations

_OWNER = "_distopt_owner"


def claim(part, argument: str, owner: str) -> None:
    """Marks `part` as `owner`'s, or raises ValueError if another has it.

    Args:
        part: A compressor, sync mode or optimizer instance (None: nothing).
        argument: The constructor argument it came in, for the message.
        owner: Who takes it, for the message.
    """
    claim_all([(part, argument)], owner)


def claim_all(parts, owner: str) -> None:
    """Claims every `(part, argument)` of `parts` for `owner`, or none.

    Call it once nothing can fail any more: a constructor that raises must
    leave what it was given free for the corrected call (a failed
    `Adam(compression=c, ...)` had claimed `c`, and the retry was refused).
    """
    check_free(parts)
    for part, _ in parts:
        if part is not None:
            # Not tracked by tf.Module (a str), so checkpoints are unchanged.
            object.__setattr__(part, _OWNER, owner)


def check_free(parts) -> None:
    """Raises ValueError, naming the argument, if a `(part, argument)` is taken."""
    for part, argument in parts:
        taken = getattr(part, _OWNER, None) if part is not None else None
        if taken is not None:
            kind = type(part).__name__
            raise ValueError(
                f"{argument}: this {kind} instance already belongs to {taken}, "
                "whose variables its state is made for; pass a new instance here."
            )
