"""Loaders on the installed Fashion-MNIST package and on small fixtures the tests write."""

from pathlib import Path

import numpy as np
import pytest
import torch

from scaling_abs.data import (
    FASHION_MNIST_DIR,
    TensorImageDataset,
    build_dataset,
    collate_batch,
    read_fashion_mnist,
)
from scaling_abs.errors import UserError

needs_fmnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)


@needs_fmnist
def test_fashion_mnist_reader():
    arrays = read_fashion_mnist()
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["train_images"].dtype == np.uint8
    assert arrays["test_images"].shape == (10000, 28, 28)
    assert arrays["train_labels"][0] == 9 and arrays["train_labels"].max() == 9  # first image: ankle boot
    assert np.bincount(arrays["train_labels"]).tolist() == [6000] * 10


@needs_fmnist
def test_fashion_mnist_bundle_and_batched_fetch():
    d = build_dataset("fashion_mnist", limit_train_samples=300)
    assert (d.num_classes, d.in_channels, d.image_size, len(d.train), len(d.test)) == (10, 1, 28, 300, 10000)
    x, y = d.train.__getitems__([3, 1, 4])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    one = torch.stack([d.train[i][0] for i in (3, 1, 4)])
    assert torch.equal(x, one) and y.tolist() == [d.train[i][1] for i in (3, 1, 4)]
    loader = torch.utils.data.DataLoader(d.train, batch_sampler=[[0, 1], [2, 3]], collate_fn=collate_batch)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 1, 28, 28) and yb.shape == (2,)


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data_dir"):
        read_fashion_mnist(tmp_path)
    with pytest.raises(UserError, match="data_dir"):
        build_dataset("fashion_mnist", data_dir=str(tmp_path / "absent"))
    with pytest.raises(UserError, match="data_dir"):
        build_dataset("imagenet", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="data_dir"):
        build_dataset("cifar10")
    with pytest.raises(UserError, match="dataset"):
        build_dataset("mnist3d")


def _write_svhn(root: Path, counts: dict[str, int]) -> None:
    """torchvision's SVHN files: X of 32x32x3xN uint8, y of Nx1 with 10 for the digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in counts.items():
        x = rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, :] = {"train": 1, "extra": 2, "test": 3}[split]  # which split an image came from
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": (np.arange(n) % 10 + 1).reshape(n, 1)})


def test_svhn_names_its_training_splits(tmp_path, monkeypatch):
    """svhn: train + extra; svhn_extra (the s1 preset): extra alone, the paper's S1 set. A missing
    split is one line naming it (svhn without extra_32x32.mat trained on train alone, silently)."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)  # our fakes
    _write_svhn(tmp_path, {"train": 6, "extra": 10, "test": 4})
    for name, size, sources in (("svhn", 16, {1, 2}), ("svhn_extra", 10, {2})):
        d = build_dataset(name, data_dir=str(tmp_path))
        assert (len(d.train), len(d.test), d.num_classes, d.in_channels, d.image_size) == (size, 4, 10, 3, 32)
        x, y = d.train.__getitems__(list(range(size)))
        assert {round(v * 255) for v in x[:, 0, 0, 0].tolist()} == sources
        assert set(y.tolist()) <= set(range(10)) and 0 in y.tolist()  # label 10 is the digit 0
    (tmp_path / "extra_32x32.mat").unlink()
    for name in ("svhn", "svhn_extra"):
        with pytest.raises(UserError, match=f"^data_dir: {name} needs extra_32x32.mat in "):
            build_dataset(name, data_dir=str(tmp_path))
    with pytest.raises(UserError, match="^data_dir: svhn_extra needs data_dir="):
        build_dataset("svhn_extra")


