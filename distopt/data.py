"""Datasets for the trainer: bundled MNIST (offline) or TensorFlow Datasets.

MNIST ships with the package as the four standard IDX files, so a fresh clone
trains with no network. Every file is checked against its SHA-256 on load: a
truncated download or a bad merge shows up as a clear error, not as a model
that quietly trains on garbage.

Any other TFDS image-classification dataset (``fashion_mnist``, ``kmnist``,
...) is read through TensorFlow Datasets, which is imported lazily: it costs
start-up time and the bundled path never needs it.

Training batches reach the replicas in one of two ways (``--input``):

* :class:`InMemoryFeed`: the split, already in memory (bundled MNIST), is
  placed once on every replica's device, and each step gathers its global
  batch there from a per-epoch permutation that is a pure function of (seed,
  epoch). No input pipeline runs at all; single-host strategies only.
* :class:`DatasetFeed`: a ``tf.data`` pipeline built per input pipeline (one
  per worker) by :func:`make_dataset_fn`, for
  ``strategy.distribute_datasets_from_function``. Any source, any strategy;
  evaluation always reads this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import logging as std_logging
import os
import socket
import struct
import tempfile
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from distopt import distribute, made_dirs

BUNDLED_DATASET = "mnist"
SOURCES = ("auto", "bundled", "tfds")
# How training batches reach the replicas (see the module docstring).
INPUTS = ("auto", "memory", "dataset")

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
      tensors: split name -> (uint8 images, int32 labels) as host tensors,
        for in-memory sources (what :class:`InMemoryFeed` reads); else None.
    """

    name: str
    origin: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_examples: dict[str, int]
    examples: dict[str, Callable[[], tf.data.Dataset]]
    in_memory: bool
    tensors: dict[str, tuple[tf.Tensor, tf.Tensor]] | None = None


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
        tensors=tensors,
    )


def _present_idx_files(directory: str) -> list[str]:
    return [f for f in MNIST_SHA256 if os.path.isfile(os.path.join(directory, f))]


def _has_tfds_data(data_dir: str, name: str) -> bool:
    # TFDS lays prepared data out as <data_dir>/<name>[/<config>]/<version>/.
    pattern = os.path.join(data_dir, name, "**", "dataset_info.json")
    return bool(glob.glob(pattern, recursive=True))


