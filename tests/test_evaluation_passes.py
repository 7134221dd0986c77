"""Every evaluation is one whole test pass, from the test set's first batch.

Each evaluation is checked against a plain forward pass over the test
arrays, with the weights changed between evaluations and a pass cut short
in between; and bit for bit against the next evaluation of the same
weights: the same batches in the same order.
"""

import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored

from distopt import data, trainer_faults
from distopt.trainer import config as config_lib
from distopt.trainer import run as run_lib

# 1000 test examples: not a multiple of any evaluation batch below, so the
# last batch of a whole pass is padded.
TEST_EXAMPLES = 1000


@pytest.fixture(scope="module")
def source():
    splits = {}
    for split, n in (("train", 256), ("test", TEST_EXAMPLES)):
        images, labels = data.load_mnist_idx(split)
        splits[split] = (images[:n], labels[:n])
    return data._in_memory_source("mnist", "test subset", splits, 10)


def _reference(model, source, examples):
    """Loss and accuracy of ``model`` on the first ``examples`` test examples."""
    images, labels = (np.asarray(t)[:examples] for t in source.tensors["test"])
    logits = model(tf.constant(images, tf.float32) / 255.0, training=False)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    hits = np.argmax(logits.numpy(), -1) == labels
    return float(np.mean(loss.numpy())), float(np.mean(hits))


@pytest.fixture
def evaluator(tmp_path, monkeypatch, source):
    """``evaluator(**config)``: (the run, its Evaluator), over 2 replicas."""
    monkeypatch.setattr(data, "load_source", lambda *a, **k: source)
    opened = []

    def make(**overrides):
        config = config_lib.TrainConfig(
            model="mlp",
            train_steps=4,
            batch_size=64,
            jit_compile=False,
            optimizer_args={"jit_compile": False},
            model_dir=str(tmp_path / "run"),
            **overrides,
        )
        signals = trainer_faults.StopSignals()
        run = run_lib.setup(config, mirrored(2), time.time(), signals)
        opened.append((run, signals))
        return run, run_lib.open_outputs(run).evaluator

    yield make
    for run, signals in opened:
        run.close()
        signals.uninstall()


def _perturb(run, seed):
    """New weights (the same on every replica): another model to evaluate."""
    rng = np.random.default_rng(seed)
    with run.strategy.scope():
        for v in run.model.trainable_variables:
            v.assign(v + rng.normal(0, 0.05, v.shape).astype(np.float32))


def _check(run, evaluator, source, step, examples):
    """The evaluation at ``step`` is one whole pass from the first batch.

    Against a forward pass over the arrays (the examples and the metrics),
    and bit for bit against the next evaluation: the same batches in the
    same order.
    """
    result = evaluator.evaluate(step)
    loss, accuracy = _reference(run.model, source, examples)
    assert result["examples"] == examples
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert evaluator.evaluate(step) == result


@pytest.mark.parametrize(
    "overrides, examples",
    [
        # 8 batches of 128, the last one padded from 104 examples.
        ({"eval_batch_size": 128}, TEST_EXAMPLES),
        # 3 batches of 96 (of 11): the pass is cut, not the whole set.
        ({"eval_batch_size": 96, "eval_steps": 3}, 288),
    ],
)
def test_every_evaluation_is_a_whole_pass_from_the_first_example(
    evaluator, source, overrides, examples
):
    run, ev = evaluator(steps_per_loop=3, **overrides)
    for step in range(2):
        _perturb(run, step)
        _check(run, ev, source, step, examples)


def test_an_evaluation_after_one_cut_short_starts_a_new_pass(evaluator, source):
    run, ev = evaluator(steps_per_loop=3, eval_batch_size=128)
    _check(run, ev, source, 1, TEST_EXAMPLES)
    agreement = ev._agreement
    ev._agreement = lambda: (True, False)  # A stop notice after the first chunk.
    assert ev.evaluate(2) is None
    ev._agreement = agreement
    for step in (3,):
        _perturb(run, step)
        _check(run, ev, source, step, TEST_EXAMPLES)