def _write_images(root: Path, classes: list[str], per_class: int, size: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagenet_folder_layout(tmp_path):
    _write_images(tmp_path / "train", ["n01", "n02"], 3)
    _write_images(tmp_path / "val", ["n01", "n02"], 2)
    d = build_dataset("imagenet", data_dir=str(tmp_path), augmentation="resized_crop_flip")
    assert (d.num_classes, len(d.train), len(d.test)) == (2, 6, 4)
    x, y = d.train[4]
    assert x.shape == (3, 224, 224) and y == 1 and 0 <= x.min() and x.max() <= 1
    assert d.test[0][0].shape == (3, 224, 224)


def test_tinyimagenet_official_layout(tmp_path):
    from PIL import Image

    for c in ("n01", "n02"):
        _write_images(tmp_path / "train" / c, ["images"], 2, size=64)
    (tmp_path / "val" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "val" / "images" / "val_0.JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t10\t10\n")
    d = build_dataset("tinyimagenet", data_dir=str(tmp_path), augmentation="crop_flip")
    assert (d.num_classes, len(d.train), len(d.test)) == (2, 4, 1)
    assert d.test[0][1] == 1 and d.train[0][0].shape == (3, 64, 64)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = {
        "img": [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(6)],
        "y": [0, 1, 2, 0, 1, 2],
    }
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()}),
        }
    )
    ds.save_to_disk(str(tmp_path / "toy"))
    from scaling_abs.data import _hf

    train, test, classes, channels, size = _hf("toy", str(tmp_path / "toy"), "none", "img", "y")
    assert (len(train), len(test), classes, channels, size) == (6, 2, 3, 3, 8)
    x, y = train[1]
    assert x.shape == (3, 8, 8) and y == 1
    torch.testing.assert_close(x, torch.as_tensor(rows["img"][1]).permute(2, 0, 1).float() / 255)
    with pytest.raises(UserError, match="column"):
        _hf("toy", str(tmp_path / "toy"), "none", "image", "y")


def test_tensor_dataset_with_augmentation_is_per_sample():
    """The batched fetch crops and flips each sample on its own: one image fetched eight times comes
    back in several different crops (one crop for the whole batch, or none, passed the shape and
    label check alone)."""
    from scaling_abs.data import _transforms

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    ds = TensorImageDataset(images, torch.arange(4), _transforms("crop_flip", 32, True))
    x, y = ds.__getitems__([0, 1, 2])
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    torch.manual_seed(0)
    x, y = ds.__getitems__([1] * 8)
    plain = images[1].float() / 255
    assert y.tolist() == [1] * 8
    # each of 81 crops x 2 flips is drawn with probability 1/162 (the plain image is one of them):
    # eight draws give several different ones (all 8 with this seed), rarely the plain image
    assert len({tuple(xi.flatten().tolist()) for xi in x}) >= 4
    assert sum(torch.equal(xi, plain) for xi in x) <= 1


def test_seeded_augmentation_is_a_function_of_the_micro_batch_seed():
    """The same crops for the same seed in the main process and in DataLoader workers alike, and
    the process's global generator untouched (what makes a resumed run draw the same crops)."""
    from scaling_abs.batching import MicroBatch
    from scaling_abs.data import SeededAugmentation, TensorImageDataset, _transforms, collate_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=g)
    data = SeededAugmentation(
        TensorImageDataset(images, torch.arange(16) % 10, _transforms("crop_flip", 28, True))
    )

    def micro(seed, idx):
        m = MicroBatch(idx)
        m.seed = seed
        return m

    state = torch.get_rng_state()
    a, b, c = (data.__getitems__(micro(s, list(range(8))))[0] for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    batches = [micro(s, list(range(i, i + 4))) for s, i in ((1, 0), (2, 4), (3, 8), (4, 12))]
    loaders = [
        torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=w, collate_fn=collate_batch)
        for w in (0, 2)
    ]
    for (x0, _), (x2, _) in zip(*loaders):
        assert torch.equal(x0, x2)


