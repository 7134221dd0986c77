"""Datasets for the trainer: bundled MNIST (offline) or TensorFlow Datasets.

MNIST ships with the package as the four standard IDX files, so a fresh clone
trains with no network. Every file is checked against its SHA-256 on load: a
truncated download or a bad merge shows up as a clear error, not as a model
that quietly trains on garbage.

Any other TFDS image-classification dataset (``fashion_mnist``, ``kmnist``,
...) is read through TensorFlow Datasets, which is imported lazily: it costs
start-up time and the bundled path never needs it.

The input pipeline is built per input pipeline (one per worker) by
:func:`make_dataset_fn`, for ``strategy.distribute_datasets_from_function``.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import os
import struct
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

BUNDLED_DATASET = "mnist"
SOURCES = ("auto", "bundled", "tfds")

# name -> (images file, labels file), the names used by the original MNIST site.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# The checksums live in the code as well as in data_files/SHA256SUMS: a copy
# that was corrupted together with its SHA256SUMS must still be caught.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


class DataError(ValueError):
    """A data file is missing, corrupt or not in the expected format."""


def bundled_dir() -> str:
    """Returns the directory that holds the bundled MNIST files."""
    return str(importlib.resources.files("distopt") / "data_files")


def sha256_file(path: str) -> str:
    """Returns the hex SHA-256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str, expected_sha256: str) -> bytes:
    """Checks that ``path`` exists and has the expected SHA-256.

    Returns:
      The file's bytes, read once for the checksum and for the caller.

    Raises:
      DataError: the file is missing or its checksum differs; the message names
        the file and both checksums.
    """
    if not os.path.isfile(path):
        raise DataError(
            f"MNIST data file {path} is missing (expected SHA-256 "
            f"{expected_sha256}). Reinstall distopt, or restore the file from "
            "version control."
        )
    with open(path, "rb") as f:
        contents = f.read()
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_sha256:
        raise DataError(
            f"MNIST data file {path} is corrupt: SHA-256 {actual}, expected "
            f"{expected_sha256}. Reinstall distopt, or restore the file from "
            "version control."
        )
    return contents