def tfds_default_data_dir() -> str:
    """TFDS's data directory when no ``data_dir`` is given (``TFDS_DATA_DIR``)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def _is_remote(path: str) -> bool:
    return "://" in path  # gs://, s3://, hdfs://: TFDS and tf.io handle those.


def resolve_kind(name: str, data_dir: str | None, source: str = "auto") -> str:
    """Where ``load_source`` reads from: "bundled", "idx" or "tfds".

    With ``source="auto"``, mnist comes from the bundled files without a
    ``data_dir``; with one, from its IDX files if it holds any of them, else
    through TFDS. Every other dataset comes through TFDS.
    """
    if source == "tfds" or name != BUNDLED_DATASET:
        return "tfds"
    if source == "bundled" or not data_dir:
        return "bundled"
    if _is_remote(data_dir) or _has_tfds_data(data_dir, name):
        return "tfds"
    return "idx" if _present_idx_files(data_dir) else "tfds"


def check_data_dir(
    name: str,
    data_dir: str | None,
    source: str = "auto",
    download: bool = False,
) -> list[str]:
    """Checks, reading no data and writing nothing, that the data can be found.

    Args:
      name: dataset name.
      data_dir: the ``--data_dir`` flag (None: not given).
      source: "auto", "bundled" or "tfds".
      download: whether TFDS may download what is not prepared.

    Returns:
      One line per problem, naming the flag; empty when the data is there.
    """
    if source == "bundled":
        problems = []
        if name != BUNDLED_DATASET:
            problems.append(
                f"--data_source=bundled has {BUNDLED_DATASET} only, not "
                f"--dataset={name}"
            )
        if data_dir:
            problems.append(
                f"--data_dir={data_dir} is not used with --data_source=bundled; "
                "drop one of the two"
            )
        return problems
    kind = resolve_kind(name, data_dir, source)
    if data_dir and not _is_remote(data_dir):
        if not os.path.exists(data_dir):
            return [f"--data_dir={data_dir} does not exist"]
        if not os.path.isdir(data_dir):
            return [f"--data_dir={data_dir} is not a directory"]
        if not os.access(data_dir, os.R_OK | os.X_OK):
            return [f"--data_dir={data_dir} is not readable"]
    if kind == "idx":
        missing = [f for f in MNIST_SHA256 if f not in _present_idx_files(data_dir)]
        if missing:
            return [
                (
                    f"--data_dir={data_dir} lacks the MNIST files "
                    f"{', '.join(missing)} (it holds the others)"
                )
            ]
        return []
    if kind == "bundled" or (data_dir and _is_remote(data_dir)):
        return []
    directory = data_dir or tfds_default_data_dir()
    if _has_tfds_data(directory, name):
        return []
    flag = f"--data_dir={data_dir}" if data_dir else "TFDS's data directory"
    if not download:
        hint = f"--data_dir={data_dir}" if data_dir else "--data_dir=DIR"
        what = (
            f"neither the MNIST IDX files ({', '.join(MNIST_SHA256)}) nor "
            "prepared TFDS data for mnist"
            if name == BUNDLED_DATASET and source == "auto"
            else f"no prepared TFDS data for {name}"
        )
        return [
            (
                f"{flag} ({directory}) holds {what}; pass --download to download "
                f"{name} through TFDS, or prepare it with `tfds build {name} "
                f"{hint}`"
            )
        ]
    # --download writes into the directory, or creates it under an existing
    # parent (TFDS's default directory need not exist yet).
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} ({directory}) is not writable; --download must write there"]
    return []


# TFDS retries a failed request 10 times with back-off: minutes without a
# network. A download with --download tries this many times, each connection
# attempt bounded by _DOWNLOAD_SOCKET_TIMEOUT seconds.
_DOWNLOAD_RETRIES = 1
_DOWNLOAD_SOCKET_TIMEOUT = 30.0


@contextlib.contextmanager
def _fail_fast_downloads():
    """Few retries, bounded connects, no progress bars or retry warnings."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    # MAX_RETRIES is a module constant read at each request; if a TFDS version
    # drops it, its own default applies.
    saved_retries = getattr(downloader, "MAX_RETRIES", None)
    saved_timeout = socket.getdefaulttimeout()
    if saved_retries is not None:
        downloader.MAX_RETRIES = _DOWNLOAD_RETRIES
    socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT)
    # "Retrying ..." per file, also from download threads still running after
    # the first failure: left at ERROR for the process (distopt makes no
    # other HTTP requests).
    std_logging.getLogger("urllib3").setLevel(std_logging.ERROR)
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        socket.setdefaulttimeout(saved_timeout)
        if saved_retries is not None:
            downloader.MAX_RETRIES = saved_retries


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _import_tfds():
    """TensorFlow Datasets, or a DataError with the reason it did not load.

    A broken install does not fail at `import tensorflow_datasets`: TFDS logs
    the traceback and leaves a module without `builder`, which read as a
    download's AttributeError ("check the network"). Seen (2026-12-07) with
    TensorFlow 2.16 to 2.19: tensorflow-metadata 1.21 is generated for
    protobuf 6.31 and does not say so, and those TensorFlows cap protobuf
    below 6.
    """
    import tensorflow_datasets as tfds  # Lazy: ~0.5 s of start-up we rarely need.

    if hasattr(tfds, "builder"):
        return tfds
    try:
        import tensorflow_datasets.core  # noqa: F401 (its error is the reason)

        reason = "its `builder` is missing"
    except Exception as e:  # noqa: BLE001 (any import error is the answer)
        reason = f"{type(e).__name__}: {_first_line(e)}"
    hint = "reinstall tensorflow-datasets"
    if "tensorflow_metadata" in reason and "protobuf" in reason.lower():
        hint = (
            f"tensorflow-metadata needs a newer protobuf than TensorFlow "
            f"{tf.__version__} allows: pip install 'tensorflow-metadata<1.21'"
        )
    raise DataError(
        f"TensorFlow Datasets could not be imported ({reason}); {hint}. "
        "MNIST needs none of it (the bundled files, --data_source=bundled)."
    )


def _tfds_builder(tfds, name: str, data_dir: str | None):
    """``tfds.builder(name, data_dir=data_dir)``, leaving no empty directory.

    A builder of a dataset not prepared in ``data_dir`` fetches its metadata
    into ``tempfile.mkdtemp("tfds")`` (TFDS 4.9's
    ``DatasetInfo.initialize_from_bucket``) and never removes it: offline it
    stays empty, one in the temporary directory per failed run (the suite left
    about 470 in a day). Here they are made in a directory of distopt's own
    (``tempfile.tempdir`` for the call: the public way to move ``mkdtemp``),
    and empty ones are removed after, with it. One that holds files (the
    metadata, fetched online) is left: the builder may read it later.
    """
    saved = tempfile.tempdir  # Before mkdtemp, which caches the default in it.
    parent = tempfile.mkdtemp(prefix="distopt-tfds-")
    tempfile.tempdir = parent
    try:
        return tfds.builder(name, data_dir=data_dir)
    finally:
        tempfile.tempdir = saved
        for entry in os.scandir(parent):
            made_dirs.remove_if_empty([entry.path])
        made_dirs.remove_if_empty([parent])


def _tfds_source(name: str, data_dir: str | None, download: bool) -> Source:
    tfds = _import_tfds()

    if download:
        logging.info(
            "Downloading %s through TensorFlow Datasets into %s (--download)",
            name,
            data_dir or tfds_default_data_dir(),
        )
        try:
            builder = _tfds_builder(tfds, name, data_dir)
            with _fail_fast_downloads():
                builder.download_and_prepare()
        except Exception as e:  # Network, disk or TFDS errors: all fatal here.
            raise DataError(
                f"Downloading {name!r} through TensorFlow Datasets into "
                f"{data_dir or tfds_default_data_dir()} failed "
                f"({type(e).__name__}: {_first_line(e)}). Check the network, or "
                f"prepare it elsewhere with `tfds build {name} --data_dir=DIR` and "
                "pass --data_dir=DIR."
            ) from e
    splits = ("train", "test")
    try:
        if not download:
            builder = _tfds_builder(tfds, name, data_dir)
        info = builder.info
        image_shape = tuple(info.features["image"].shape)
        num_classes = info.features["label"].num_classes
        num_examples = {s: _tfds_num_examples(builder, s) for s in splits}
    except Exception as e:  # TFDS raises many types; all mean "not available".
        raise DataError(
            f"Dataset {name!r} is not available through TensorFlow Datasets "
            f"(data_dir={data_dir!r}): {_first_line(e)}. Pass --download, or "
            f"prepare it with `tfds build {name} --data_dir=DIR` on a machine "
            "with network access and pass --data_dir=DIR."
        ) from e

    def examples(split):
        def fn():
            ds = builder.as_dataset(split=split, as_supervised=True)
            return ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))

        return fn

    return Source(
        name=name,
        origin=f"TensorFlow Datasets {name} {info.version} in {builder.data_dir}",
        image_shape=image_shape,
        num_classes=num_classes,
        num_examples=num_examples,
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
    *,
    download: bool = False,
) -> Source:
    """Finds a dataset and describes where it comes from.

    With ``source="auto"`` (see :func:`resolve_kind`):
      * mnist without ``data_dir``: the bundled IDX files (offline);
      * mnist, ``data_dir`` holding IDX files: those, all four, checksummed;
      * mnist, ``data_dir`` otherwise, and any other name: TFDS, from data
        prepared in ``data_dir`` (TFDS's own directory if None), downloaded
        there first only if ``download``.

    A ``data_dir`` that does not exist is an error, never a place to download
    into or a reason to fall back to the bundled files.

    Args:
      name: dataset name; anything other than "mnist" needs TFDS.
      data_dir: optional directory with IDX files or prepared TFDS data.
      source: "auto", "bundled" (the IDX files) or "tfds".
      download: let TFDS download and prepare missing data.

    Returns:
      A :class:`Source`. The choice is logged.

    Raises:
      ValueError: an unknown source, or a non-MNIST dataset asked of the
        bundled files.
      DataError: the data is missing or corrupt, or the download failed.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown data source {source!r}; valid: {list(SOURCES)}")
    if source == "bundled" and name != BUNDLED_DATASET:
        raise ValueError(f"Only {BUNDLED_DATASET} is bundled, not {name!r}")
    if data_dir and not _is_remote(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist or is not a directory")

    kind = resolve_kind(name, data_dir, source)
    if kind == "tfds":
        result = _tfds_source(name, data_dir, download)
    else:
        directory = data_dir if kind == "idx" else bundled_dir()
        origin = "IDX files" if kind == "idx" else "bundled IDX files"
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


# --- Training feeds -------------------------------------------------------------
#
# The compiled training loop drives either feed through the same four calls:
#
#     inputs = feed.inputs()                   # eagerly, once per run
#     state = feed.start(first_step)           # in the loop's tf.function
#     args, state = feed.next(inputs, state, step)      # once per step
#     strategy.run(fn, args=args) -> feed.replica_batch(*args)  # per replica
#
# ``inputs`` is what the tf.function takes as an argument (the distributed
# iterator, or the per-replica tensors); ``state`` is carried by the
# ``tf.range`` loop.


class DatasetFeed:
    """Training batches from a distributed ``tf.data`` dataset.

    Args:
      dataset: the distributed training dataset (infinite, already started
        at the run's first step; see :func:`make_dataset_fn`).
    """

    kind = "dataset"

    def __init__(self, dataset):
        self.dataset = dataset

    def inputs(self):
        """A new distributed iterator over the dataset."""
        return iter(self.dataset)

    def start(self, step: tf.Tensor) -> tuple:
        """No state: the iterator itself knows where it is."""
        del step
        return ()

    def next(self, iterator, state: tuple, step: tf.Tensor):
        """The next per-replica batch, as ``strategy.run`` arguments."""
        del step
        return (next(iterator),), state

    def replica_batch(self, batch):
        """The replica's (images, labels), as the pipeline made them."""
        return batch


def batch_larger_than_split(
    global_batch_size: int, num_examples: int, split: str
) -> str:
    """Why an epoch of ``num_examples`` has no whole batch (the remainder dropped)."""
    return (
        f"global batch {global_batch_size} is larger than the {num_examples} "
        f"{split} examples, and the remainder is dropped"
    )


class InMemoryFeed:
    """Training batches gathered on the replicas' devices from in-memory data.

    The split is placed once on every local replica's device, images as
    uint8 rows packed 8 bytes to an int64 where a row allows, labels as
    int64; both are unpacked after the gather. GPUs have no uint8 gather
    kernel, and TensorFlow keeps int32 tensors of GPU ops in host memory: in
    either case the gather would run on, or copy from, the host every step.
    Epoch ``e`` visits the examples in the order
    ``stateless_shuffle(range(N), seed=(seed, e))`` (Philox, on the host),
    and global step ``s`` is the ``s % steps_per_epoch``-th run of
    ``global_batch_size`` consecutive indices of that order; replica ``r``
    takes the ``r``-th contiguous slice of it. So:

    * the batch of a step is a pure function of (seed, step): a run resumed at
      any step sees exactly the batches of the uninterrupted run, with nothing
      stored in the checkpoint;
    * N replicas with global batch B see the examples one device sees with
      batch B, for any N, on every step.

    ``drop_remainder`` applies per epoch to the *global* batch: each epoch has
    ``N // B`` steps (without it, ``ceil(N / B)``, the last one short, split
    into the replicas' contiguous slices, so the last replicas may get fewer
    examples or none). The ``tf.data`` path batches per replica, so with
    several replicas its epoch ends differ (and a step may straddle two
    epochs there).

    Only for single-host strategies (default, OneDevice, Mirrored): every
    device holds a full copy, and the replicas' slices are picked by
    replica id inside ``strategy.run``, with no Python per step.

    Args:
      strategy: the strategy whose replicas train.
      source: an in-memory source (``source.tensors`` set).
      global_batch_size: examples per step over all replicas.
      seed: the permutation seed.
      drop_remainder: drop each epoch's last partial global batch.
      split: the split to train on.

    Raises:
      ValueError: the source is not in memory, or an epoch has no whole
        batch with ``drop_remainder``.
    """

    kind = "memory"

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        source: Source,
        global_batch_size: int,
        *,
        seed: int = 0,
        drop_remainder: bool = True,
        split: str = "train",
    ):
        if source.tensors is None:
            raise ValueError(f"{source.name}: not an in-memory source")
        images, labels = source.tensors[split]
        self.num_examples = int(images.shape[0])
        self.global_batch_size = global_batch_size
        self.num_replicas = strategy.num_replicas_in_sync
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.steps_per_epoch = (
            self.num_examples // global_batch_size
            if drop_remainder
            else -(-self.num_examples // global_batch_size)
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                batch_larger_than_split(global_batch_size, self.num_examples, split)
            )
        self._image_shape = tuple(images.shape[1:])
        self._row_bytes = int(np.prod(self._image_shape))
        with tf.device("/cpu:0"):
            rows = tf.reshape(images, [self.num_examples, self._row_bytes])
            if self._row_bytes % 8 == 0:
                # A bitcast moves no data; unpacking after the gather is free.
                rows = tf.bitcast(
                    tf.reshape(rows, [self.num_examples, self._row_bytes // 8, 8]),
                    tf.int64,
                )
            labels = tf.cast(labels, tf.int64)
        self._inputs = (
            distribute.copy_to_replicas(strategy, rows),
            distribute.copy_to_replicas(strategy, labels),
        )

    def inputs(self) -> tuple:
        """(rows, labels): each a copy on every replica's device (packed)."""
        return self._inputs

    def permutation(self, epoch: tf.Tensor) -> tf.Tensor:
        """The order of epoch ``epoch``: int32 [N], a function of (seed, epoch)."""
        # On the host, with Philox named: the same order on any device type
        # (StatelessShuffle has no GPU kernel anyway) and TF version.
        with tf.device("/cpu:0"):
            seed = tf.stack(
                [tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)]
            )
            return tf.random.experimental.stateless_shuffle(
                tf.range(self.num_examples, dtype=tf.int32), seed=seed, alg="philox"
            )

    def start(self, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The loop state at global step ``step``: (permutation, its epoch)."""
        epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
        return self.permutation(epoch), epoch

    def next(self, inputs: tuple, state: tuple, step: tf.Tensor):
        """The global batch's indices at ``step``, as ``strategy.run`` arguments.

        Args:
          inputs: :meth:`inputs`.
          state: the previous step's state (or :meth:`start`'s).
          step: the global step, 0-based.

        Returns:
          ``((rows, labels, indices), state)``; ``indices`` are the global
          batch's example indices (int32 [B], or shorter at an epoch's end).
        """
        permutation, epoch = state
        step = tf.cast(step, tf.int64)
        new_epoch = step // self.steps_per_epoch
        # One shuffle per epoch (and per loop call, in start), not per step.
        permutation = tf.cond(
            tf.equal(new_epoch, epoch),
            lambda: permutation,
            lambda: self.permutation(new_epoch),
        )
        begin = tf.cast(
            (step - new_epoch * self.steps_per_epoch) * self.global_batch_size,
            tf.int32,
        )
        with tf.device("/cpu:0"):
            if self.drop_remainder:
                # A static size: a fixed shape for XLA.
                indices = tf.slice(permutation, [begin], [self.global_batch_size])
            else:
                indices = permutation[begin : begin + self.global_batch_size]
        return (*inputs, indices), (permutation, new_epoch)

    def replica_batch(self, rows, labels, indices):
        """The replica's normalised (images, labels): its slice of ``indices``.

        Call it inside ``strategy.run``; replica ``r`` of ``n`` takes
        ``indices[r * B / n : (r + 1) * B / n]`` (clipped to a short batch).
        """
        n = self.num_replicas
        if n > 1:
            per_replica = self.global_batch_size // n
            r = tf.cast(distribute.replica_id(), tf.int32)
            if self.drop_remainder:
                indices = tf.reshape(indices, [n, per_replica])[r]
            else:
                size = tf.size(indices)
                indices = indices[
                    tf.minimum(r * per_replica, size) : tf.minimum(
                        (r + 1) * per_replica, size
                    )
                ]
        batch_rows = tf.gather(rows, indices)
        if rows.dtype == tf.int64:
            batch_rows = tf.bitcast(batch_rows, tf.uint8)
        images = tf.reshape(batch_rows, [-1, *self._image_shape])
        return normalize(images, tf.cast(tf.gather(labels, indices), tf.int32))


def can_feed_from_memory(strategy: tf.distribute.Strategy, source: Source) -> str:
    """Why :class:`InMemoryFeed` cannot serve this run; "" when it can."""
    if source.tensors is None:
        return f"{source.name} is not in memory ({source.origin})"
    if not distribute.is_single_host(strategy):
        return f"{type(strategy).__name__} is not a single-host strategy"
    return ""