def test_imagenet_crops_are_for_imagenet_only():
    from scaling_abs.config import load_config
    from scaling_abs.errors import ConfigError
    from scaling_abs.trainer import build_data_and_model

    with pytest.raises(ConfigError, match="^augmentation: resized_crop_flip"):
        load_config(None, ["augmentation=resized_crop_flip"])
    with pytest.raises(UserError, match="^augmentation: resized_crop_flip"):
        build_dataset("fashion_mnist", augmentation="resized_crop_flip")
    # auto: an ImageNet model on other images gets crop + flip, at the images' own size
    data, _ = build_data_and_model(load_config(None, ["model=i3", "limit_train_samples=64"]))
    x, _ = data.train.__getitems__(list(range(4)))
    assert x.shape[-1] == data.image_size == 28


@pytest.mark.parametrize("augmentation", ["none", "crop_flip"])
def test_imagenet_images_of_any_size_become_224_without_resized_crops(tmp_path, augmentation):
    """ImageNet's photos differ in size: without resized_crop_flip they took no resize at all and a
    micro-batch of two failed to stack (at the first step, or for crop_flip at the first evaluation)."""
    from PIL import Image

    for split, sizes in (("train", [(300, 200), (180, 260)]), ("val", [(500, 333), (240, 240)])):
        for i, (w, h) in enumerate(sizes):
            (tmp_path / split / f"n0{i}").mkdir(parents=True)
            Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(tmp_path / split / f"n0{i}" / "a.png")
    d = build_dataset("imagenet", data_dir=str(tmp_path), augmentation=augmentation)
    assert d.image_size == 224
    for ds in (d.train, d.test):
        x, y = collate_batch([ds[0], ds[1]])
        assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]


def test_damaged_or_odd_folder_data_sets_are_one_line_errors(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny"
    for c in ("n01", "n02"):
        _write_images(root / "train" / c, ["images"], 2, size=64)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: no class
    # a reorganised val/: class folders, the annotations file left behind
    _write_images(root / "val", ["n01", "n02"], 1, size=64)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t9\t9\n")
    d = build_dataset("tinyimagenet", data_dir=str(root))
    assert (d.num_classes, len(d.test), d.test[1][1]) == (2, 2, 1)
    # the official layout naming a class train/ lacks, or a file that is not there
    (root / "val" / "images").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\t0\t0\t9\t9\n")
    with pytest.raises(UserError, match="names class 'n09' for val_0.JPEG"):
        build_dataset("tinyimagenet", data_dir=str(root))
    (root / "val" / "val_annotations.txt").write_text("val_1.JPEG\tn01\t0\t0\t9\t9\n")
    with pytest.raises(UserError, match="lists val_1.JPEG, which is not in"):
        build_dataset("tinyimagenet", data_dir=str(root))
    (root / "train" / "n03").mkdir()
    with pytest.raises(UserError, match="class folder .*n03 holds no images"):
        build_dataset("tinyimagenet", data_dir=str(root))
    (root / "train" / "n03").rmdir()
    # a truncated image: a one-line error when it is read, not PIL's traceback
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t9\t9\n")
    broken = root / "val" / "images" / "val_0.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])
    d = build_dataset("tinyimagenet", data_dir=str(root))
    with pytest.raises(UserError, match="cannot read image .*val_0.JPEG"):
        d.test[0]
    # no data_dir: said so, not "train/ folder not found: train" (the working folder was read)
    for name in ("tinyimagenet", "imagenet"):
        with pytest.raises(UserError, match=f"^data_dir: {name} needs data_dir="):
            build_dataset(name)
    # Kaggle's flat val/ without its CSV beside train/ and val/
    _write_images(tmp_path / "inet" / "train", ["n01"], 1)
    (tmp_path / "inet" / "val").mkdir()
    with pytest.raises(UserError, match="LOC_val_solution.csv is missing"):
        build_dataset("imagenet", data_dir=str(tmp_path / "inet"))
    # a truncated Fashion-MNIST file
    fm = tmp_path / "fm"
    fm.mkdir()
    import gzip

    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (fm / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abc"))
    with pytest.raises(UserError, match="is damaged"):
        read_fashion_mnist(fm)
    (fm / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 64)[:20])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is damaged"):
        read_fashion_mnist(fm)


def test_a_worker_s_user_error_is_one_line():
    """A DataLoader worker's UserError arrives with the worker's traceback in its message; the CLI
    prints its last line, the original message."""
    from scaling_abs.errors import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError("data_dir: cannot read image x.png (truncated)")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(UserError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)
    assert one_line(info.value) == "data_dir: cannot read image x.png (truncated)"
    assert one_line(UserError("a\nb")) == "a\nb"  # anything else as it is


def test_offline_download_is_a_user_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="^data_dir: .*no network"):
        build_dataset("cifar10", data_dir=str(tmp_path), download=True)