def read_idx(path: str, contents: bytes | None = None) -> np.ndarray:
    """Reads a gzipped IDX file (uint8 payload) into a numpy array.

    Format: big-endian int32 magic (2051 for images, 2049 for labels), one
    big-endian int32 per dimension, then the uint8 values in row-major order.

    Args:
      path: the file, named in errors (and read if ``contents`` is None).
      contents: the file's gzipped bytes, if already read.
    """
    if contents is None:
        with open(path, "rb") as f:
            contents = f.read()
    raw = gzip.decompress(contents)
    (magic,) = struct.unpack(">i", raw[:4])
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise DataError(f"{path}: bad IDX magic number {magic}")
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but the payload differs")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist_idx(
    split: str, directory: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one MNIST split from checksummed IDX files.

    Args:
      split: "train" or "test".
      directory: where the four ``*.gz`` files are; the bundled copy if None.

    Returns:
      (images, labels): uint8 [N, 28, 28, 1] and int32 [N].

    Raises:
      DataError: a file is missing, corrupt or malformed.
    """
    directory = directory or bundled_dir()
    images_file, labels_file = MNIST_FILES[split]
    arrays = []
    for name in (images_file, labels_file):
        path = os.path.join(directory, name)
        arrays.append(read_idx(path, verify_file(path, MNIST_SHA256[name])))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images[..., np.newaxis], labels.astype(np.int32)


@dataclasses.dataclass
class Source:
    """A dataset with its splits, independent of how it is batched.

    Attributes:
      name: dataset name, e.g. "mnist".
      origin: human-readable origin, for the log ("bundled IDX files ...").
      image_shape: (height, width, channels).
      num_classes: number of labels.
      num_examples: split name -> number of examples.
      examples: split name -> zero-argument callable returning an unbatched
        ``tf.data.Dataset`` of (uint8 image, int32 label).
      in_memory: True when ``examples`` already reads from memory, so that a
        ``cache()`` would only store a second copy.
    """

    name: str
    origin: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_examples: dict[str, int]
    examples: dict[str, Callable[[], tf.data.Dataset]]
    in_memory: bool


def _in_memory_source(name, origin, splits, num_classes) -> Source:
    tensors = {}
    # One copy of the data, as tensors pinned to the host; the numpy arrays are
    # dropped so they are not held twice.
    with tf.device("/cpu:0"):
        for split, (images, labels) in splits.items():
            tensors[split] = (tf.constant(images), tf.constant(labels))

    def examples(split):
        return lambda: tf.data.Dataset.from_tensor_slices(tensors[split])

    first = next(iter(splits.values()))[0]
    return Source(
        name=name,
        origin=origin,
        image_shape=tuple(first.shape[1:]),
        num_classes=num_classes,
        num_examples={s: len(labels) for s, (_, labels) in splits.items()},
        examples={s: examples(s) for s in splits},
        in_memory=True,
    )


def _has_idx_files(directory: str) -> bool:
    return all(
        os.path.isfile(os.path.join(directory, f))
        for files in MNIST_FILES.values()
        for f in files
    )


def _has_tfds_data(data_dir: str, name: str) -> bool:
    # TFDS lays prepared data out as <data_dir>/<name>[/<config>]/<version>/.
    pattern = os.path.join(data_dir, name, "**", "dataset_info.json")
    return bool(glob.glob(pattern, recursive=True))


def _tfds_source(name: str, data_dir: str | None, download: bool) -> Source:
    import tensorflow_datasets as tfds  # Lazy: ~0.5 s of start-up we rarely need.

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
    except Exception as e:  # TFDS raises many types; all mean "not available".
        raise DataError(
            f"Dataset {name!r} is not available through TensorFlow Datasets "
            f"(data_dir={data_dir!r}): {e}. Prepare it with `tfds build {name} "
            "--data_dir=...` on a machine with network access, then pass "
            "--data_dir."
        ) from e
    info = builder.info
    image_shape = tuple(info.features["image"].shape)
    num_classes = info.features["label"].num_classes

    def examples(split):
        def fn():
            ds = builder.as_dataset(split=split, as_supervised=True)
            return ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))

        return fn

    splits = ("train", "test")
    return Source(
        name=name,
        origin=f"TensorFlow Datasets {name} {info.version} in {builder.data_dir}",
        image_shape=image_shape,
        num_classes=num_classes,
        num_examples={s: _tfds_num_examples(builder, s) for s in splits},
        examples={s: examples(s) for s in splits},
        in_memory=False,
    )


def _tfds_num_examples(builder, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:
        pass  # No split metadata (e.g. under tfds.testing.mock_data): count.
    ds = builder.as_dataset(split=split)
    n = int(ds.cardinality())
    if n < 0:
        n = int(ds.reduce(0, lambda count, _: count + 1))
    return n


def load_source(
    name: str = BUNDLED_DATASET,
    data_dir: str | None = None,
    source: str = "auto",
) -> Source:
    """Finds a dataset and describes where it comes from.

    With ``source="auto"``:
      * mnist, ``data_dir`` holding the four IDX files: those, checksummed;
      * mnist, ``data_dir`` holding prepared TFDS data: TFDS;
      * mnist otherwise: the bundled IDX files (offline);
      * any other name: TFDS (prepared in ``data_dir``, or downloaded).

    Args:
      name: dataset name; anything other than "mnist" needs TFDS.
      data_dir: optional directory with IDX files or prepared TFDS data.
      source: "auto", "bundled" (the IDX files) or "tfds".

    Returns:
      A :class:`Source`. The choice is logged.

    Raises:
      ValueError: an unknown source, or a non-MNIST dataset asked of the
        bundled files.
      DataError: the data is missing or corrupt.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown data source {source!r}; valid: {list(SOURCES)}")
    if source == "bundled" and name != BUNDLED_DATASET:
        raise ValueError(f"Only {BUNDLED_DATASET} is bundled, not {name!r}")

    if source == "tfds" or (
        source == "auto"
        and (name != BUNDLED_DATASET or (data_dir and _has_tfds_data(data_dir, name)))
    ):
        prepared = bool(data_dir) and _has_tfds_data(data_dir, name)
        result = _tfds_source(name, data_dir, download=not prepared)
    else:
        directory = bundled_dir()
        origin = "bundled IDX files"
        if data_dir and source == "auto" and _has_idx_files(data_dir):
            directory, origin = data_dir, "IDX files"
        splits = {s: load_mnist_idx(s, directory) for s in MNIST_FILES}
        result = _in_memory_source(
            name, f"{origin} in {directory} (SHA-256 verified)", splits, 10
        )
    logging.info(
        "Data: %s from %s; %s",
        name,
        result.origin,
        ", ".join(f"{s} {n} examples" for s, n in result.num_examples.items()),
    )
    return result


