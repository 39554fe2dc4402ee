"""Image folders: the bicubic resize and the crops against PIL and their definitions, lazy reading through workers, and
a synthetic folder of real JPEG and PNG files (a few hundred images) that trains, evaluates and searches end to end."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nas import data as data_lib
from nas.checkpoint import load_supernet
from nas.evaluate import LoaderBatches, evaluation_batches
from nas.imagefolder import CentreCrop, ImageFolder, RandomResizedCrop, resize_bicubic
from nas.search import main as search_main
from nas.trainer import TrainConfig, train

CLASSES = ("apple", "boat", "cloud", "desert")

SPACE_YAML = """\
name: folder-tiny
embed_dims: [32, 48]
depths: [2, 3]
num_heads: [1, 2]
mlp_ratios: [2.0, 3.0]
head_dim: 16
patch_sizes: [8]
img_size: 32
in_chans: 3
num_classes: 4
"""


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like RGB image: smooth gradients and waves, no pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    channels = [128 + 60 * np.sin(xx / rng.uniform(2, 9) + c) + 50 * np.cos(yy / rng.uniform(2, 9) - c)
                for c in range(3)]
    return np.clip(np.round(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def write_folder(root, per_class: dict[str, int], seed: int = 0) -> None:
    """``root/<split>/<class>/<i>.{jpg,png}``: each class a dominant colour, sizes and aspect ratios varied."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(36, 64, 2))
                pixels = smooth_image(rng, height, width) // 2
                pixels[..., label % 3] += 100 + 20 * (label // 3)
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}", quality=90)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_bicubic_resize_is_pils_within_one_level():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        height, width, new_h, new_w = (int(v) for v in rng.integers(3, 70, 4))
        pixels = smooth_image(rng, height, width)
        expected = to_tensor(Image.fromarray(pixels).resize((new_w, new_h), Image.BICUBIC)).int()
        got = resize_bicubic(torch.from_numpy(pixels).permute(2, 0, 1), new_h, new_w).int()
        assert (got - expected).abs().max() <= 1, (height, width, new_h, new_w)


def test_centre_crop_is_timms_evaluation_transform():
    rng = np.random.default_rng(0)
    pixels = smooth_image(rng, 50, 80)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    got = CentreCrop(0.875)(image, 28, None)
    # timm: Resize(int(28 / 0.875) = 32, bicubic) on the shorter side -> 32 x 51, then CenterCrop(28).
    resized = Image.fromarray(pixels).resize((int(32 * 80 / 50), 32), Image.BICUBIC)
    top, left = int(round((32 - 28) / 2)), int(round((51 - 28) / 2))
    expected = to_tensor(resized)[:, top:top + 28, left:left + 28]
    assert got.shape == (3, 28, 28) and (got.int() - expected.int()).abs().max() <= 1


def test_random_resized_crop_is_the_box_resized_and_a_function_of_seed_epoch_and_image(tmp_path):
    write_folder(tmp_path, {"train": 3})
    folder = ImageFolder(str(tmp_path / "train"), 16).with_crop(RandomResizedCrop(), seed=5)
    first = folder.for_epoch(0).__getitems__([0, 5])[0]
    assert torch.equal(first, folder.for_epoch(0).__getitems__([0, 5])[0])
    assert not torch.equal(first, folder.for_epoch(1).__getitems__([0, 5])[0])
    assert not torch.equal(first, folder.with_crop(RandomResizedCrop(), seed=6).for_epoch(0).__getitems__([0, 5])[0])
    assert first.shape == (2, 3, 16, 16) and first.dtype == torch.uint8


def test_a_folder_is_read_lazily_through_workers(tmp_path):
    write_folder(tmp_path, {"val": 5})
    folder = data_lib.load_dataset("imagefolder", str(tmp_path), "test", image_size=24)
    assert isinstance(folder, ImageFolder) and len(folder) == 20 and folder.image_shape == (3, 24, 24)
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(folder).values())  # no pixels held
    batches = evaluation_batches(folder, batch_size=6, num_workers=2)
    assert isinstance(batches, LoaderBatches) and len(batches) == 4 and batches.num_images == 20
    first = [(x.clone(), y.clone()) for x, y in batches]
    again = list(batches)  # re-iterable, in order
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert torch.cat([y for _, y in first]).tolist() == folder.labels.tolist()
    held_out = data_lib.subset(folder, [3, 17, 8])
    assert isinstance(held_out, ImageFolder) and held_out.labels.tolist() == [0, 3, 1]
    assert batches.fingerprint == evaluation_batches(folder, 6).fingerprint != LoaderBatches(held_out, 6).fingerprint


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """AutoFormer's recipe on a synthetic folder of 240 training and 80 validation images, 4 classes."""
    root = tmp_path_factory.mktemp("folder")
    write_folder(root / "images", {"train": 60, "val": 20})
    (root / "folder-tiny.yaml").write_text(SPACE_YAML)
    config = TrainConfig(space=str(root / "folder-tiny.yaml"), dataset="imagefolder", data_dir=str(root / "images"),
                         out_dir=str(root / "run"), batch_size=16, max_steps=6, warmup_steps=1, search_holdout=48,
                         num_workers=2, lr_reference_batch=512, lr=0.5, sampler="uniform", ckpt_every=0,
                         progress=False, plot=False, eval_batch_size=40, backend="reference")
    return root, train(config)


