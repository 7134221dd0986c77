"""Tests of distopt.data: bundled MNIST, checksums, TFDS, the input pipeline."""

import glob
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from distopt import data, distribute


@pytest.fixture(scope="module")
def mnist():
    return data.load_source()


def _tiny_source(n=103, shape=(4, 4, 1)):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, *shape), np.uint8
    )
    labels = np.arange(n, dtype=np.int32)
    return data._in_memory_source(
        "tiny", "test arrays", {"train": (images, labels), "test": (images, labels)}, 10
    )


def _ids(batch):
    """The example ids of a tiny-source batch (pixel value = id, mask > 0)."""
    images = batch[0].numpy()
    ids = np.rint(images[:, 0, 0, 0] * 255).astype(int)
    if len(batch) == 3:
        ids = ids[batch[2].numpy() > 0]
    return ids.tolist()


def _flat(lists):
    return [x for xs in lists for x in xs]


def test_bundled_mnist_matches_the_reference_figures(mnist):
    images, labels = data.load_mnist_idx("train")
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    scaled = images / 255.0
    assert scaled.mean() == pytest.approx(0.13066, abs=1e-5)
    assert scaled.std() == pytest.approx(0.30811, abs=1e-5)
    counts = np.bincount(labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_images, test_labels = data.load_mnist_idx("test")
    assert test_images.shape == (10000, 28, 28, 1) and len(test_labels) == 10000
    assert mnist.num_examples == {"train": 60000, "test": 10000}
    assert mnist.image_shape == (28, 28, 1) and mnist.num_classes == 10
    assert "bundled" in mnist.origin and "SHA-256" in mnist.origin


def test_sha256sums_file_agrees_with_the_code():
    with open(os.path.join(data.bundled_dir(), "SHA256SUMS")) as f:
        listed = dict(reversed(line.split()) for line in f if line.strip())
    assert listed == data.MNIST_SHA256


@pytest.fixture
def idx_copy(tmp_path):
    for name in data.MNIST_SHA256:
        shutil.copy(os.path.join(data.bundled_dir(), name), tmp_path / name)
        os.chmod(tmp_path / name, 0o644)
    return tmp_path


def test_corrupt_file_names_file_and_both_checksums(idx_copy):
    name = "t10k-labels-idx1-ubyte.gz"
    with open(idx_copy / name, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    actual = data.sha256_file(str(idx_copy / name))
    with pytest.raises(data.DataError) as e:
        data.load_mnist_idx("test", str(idx_copy))
    message = str(e.value)
    assert name in message and "corrupt" in message
    assert data.MNIST_SHA256[name] in message and actual in message


def test_missing_file_names_it(idx_copy):
    name = "train-images-idx3-ubyte.gz"
    os.remove(idx_copy / name)
    with pytest.raises(data.DataError, match=f"{name} is missing"):
        data.load_mnist_idx("train", str(idx_copy))


def test_data_dir_with_idx_files_is_used_and_checked(idx_copy):
    source = data.load_source("mnist", data_dir=str(idx_copy))
    assert str(idx_copy) in source.origin
    with open(idx_copy / "train-labels-idx1-ubyte.gz", "ab") as f:
        f.write(b"extra")
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz"):
        data.load_source("mnist", data_dir=str(idx_copy))


def test_bad_source_names_are_rejected():
    with pytest.raises(ValueError, match="valid"):
        data.load_source("mnist", source="web")
    with pytest.raises(ValueError, match="Only mnist is bundled"):
        data.load_source("fashion_mnist", source="bundled")


def test_training_batches_are_seeded_normalised_and_sharded():
    source = _tiny_source()
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0)
    fn = data.make_dataset_fn(source, "train", 8, training=True, seed=3)
    first = [_ids(b) for b in fn(ctx).take(6)]
    again = [_ids(b) for b in fn(ctx).take(6)]
    other_seed = data.make_dataset_fn(source, "train", 8, training=True, seed=4)
    assert first == again
    assert first != [_ids(b) for b in other_seed(ctx).take(6)]
    batch = next(iter(fn(ctx)))
    assert batch[0].shape == (8, 4, 4, 1) and batch[0].dtype == tf.float32
    assert float(tf.reduce_max(batch[0])) <= 1.0
    # Pipeline 0 of 2 reads every other example; pipeline 1 the rest.
    epoch0 = _flat(first)
    assert all(i % 2 == 0 for i in epoch0)
    other = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    assert all(i % 2 == 1 for b in fn(other).take(6) for i in _ids(b))


def test_an_epoch_visits_every_example_once_and_reshuffles():
    source = _tiny_source(n=64)
    fn = data.make_dataset_fn(source, "train", 16, training=True, seed=0)
    batches = [_ids(b) for b in fn(tf.distribute.InputContext()).take(8)]
    epoch1, epoch2 = _flat(batches[:4]), _flat(batches[4:])
    assert sorted(epoch1) == list(range(64)) == sorted(epoch2)
    assert epoch1 != epoch2


@pytest.mark.parametrize("replicas", [1, 2])
def test_resuming_skips_exactly_the_consumed_batches(replicas):
    source = _tiny_source()
    ctx = tf.distribute.InputContext(num_replicas_in_sync=replicas)
    fresh = data.make_dataset_fn(source, "train", 8, training=True, seed=1)
    resumed = data.make_dataset_fn(
        source, "train", 8, training=True, seed=1, start_step=5
    )
    expected = [_ids(b) for b in fresh(ctx).take(40)][5 * replicas :]
    got = [_ids(b) for b in resumed(ctx).take(len(expected))]
    assert got == expected


@pytest.mark.parametrize("pipelines,replicas", [(1, 1), (1, 4), (2, 2), (3, 3)])
def test_eval_is_padded_to_whole_batches_and_covers_each_example_once(
    pipelines, replicas
):
    source = _tiny_source(n=103)
    fn = data.make_dataset_fn(source, "test", 12, training=False)
    seen, lengths = [], []
    for pipeline in range(pipelines):
        ctx = tf.distribute.InputContext(pipelines, pipeline, replicas)
        batches = list(fn(ctx))
        lengths.append(len(batches))
        assert all(b[0].shape[0] == 12 // replicas for b in batches)
        seen += _flat(_ids(b) for b in batches)
    assert sorted(seen) == list(range(103))
    assert len(set(lengths)) == 1  # Same step count on every pipeline.


def test_eval_steps_limits_the_pass():
    source = _tiny_source(n=103)
    fn = data.make_dataset_fn(source, "test", 10, training=False, max_steps=3)
    batches = list(fn(tf.distribute.InputContext()))
    assert len(batches) == 3 and sum(len(_ids(b)) for b in batches) == 30


def test_mirrored_distribution_splits_the_global_batch():
    strategy = distribute.make_strategy("mirrored", num_cpu_devices=3)
    source = _tiny_source(n=103)
    fn = data.make_dataset_fn(source, "test", 12, training=False)
    dist = strategy.distribute_datasets_from_function(fn)
    total = 0.0
    for batch in dist:
        parts = strategy.experimental_local_results(batch[0])
        assert [p.shape[0] for p in parts] == [4, 4, 4]
        total += sum(
            float(tf.reduce_sum(m))
            for m in strategy.experimental_local_results(batch[2])
        )
    assert total == 103


def test_tfds_path_with_mock_data(tmp_path):
    # A dependency, not optional: an import failure (as in a fresh install
    # without importlib_resources) must fail here, not skip.
    import tensorflow_datasets as tfds

    # What --download reads before any network access: the dataset's URLs and
    # checksums, through importlib_resources (which TFDS 4.9.10 imports
    # without declaring it; mock_data never gets this far).
    urls = data._tfds_builder(tfds, "fashion_mnist", str(tmp_path)).url_infos
    assert len(urls) == 4 and all(info.checksum for info in urls.values())
    with tfds.testing.mock_data(num_examples=40):
        source = data.load_source("fashion_mnist")
        assert "TensorFlow Datasets fashion_mnist" in source.origin
        assert source.image_shape == (28, 28, 1) and source.num_classes == 10
        assert source.num_examples["train"] == 40
        assert not source.in_memory
        fn = data.make_dataset_fn(source, "train", 16, training=True, seed=0)
        images, labels = next(iter(fn(tf.distribute.InputContext())))
        assert images.shape == (16, 28, 28, 1) and images.dtype == tf.float32
        assert labels.dtype == tf.int32
        # MNIST through TFDS when asked.
        assert (
            "TensorFlow Datasets mnist"
            in data.load_source("mnist", source="tfds").origin
        )


@pytest.mark.parametrize("download", [False, True])
def test_a_tfds_that_does_not_import_is_named_with_the_fix(monkeypatch, download):
    # TFDS with tensorflow-metadata 1.21 on TensorFlow 2.16-2.19 (12-07):
    # `import tensorflow_datasets` logs the protobuf error and leaves a module
    # without `builder`; distopt said "Downloading ... failed (AttributeError
    # ...). Check the network". The import error itself is the answer.
    import builtins
    import sys
    import types

    broken = types.ModuleType("tensorflow_datasets")  # no `builder`
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", broken)
    # `import tensorflow_datasets.core` then fails as TFDS's own import did.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.core", None)
    with pytest.raises(data.DataError) as e:
        data.load_source("fashion_mnist", download=download)
    message = str(e.value)
    assert message.startswith("TensorFlow Datasets could not be imported (")
    assert "ModuleNotFoundError" in message and "reinstall" in message
    assert "Check the network" not in message and "\n" not in message

    class VersionError(Exception):
        pass

    def fail(name, *args, **kwargs):
        if name == "tensorflow_datasets.core":
            raise VersionError(
                "Detected incompatible Protobuf Gencode/Runtime versions when "
                "loading tensorflow_metadata/proto/v0/schema.proto: gencode "
                "6.31.1 runtime 5.29.6."
            )
        return real_import(name, *args, **kwargs)

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "tensorflow_datasets.core")
    monkeypatch.setattr("builtins.__import__", fail)
    with pytest.raises(data.DataError) as e:
        data.load_source("fashion_mnist", download=download)
    message = str(e.value)
    assert "VersionError: Detected incompatible Protobuf" in message
    assert message.endswith(
        "pip install 'tensorflow-metadata<1.21'. MNIST needs none of it (the "
        "bundled files, --data_source=bundled)."
    ), message


def test_a_tfds_builder_leaves_no_empty_temporary_directory(tmp_path, monkeypatch):
    # TFDS's builder of a dataset not prepared in data_dir makes
    # `mkdtemp("tfds")` for metadata from GCS and never removes it: offline it
    # stays empty, one per failed run (about 470 in /tmp after a day of suites).
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # Python's default: unset.
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(data.DataError, match="not available through TensorFlow"):
        data.load_source("fashion_mnist", data_dir=str(empty))
    assert os.listdir(scratch) == []
    assert tempfile.tempdir is None  # As it was: TMPDIR is read again later.

    # One with files (the metadata, when online) is kept; an empty one is not,
    # also when the builder then fails.
    made = []

    class Tfds:
        @staticmethod
        def builder(name, data_dir):
            made.extend(tempfile.mkdtemp("tfds") for _ in range(2))
            with open(os.path.join(made[-2], "dataset_info.json"), "w") as f:
                f.write("{}")
            if name == "fails":
                raise RuntimeError("no such dataset")
            return name

    assert data._tfds_builder(Tfds, "x", None) == "x"
    with pytest.raises(RuntimeError, match="no such dataset"):
        data._tfds_builder(Tfds, "fails", None)
    assert tempfile.tempdir is None
    kept = sorted(glob.glob(f"{scratch}/*/*"))
    assert kept == sorted(made[0::2]) and all(str(scratch) in d for d in made)
    assert all(os.listdir(d) == ["dataset_info.json"] for d in kept)


def test_auto_picks_tfds_when_data_dir_holds_prepared_data(tmp_path):
    import tensorflow_datasets as tfds

    prepared = tmp_path / "mnist" / "3.0.1"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    with tfds.testing.mock_data(num_examples=20):
        source = data.load_source("mnist", data_dir=str(tmp_path))
    assert "TensorFlow Datasets" in source.origin
    # A data_dir that does not exist is an error, not the bundled files.
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_source("mnist", data_dir=str(tmp_path / "x"))


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    import gzip
    import struct

    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">iii", 1234, 1, 1) + b"\x00")
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(str(path))