def normalize(images: tf.Tensor, labels: tf.Tensor, *rest: tf.Tensor) -> tuple:
    """Scales uint8 pixels to float32 in [0, 1]; passes the rest through."""
    return (tf.cast(images, tf.float32) * (1.0 / 255.0), labels, *rest)


def eval_steps(
    num_examples: int,
    global_batch_size: int,
    num_input_pipelines: int = 1,
    max_steps: int | None = None,
) -> int:
    """Global steps of one evaluation pass, the same on every pipeline.

    Every pipeline pads its shard (at most ``ceil(num_examples / pipelines)``
    examples) to this many steps of ``global_batch_size / pipelines``.
    """
    shard_size = -(-num_examples // num_input_pipelines)
    per_pipeline_batch = global_batch_size // num_input_pipelines
    steps = -(-shard_size // per_pipeline_batch)
    return min(steps, max_steps) if max_steps else steps


def make_dataset_fn(
    source: Source,
    split: str,
    global_batch_size: int,
    *,
    training: bool,
    seed: int = 0,
    drop_remainder: bool = True,
    start_step: int = 0,
    max_steps: int | None = None,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """Builds the ``dataset_fn`` for ``strategy.distribute_datasets_from_function``.

    Each input pipeline (one per worker) reads its own shard of the examples
    and yields per-replica batches; the strategy hands consecutive batches to
    the replicas that pipeline feeds.

    Training yields (images, labels) and repeats forever, reshuffling every
    epoch from ``seed``. The sequence of batches is thus a pure function of
    the seed: resuming at ``start_step`` skips exactly the batches consumed
    so far, instead of storing the iterator (and a full shuffle buffer) in
    every checkpoint.

    Evaluation yields (images, labels, mask): one pass in order, padded with
    mask-0 examples to whole batches, the same number of batches on every
    pipeline. Shapes stay static (XLA, TPUs) and masked sums over replicas
    give exact metrics however the last batch falls.

    Args:
      source: where the examples come from.
      split: "train" or "test".
      global_batch_size: examples per step over all replicas.
      training: the training pipeline (else evaluation).
      seed: shuffle seed.
      drop_remainder: training only: drop each epoch's last partial batch.
        Without it, a replica's batch may be short or empty; weighted_mean
        aggregation keeps the gradient exact then.
      start_step: training only: global steps already taken.
      max_steps: evaluation only: stop after this many global batches.

    Returns:
      A function of a ``tf.distribute.InputContext`` returning a dataset.
    """

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = input_context.get_per_replica_batch_size(global_batch_size)
        pipelines = input_context.num_input_pipelines
        # Under MirroredStrategy one pipeline feeds all local replicas, taking
        # one batch each per step.
        replicas_per_pipeline = input_context.num_replicas_in_sync // pipelines
        shard_size = -(-source.num_examples[split] // pipelines)
        ds = source.examples[split]()
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
        if not source.in_memory:
            ds = ds.cache()
        if training:
            ds = ds.shuffle(shard_size, seed=seed, reshuffle_each_iteration=True)
            ds = ds.batch(batch, drop_remainder=drop_remainder).repeat()
            if start_step:
                ds = ds.skip(start_step * replicas_per_pipeline)
        else:
            step_examples = batch * replicas_per_pipeline
            steps = eval_steps(
                source.num_examples[split], global_batch_size, pipelines, max_steps
            )
            ds = ds.map(lambda x, y: (x, y, tf.constant(1.0)))
            padding = tf.data.Dataset.from_tensors(
                (
                    tf.zeros(source.image_shape, tf.uint8),
                    tf.constant(0, tf.int32),
                    tf.constant(0.0),
                )
            ).repeat()
            ds = ds.concatenate(padding).take(steps * step_examples)
            ds = ds.batch(batch, drop_remainder=True)
        ds = ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn
