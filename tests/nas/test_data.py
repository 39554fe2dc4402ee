"""nas.data: loaders checked against the files they read (written here, or the shared real data), and the
batch augmentation against explicit per-image crops."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import RunsCode

from nas import data as D

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CIFAR10 = SHARED / "cifar-10-batches-py"
MNIST = SHARED / "mnist"


def test_digits_split_covers_sklearn_exactly():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = D.load_dataset("digits", split="train"), D.load_dataset("digits", split="test")
    assert len(train) + len(test) == len(bunch.target) and len(test) == 359
    assert train.image_shape == test.image_shape == (1, 8, 8) and train.classes == [str(i) for i in range(10)]
    expected = {(tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()), int(t))
                for img, t in zip(bunch.images, bunch.target)}
    got = {(tuple(img.ravel().tolist()), int(t)) for ds in (train, test) for img, t in zip(ds.images, ds.labels)}
    assert got == expected
    train_pixels = train.images.double() / 255
    assert train.mean[0] == pytest.approx(train_pixels.mean().item(), abs=0.01)


def write_cifar(root: Path, rng, count=7, fine=False, protocol=4):
    root.mkdir()
    files = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in files:
        pixels = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100 if fine else 10, count).tolist()
        key = b"fine_labels" if fine else b"labels"
        (root / name).write_bytes(pickle.dumps({b"data": pixels, key: labels}, protocol=protocol))
        written[name] = (pixels, labels)
    return written


@pytest.mark.parametrize("fine, protocol", [(False, 4), (True, 4), (False, 5)])
def test_cifar_layout_round_trip(tmp_path, fine, protocol):
    written = write_cifar(tmp_path / "cifar", np.random.default_rng(1), fine=fine, protocol=protocol)
    train = D.load_dataset("cifar100" if fine else "cifar10", str(tmp_path / "cifar"), "train")
    test = D.load_dataset("cifar100" if fine else "cifar10", str(tmp_path / "cifar"), "test")
    train_files = ["train"] if fine else [f"data_batch_{i}" for i in range(1, 6)]
    pixels = np.concatenate([written[f][0] for f in train_files])
    assert len(train) == len(pixels) and train.image_shape == (3, 32, 32)
    # row = red plane, green plane, blue plane, each 32x32 row-major
    index = 3
    assert train.images[index, 1, 2, 5].item() == pixels[index, 1024 + 2 * 32 + 5]
    assert train.labels.tolist() == sum((written[f][1] for f in train_files), [])
    assert test.labels.tolist() == written["test" if fine else "test_batch"][1]


def test_cifar_errors(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_dataset("cifar10", str(tmp_path / "nowhere"), "train")
    with pytest.raises(D.DataError, match="needs a data directory"):
        D.load_dataset("cifar10", None, "train")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match="corrupt"):
        D.load_dataset("cifar10", str(tmp_path / "c"), "test")
    with pytest.raises(D.DataError, match="missing"):
        D.load_dataset("cifar10", str(tmp_path / "c"), "train")


@pytest.mark.parametrize("file, content", [
    ("test_batch", lambda code: code),
    ("test_batch", lambda code: {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"batch_label": code}),
    ("batches.meta", lambda code: {b"label_names": [code]}),
])
def test_cifar_file_that_runs_code_is_refused(tmp_path, file, content):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(0))
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(content(RunsCode(marker)), protocol=4)
    (root / file).write_bytes(payload)
    refused = rf"CIFAR file '.*{file}' is corrupt or not a CIFAR batch .*refers to \w+\.system"
    with pytest.raises(D.DataError, match=refused):
        D.load_dataset("cifar10", str(root), "test")
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("content, message", [
    ([1, 2], "holds a list, not a CIFAR batch"),
    ({b"data": np.zeros((2, 3072), object), b"labels": [0, 1]}, "an array of dtype object, not of numbers"),
    ({b"data": np.ma.masked_array(np.zeros((2, 3072), np.uint8)), b"labels": [0, 1]}, r"refers to numpy\.ma\.core"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"does not hold b'data' .* and b'labels'"),
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "does not hold b'data'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, r"2 images but labels of shape \(3,\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"1 label\(s\) outside 0..9, e.g. 10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 3]}, r"1 label\(s\) outside 0..9, e.g. -1"),
])
def test_malformed_cifar_batch_names_the_file(tmp_path, content, message):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(0))
    (root / "data_batch_3").write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(D.DataError, match=f"'{root / 'data_batch_3'}'.*{message}"):
        D.load_dataset("cifar10", str(root), "train")


class DeclaresHugeArray:
    """Pickled, a few dozen bytes that ask numpy for ``shape``: directly, or through ``_reconstruct``."""

    def __init__(self, via_reconstruct: bool):
        self.via_reconstruct = via_reconstruct

    def __reduce__(self):
        if self.via_reconstruct:
            return np.ndarray((0,)).__reduce__()[0], (np.ndarray, (10**13,), b"b")
        return np.ndarray, ((10**13,),)


@pytest.mark.parametrize("via_reconstruct", [False, True])
def test_cifar_batch_declaring_a_huge_array_is_refused_before_allocating(tmp_path, via_reconstruct):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(0))
    payload = pickle.dumps({b"data": DeclaresHugeArray(via_reconstruct), b"labels": [0]}, protocol=4)
    (root / "test_batch").write_bytes(payload)
    with pytest.raises(D.DataError, match=rf"declares an array of shape \(10000000000000,\) .* in a file of "
                                          rf"{len(payload)} bytes"):
        D.load_dataset("cifar10", str(root), "test")


def test_cifar100_labels_out_of_range(tmp_path):
    root = tmp_path / "cifar"
    write_cifar(root, np.random.default_rng(0), fine=True)
    (root / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}))
    with pytest.raises(D.DataError, match=r"'.*test': 1 label\(s\) outside 0..99, e.g. 100"):
        D.load_dataset("cifar100", str(root), "test")


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 not found at {CIFAR10}")
def test_real_cifar10_test_split():
    test = D.load_dataset("cifar10", str(CIFAR10), "test")
    assert len(test) == 10000 and test.classes[0] == "airplane" and test.classes[-1] == "truck"
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    means = test.images.double().mean(dim=(0, 2, 3)) / 255
    assert means.tolist() == pytest.approx(D.CIFAR10_STATS[0], abs=0.01)


def write_idx(path: Path, array: np.ndarray, compress: bool):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress)
    train = D.load_dataset("mnist", str(tmp_path), "train")
    assert train.images[:, 0].numpy().tolist() == images.tolist() and train.labels.tolist() == labels.tolist()
    with pytest.raises(D.DataError, match="MNIST file missing"):
        D.load_dataset("mnist", str(tmp_path), "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03junk")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, False)
    with pytest.raises(D.DataError, match="corrupt"):
        D.load_dataset("mnist", str(tmp_path), "test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2, 3]), False)
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte.*: 1 label\(s\) outside 0..9, e.g. 10"):
        D.load_dataset("mnist", str(tmp_path), "test")


def test_idx_file_is_read_no_further_than_it_declares(tmp_path):
    """A gzip file inflates to whatever it likes: 32 MB of zeros behind a header declaring 5 images is read as far as
    the 5 images and refused; a header declaring 2^64 pixels is refused before any is read."""
    header = struct.pack(">HBBIII", 0, 0x08, 3, 5, 28, 28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(32 << 20)))
    with pytest.raises(D.DataError, match=r"declares an array of shape \(5, 28, 28\) \(3920 bytes\) but holds more"):
        D.load_dataset("mnist", str(tmp_path), "train")
    huge = struct.pack(">HBBII", 0, 0x08, 2, 2**32 - 1, 2**32 - 1)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(huge))
    with pytest.raises(D.DataError, match=r"declares \(4294967295, 4294967295\) bytes of pixels, more than this"):
        D.load_dataset("mnist", str(tmp_path), "train")


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST not found at {MNIST}")
def test_real_mnist_test_split():
    test = D.load_dataset("mnist", str(MNIST), "test")
    assert len(test) == 10000 and test.image_shape == (1, 28, 28)
    assert torch.bincount(test.labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    written = {}
    for cls in ("cat", "dog"):
        folder = tmp_path / "train" / cls
        folder.mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            written[(cls, i)] = pixels
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    train = D.load_dataset("imagefolder", str(tmp_path), "train", image_size=6)
    assert train.classes == ["cat", "dog"] and len(train) == 4
    images, labels = train.__getitems__([0, 3])
    assert labels.tolist() == [0, 1]
    assert images[1].permute(1, 2, 0).numpy().tolist() == written[("dog", 1)].tolist()
    resized, _ = D.load_dataset("imagefolder", str(tmp_path), "train", image_size=4, in_chans=1).__getitems__([0])
    assert resized.shape == (1, 1, 4, 4)
    with pytest.raises(D.DataError, match="no test or val folder"):
        D.load_dataset("imagefolder", str(tmp_path), "test")


def test_check_matches_names_the_mismatch():
    digits = D.load_dataset("digits", split="test")
    with pytest.raises(D.DataError, match="1x8x8 but the search space expects 3x32x32"):
        D.check_matches(digits, 32, 3, 10, "digits test")
    with pytest.raises(D.DataError, match="10 classes but the search space has num_classes=100"):
        D.check_matches(digits, 8, 1, 100, "digits test")


def test_normalize_matches_formula():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = D.normalize(images, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, c], (images[:, c].float() / 255 - mean[c]) / std[c], atol=1e-6)


def test_train_batches_shard_and_resume():
    digits = D.load_dataset("digits", split="test")
    # labels = image indices, so that a batch's labels say exactly which images it holds
    ds = D.TensorImageDataset(digits.images, torch.arange(len(digits)), digits.classes, digits.mean, digits.std)
    per_rank = [[labels for _, labels in D.train_batches(ds, 16, epoch=3, seed=5, rank=r, world_size=2)]
                for r in (0, 1)]
    steps = D.steps_per_epoch(ds, 16, world_size=2)
    assert len(per_rank[0]) == len(per_rank[1]) == steps == (len(ds) // 2) // 16
    # the two ranks' batches of one step are disjoint; one process with twice the batch sees their union
    single = list(D.train_batches(ds, 32, epoch=3, seed=5))
    for step in range(steps):
        assert not set(per_rank[0][step].tolist()) & set(per_rank[1][step].tolist())
        merged = sorted(per_rank[0][step].tolist() + per_rank[1][step].tolist())
        assert merged == sorted(single[step][1].tolist())
    # starting at batch k gives the epoch's batches from k on; another epoch gives another order
    resumed = [labels for _, labels in D.train_batches(ds, 16, epoch=3, seed=5, rank=1, world_size=2, start=4)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, per_rank[1][4:])) and len(resumed) == steps - 4
    other = [labels for _, labels in D.train_batches(ds, 16, epoch=4, seed=5, rank=1, world_size=2)]
    assert not all(torch.equal(a, b) for a, b in zip(other, per_rank[1]))
    with pytest.raises(D.DataError, match="smaller than one batch"):
        D.steps_per_epoch(ds, 1000)


def test_eval_batches_cover_every_image_once():
    ds = D.load_dataset("digits", split="test")
    seen = [img for r in range(3) for images, _ in D.eval_batches(ds, 50, rank=r, world_size=3) for img in images]
    assert len(seen) == len(ds)
    assert sorted(tuple(i.ravel().tolist()) for i in seen) == sorted(tuple(i.ravel().tolist()) for i in ds.images)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        D.load_dataset("svhn")
    with pytest.raises(ValueError, match="split must be"):
        D.load_dataset("digits", split="val")