# --- The in-memory feed ---------------------------------------------------------


def _expected_ids(step, n, batch, seed, drop, replicas):
    """Each replica's example ids at global ``step``, rebuilt in NumPy.

    Only the permutation comes from TensorFlow, called directly (Philox
    ``stateless_shuffle`` of ``range(n)`` with seed ``(seed, epoch)``); the
    epoch arithmetic and the slicing are NumPy's.
    """
    steps_per_epoch = n // batch if drop else -(-n // batch)
    epoch, position = divmod(step, steps_per_epoch)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=[seed, epoch], alg="philox"
    ).numpy()
    assert sorted(order) == list(range(n))
    global_batch = order[position * batch : (position + 1) * batch]
    per_replica = batch // replicas
    return [
        global_batch[r * per_replica : (r + 1) * per_replica].tolist()
        for r in range(replicas)
    ]


def _feed_batches(strategy, feed, first, count):
    """Every replica's (images, labels) for ``count`` steps from ``first``.

    The steps run in one tf.function with the state carried from step to
    step, as the trainer's loop carries it (epoch changes included).
    """

    @tf.function
    def run(inputs):
        state = feed.start(tf.constant(first, tf.int64))
        out = []
        for s in range(first, first + count):
            args, state = feed.next(inputs, state, tf.constant(s, tf.int64))
            out.append(strategy.run(feed.replica_batch, args=args))
        return out

    return [
        [
            (x.numpy(), y.numpy())
            for x, y in zip(
                strategy.experimental_local_results(images),
                strategy.experimental_local_results(labels),
            )
        ]
        for images, labels in run(feed.inputs())
    ]