def _hf_set(tmp_path, train_images, train_labels, test_images, test_labels, **features):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), **features}) if features else None
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": train_images, "label": train_labels}, features=feats
            ),
            "test": datasets.Dataset.from_dict({"image": test_images, "label": test_labels}, features=feats),
        }
    )
    dd.save_to_disk(str(tmp_path / "set"))
    return str(tmp_path / "set")


def test_hf_images_of_any_mode_and_size_and_string_labels(tmp_path):
    """Palette and CMYK images trained on palette indices / 4 channels, a greyscale image among
    colour ones or one of another size failed to stack, string labels were a traceback."""
    from PIL import Image

    datasets = pytest.importorskip("datasets")
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    images = [red.convert("P"), red.convert("CMYK"), Image.new("L", (8, 8), 128), red.resize((12, 10))]
    path = _hf_set(
        tmp_path, images, ["cat", "dog", "cat", "emu"], [red], ["dog"], label=datasets.Value("string")
    )
    d = build_dataset("hf:set", data_dir=path)
    assert (d.num_classes, d.in_channels, d.image_size) == (3, 3, 8)
    x, y = collate_batch([d.train[i] for i in range(4)])
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 1, 0, 2]  # cat, dog, emu sorted
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # red, not an index
    assert d.test[0][1] == 1
    path = _hf_set(tmp_path / "b", images, ["cat"] * 4, [red], ["owl"], label=datasets.Value("string"))
    with pytest.raises(UserError, match=r"test labels \['owl'\] are not training labels"):
        build_dataset("hf:set", data_dir=path)


def test_hf_labels_are_checked_in_both_splits(tmp_path):
    from PIL import Image

    grey = [Image.new("L", (8, 8), v) for v in (0, 100, 200)]
    d = build_dataset("hf:set", data_dir=_hf_set(tmp_path, grey, [0, 1, 2], grey[:1], [2]))
    assert (d.num_classes, d.in_channels) == (3, 1)  # all greyscale: one channel
    for labels, match in (([3], "test split has label 3"), ([-1], "test split has label -1")):
        path = _hf_set(tmp_path / str(labels[0]), grey, [0, 1, 2], grey[:1], labels)
        with pytest.raises(UserError, match=match):
            build_dataset("hf:set", data_dir=path)


def test_hf_folders_columns_and_the_network(tmp_path, monkeypatch):
    """An imagefolder (not save_to_disk's) loads through datasets.load_dataset; a name that is not
    cached is an error without download=true, with no connection tried."""
    pytest.importorskip("datasets")
    import socket

    _write_images(tmp_path / "folder" / "train", ["a", "b"], 2)
    _write_images(tmp_path / "folder" / "test", ["a", "b"], 1)
    d = build_dataset("hf:folder", data_dir=str(tmp_path / "folder"))
    assert (len(d.train), len(d.test), d.num_classes) == (4, 2, 2)
    with pytest.raises(UserError, match="image_column= and label_column="):
        build_dataset("hf:folder", data_dir=str(tmp_path / "folder"), label_column="y")

    tried = []

    def no_network(*a, **k):
        tried.append(a)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(UserError, match="download=true lets datasets fetch it"):
        build_dataset("hf:someone/not-cached")
    assert tried == []