def test_an_image_folder_trains_with_autoformers_recipe(image_run):
    root, result = image_run
    records = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["lr"] <= 0.5 * 16 / 512  # lr scaled by the batch over 512
    assert result.search_holdout == 48
    # the smallest and largest subnets' accuracy on the 80 validation images, by hand from the checkpoint
    folder = data_lib.load_dataset("imagefolder", str(root / "images"), "test", image_size=32)
    images, labels = folder.__getitems__(range(len(folder)))
    model, space, _ = load_supernet(result.checkpoint)
    with torch.no_grad():
        logits = [model(data_lib.normalize(images, folder.mean, folder.std), arch)
                  for arch in (space.min_arch(), space.max_arch())]
    assert len(folder) == 80 and [result.smallest, result.largest] == [
        pytest.approx(float((x.argmax(-1) == labels).float().mean())) for x in logits]


def test_an_image_folder_searches_on_its_held_out_images(image_run, tmp_path, capsys):
    root, result = image_run
    out = tmp_path / "search"
    assert search_main(["--checkpoint", result.checkpoint, "--out-dir", str(out), "--generations", "2",
                        "--population", "4", "--parents", "2", "--mutations", "2", "--crossovers", "2",
                        "--budget", "params=60k", "--num-workers", "2", "--batch-size", "24", "--no-progress"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["search_data"] == "48 held-out imagefolder training images"
    assert summary["test_data"] == "80 test images" and summary["best"]["params=60K"] is not None
    assert "[search] best for params" in capsys.readouterr().out


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` grey pixels and holds a few bytes of them: what PIL's decompression bomb
    guard reads is the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20000, 10000])  # past PIL's error limit; past its warning limit only
def test_an_image_declaring_a_huge_size_is_a_data_error_naming_it(tmp_path, side):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bomb.png").write_bytes(png_header(side, side))
    with pytest.raises(data_lib.DataError, match=rf"cannot read image '.*bomb\.png': Image size \({side * side} "
                                                 "pixels\\) exceeds limit"):
        ImageFolder(str(tmp_path), 32).load(0)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_sixteen_bit_and_float_images_are_read_by_their_range(tmp_path, in_chans):
    """The oracle: the same picture as an 8-bit PNG, which PIL converts itself (``convert`` alone clips a 16-bit image
    of mean 128 * 257 to near-white)."""
    grey = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(grey).save(tmp_path / "a" / "0_eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a" / "1_sixteen.png")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "a" / "2_float.tif")
    assert Image.open(tmp_path / "a" / "1_sixteen.png").mode == "I;16"
    folder = ImageFolder(str(tmp_path), 32, in_chans=in_chans)
    eight = folder.load(0)
    assert torch.equal(folder.load(1), eight) and torch.equal(folder.load(2), eight)
    Image.fromarray(grey.astype(np.float32) / 100).save(tmp_path / "a" / "2_float.tif")
    with pytest.raises(data_lib.DataError, match=r"'.*2_float\.tif' holds floating-point pixels outside 0\.\.1"):
        folder.load(2)


def test_a_class_folder_without_images_or_linking_to_the_root_is_named(tmp_path):
    """Either would otherwise be one more class, and the error a count ("4 classes but the space has 3")."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "0.png")
    assert len(ImageFolder(str(tmp_path), 8)) == 2
    (tmp_path / "c").mkdir()
    with pytest.raises(data_lib.DataError, match=r"class folder '.*c' holds no images"):
        ImageFolder(str(tmp_path), 8)
    (tmp_path / "c").rmdir()
    (tmp_path / "z").symlink_to(".")
    with pytest.raises(data_lib.DataError, match=r"class folder '.*z' is a link to .* which holds the data set itself"):
        ImageFolder(str(tmp_path), 8)