@pytest.mark.parametrize(
    "replicas,drop,shape",
    [(1, True, (4, 4, 1)), (2, True, (4, 4, 1)), (2, False, (3, 3, 1))],
    ids=["default", "mirrored2", "mirrored2_partial_unpacked"],
)
def test_in_memory_batches_match_a_numpy_reconstruction(replicas, drop, shape):
    from conftest import mirrored

    # Few steps per epoch: each step of the unrolled loop below is traced.
    n, batch, seed = 18, 8, 5
    strategy = tf.distribute.get_strategy() if replicas == 1 else mirrored(replicas)
    source = _tiny_source(n=n, shape=shape)
    images, labels = (t.numpy() for t in source.tensors["train"])
    feed = data.InMemoryFeed(strategy, source, batch, seed=seed, drop_remainder=drop)
    assert feed.steps_per_epoch == (2 if drop else 3)
    # Two epochs and more in one call; then a call that starts mid-epoch,
    # as a resumed run does, across the next epoch's start.
    spe = feed.steps_per_epoch
    for first, count in [(0, 2 * spe + 2), (spe + 1, spe + 1)]:
        got = _feed_batches(strategy, feed, first, count)
        for step, replica_batches in zip(range(first, first + count), got):
            expected = _expected_ids(step, n, batch, seed, drop, replicas)
            assert len(replica_batches) == replicas
            for (x, y), ids in zip(replica_batches, expected):
                np.testing.assert_array_equal(y, labels[ids], err_msg=f"step {step}")
                np.testing.assert_array_equal(
                    x,
                    images[ids].astype(np.float32) * np.float32(1 / 255),
                    err_msg=f"step {step}",
                )
    if not drop:
        # 18 = 2 * 8 + 2: the last step gives replica 0 two examples, 1 none.
        last = _feed_batches(strategy, feed, 2, 1)[0]
        assert [len(y) for _, y in last] == [2, 0]


def test_in_memory_epochs_differ_and_cover_every_example():
    source = _tiny_source(n=64)
    feed = data.InMemoryFeed(tf.distribute.get_strategy(), source, 16, seed=0)
    ids = [
        y.tolist()
        for ((_, y),) in _feed_batches(tf.distribute.get_strategy(), feed, 0, 8)
    ]
    epoch1, epoch2 = _flat(ids[:4]), _flat(ids[4:])
    assert sorted(epoch1) == list(range(64)) == sorted(epoch2)
    assert epoch1 != epoch2
    other = data.InMemoryFeed(tf.distribute.get_strategy(), source, 16, seed=1)
    assert (
        _feed_batches(tf.distribute.get_strategy(), other, 0, 1)[0][0][1].tolist()
        != ids[0]
    )


def test_in_memory_feed_refuses_what_it_cannot_serve():
    source = _tiny_source(n=10)
    with pytest.raises(ValueError, match="larger than the 10"):
        data.InMemoryFeed(tf.distribute.get_strategy(), source, 16)
    assert data.can_feed_from_memory(tf.distribute.get_strategy(), source) == ""
    not_in_memory = data.Source(**{**vars(source), "tensors": None, "in_memory": False})
    assert "not in memory" in data.can_feed_from_memory(
        tf.distribute.get_strategy(), not_in_memory
    )
