"""Data sets. Every one yields ``(image in [0, 1] as float32 CHW, int label)``; normalisation is the
model wrapper's job (``models.Normalized``), so FGSM's eps keeps the paper's meaning.

In-memory sets (Fashion-MNIST, CIFAR, SVHN) are uint8 tensors with a batched ``__getitems__``: a
micro-batch is one indexing operation, which is what makes CPU training fast. Folder sets
(TinyImageNet, ImageNet) and ``hf:`` sets decode per sample in DataLoader workers.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from scaling_abs.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", "svhn_extra", "tinyimagenet", "imagenet")
MEAN_STD = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
MEAN_STD["svhn_extra"] = MEAN_STD["svhn"]  # the same images' statistics


@dataclass
class DataBundle:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: list[str] | None = None  # hf: sets with ClassLabel or string labels


def _read_idx(path: Path) -> np.ndarray:
    """The idx format: 2 zero bytes, a type byte (0x08 = uint8), the rank, big-endian sizes, data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated or not gzip at all
        raise UserError(f"data_dir: {path} is damaged ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"data_dir: {path} is not a uint8 idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise UserError(f"data_dir: {path} is damaged (its header says {shape}, its data differ)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    """The four idx.gz files: train/test images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8."""
    root = Path(root)
    files = {
        "train_images": "train-images-idx3-ubyte.gz",
        "train_labels": "train-labels-idx1-ubyte.gz",
        "test_images": "t10k-images-idx3-ubyte.gz",
        "test_labels": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).exists()]
    if missing:
        raise UserError(
            f"data_dir: Fashion-MNIST not found in {root} (missing {missing[0]}); "
            "install it with `apt-get install dataset-fashion-mnist` or set data_dir="
        )
    return {key: _read_idx(root / name) for key, name in files.items()}


class TensorImageDataset(Dataset):
    """uint8 ``(N, C, H, W)`` images and int64 targets in memory; ``transform`` (per sample) for
    augmentation. ``__getitems__`` returns a collated ``(inputs, targets)`` pair in one step."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None):
        assert images.dtype == torch.uint8 and images.ndim == 4, "images must be uint8 (N, C, H, W)"
        self.images, self.targets, self.transform = images, targets.long(), transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)
        return (self.transform(x) if self.transform else x), int(self.targets[i])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.transform is None:
            return self.images[idx].float().div_(255), self.targets[idx]
        return torch.stack([self[i][0] for i in indices]), self.targets[idx]


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Inside: the CPU generator (where transforms draw) seeded with ``seed``; the global random
    state as it was afterwards."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
        yield


class SeededAugmentation(Dataset):
    """``dataset`` whose micro-batch fetch draws its random augmentation from the micro-batch's own
    seed (:class:`scaling_abs.batching.MicroBatch`), in whichever process fetches it, and leaves
    that process's global random state as it was. Without it, the crops and flips followed the
    global generator, which every new DataLoader iterator advances: a resumed run (one iterator
    more) trained on other crops than the uninterrupted one from the resume on."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        seed = getattr(indices, "seed", None)
        if seed is None:  # plain indices: the global generator, as without this wrapper
            return self._fetch(indices)
        with seeded_cpu_rng(seed):
            return self._fetch(indices)

    def _fetch(self, indices: Sequence[int]) -> Any:
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(indices)
        return [self.dataset[i] for i in indices]


def collate_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn``: a ``__getitems__`` result passes through, a list is stacked."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch
    return default_collate(batch)


RESIZED_CROP = 224  # resized_crop_flip's training crop and evaluation centre crop
IMAGENET_RESIZE = 256  # ImageNet's shorter side before the centre crop (evaluation; none, crop_flip)
RESIZED_CROP_ONLY = (
    "resized_crop_flip (ImageNet's 224-pixel crops, with a resized centre crop for its validation "
    "images) is for dataset=imagenet; other data sets take none or crop_flip"
)


def _transforms(augmentation: str, image_size: int, train: bool):
    """The paper's augmentation (torchvision transforms v2) on float images in [0, 1]."""
    from torchvision.transforms import v2

    if augmentation == "none":
        return None
    if augmentation == "crop_flip":
        return (
            v2.Compose([v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]) if train else None
        )
    if augmentation == "resized_crop_flip":
        if train:
            return v2.Compose([v2.RandomResizedCrop(RESIZED_CROP, antialias=True), v2.RandomHorizontalFlip()])
        return v2.Compose([v2.Resize(IMAGENET_RESIZE, antialias=True), v2.CenterCrop(RESIZED_CROP)])
    raise UserError(f"augmentation: unknown augmentation {augmentation!r}")


class _FileImageDataset(Dataset):
    """``(path, label)`` pairs decoded with PIL, converted to [0, 1] tensors, then transformed."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None, size: int | None = None):
        self.samples, self.transform, self.size = samples, transform, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                x = TF.to_dtype(TF.to_image(im.convert("RGB")), torch.float32, scale=True)
        except OSError as e:  # missing, truncated or not an image (PIL's errors are OSErrors)
            raise UserError(f"data_dir: cannot read image {path} ({e})") from None
        if self.size is not None and x.shape[-1] != self.size:
            x = TF.resize(x, [self.size, self.size], antialias=True)
        return (self.transform(x) if self.transform else x), label


def _image_folder(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    given = classes is not None  # validation folders may lack some of train/'s classes
    # hidden folders (.ipynb_checkpoints, .git) are no classes
    classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    samples, empty = [], []
    for c in classes:
        found = [
            (os.path.join(dirpath, f), index[c])
            for dirpath, _, files in sorted(os.walk(root / c))
            for f in sorted(files)
            if f.lower().endswith(IMG_EXTENSIONS)
        ]
        empty += [] if found else [c]
        samples += found
    if not samples:
        raise UserError(f"data_dir: no images under {root}")
    if empty and not given:  # a class no sample has would still be an output of the model
        raise UserError(f"data_dir: class folder {root / empty[0]} holds no images")
    return samples, classes


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise UserError(f"data_dir: {what} not found: {path}")


def _fashion_mnist(data_dir, aug, **_):
    arrays = read_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    train = TensorImageDataset(
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        _transforms(aug, 28, True),
    )
    test = TensorImageDataset(
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return train, test, 10, 1, 28


def _cifar(name, data_dir, aug, download):
    import torchvision

    if not data_dir:
        raise UserError(f"data_dir: {name} needs data_dir= (the folder torchvision's {name.upper()} uses)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tr, te = cls(data_dir, train=True, download=download), cls(data_dir, train=False, download=download)
    except (RuntimeError, OSError) as e:  # missing or damaged files; offline with download=true
        raise UserError(f"data_dir: {e} (in {data_dir}; download=true fetches it when online)") from None

    def as_tensors(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    train = TensorImageDataset(*as_tensors(tr), _transforms(aug, 32, True))
    test = TensorImageDataset(*as_tensors(te))
    return train, test, 10 if name == "cifar10" else 100, 3, 32


SVHN_SPLITS = {"svhn": ("train", "extra"), "svhn_extra": ("extra",)}  # training splits of each name


def _svhn(name, data_dir, aug, download):
    """``svhn``: train + extra (604,388 images); ``svhn_extra``: extra alone (531,131), what the paper
    trains S1 on (Appendix B: "we choose the additional dataset"; Table 4's BL update counts are 20
    epochs of it: 20,747 at 512). Test: the 26,032 test images. Every split named must be there."""
    import torchvision

    splits = SVHN_SPLITS[name]
    files = [f"{split}_32x32.mat" for split in (*splits, "test")]
    if not data_dir:
        raise UserError(f"data_dir: {name} needs data_dir= (the folder with {', '.join(files)})")
    missing = [f for f in files if not (Path(data_dir) / f).exists()]
    if missing and not download:
        raise UserError(
            f"data_dir: {name} needs {', '.join(missing)} in {data_dir} (download=true fetches them when online)"
        )
    try:
        parts = [torchvision.datasets.SVHN(data_dir, split=split, download=download) for split in splits]
        te = torchvision.datasets.SVHN(data_dir, split="test", download=download)
    except (RuntimeError, OSError) as e:  # missing or damaged files; offline with download=true
        raise UserError(f"data_dir: {e} (in {data_dir}; download=true fetches it when online)") from None
    images = torch.cat([torch.from_numpy(p.data) for p in parts])
    labels = torch.cat([torch.from_numpy(p.labels.astype(np.int64)) for p in parts])
    train = TensorImageDataset(images, labels, _transforms(aug, 32, True))
    test = TensorImageDataset(torch.from_numpy(te.data), torch.from_numpy(te.labels.astype(np.int64)))
    return train, test, 10, 3, 32


def _listed(
    root: Path, listing: Path, rows: list[tuple[str, str]], index: dict[str, int]
) -> list[tuple[str, int]]:
    """Validation samples named by a listing file (``(file name, class)`` rows), every file and
    class checked now rather than at the first evaluation, an epoch into training."""
    samples = []
    for name, wnid in rows:
        if wnid not in index:
            raise UserError(
                f"data_dir: {listing} names class {wnid!r} for {name}, which train/ does not have"
            )
        path = root / name
        if not path.is_file():
            raise UserError(f"data_dir: {listing} lists {name}, which is not in {root}")
        samples.append((str(path), index[wnid]))
    if not samples:
        raise UserError(f"data_dir: {listing} lists no images")
    return samples


def _folder_root(name: str, data_dir: str | None, layout: str) -> Path:
    if not data_dir:
        raise UserError(f"data_dir: {name} needs data_dir= (the folder with {layout})")
    return Path(data_dir)


def _tinyimagenet(data_dir, aug, **_):
    root = _folder_root("tinyimagenet", data_dir, "train/ and val/")
    _need_dir(root / "train", "TinyImageNet train/ folder")
    _need_dir(root / "val", "TinyImageNet val/ folder")
    train_samples, classes = _image_folder(root / "train")
    index = {c: i for i, c in enumerate(classes)}
    ann = root / "val" / "val_annotations.txt"
    if ann.exists() and (root / "val" / "images").is_dir():
        # the official layout: val/images/*.JPEG + val_annotations.txt (file, wnid, box)
        rows = [line.split("\t") for line in ann.read_text().splitlines() if line.strip()]
        if any(len(r) < 2 for r in rows):
            raise UserError(f"data_dir: {ann} is not tab-separated (file, class, ...)")
        val_samples = _listed(root / "val" / "images", ann, [(r[0], r[1]) for r in rows], index)
    else:  # class folders (val/<wnid>/...), as reorganising scripts leave them
        val_samples, _ = _image_folder(root / "val", classes)
    return (
        _FileImageDataset(train_samples, _transforms(aug, 64, True), 64),
        _FileImageDataset(val_samples, None, 64),
        len(classes),
        3,
        64,
    )


def _imagenet(data_dir, aug, **_):
    from torchvision.transforms import v2

    root = _folder_root("imagenet", data_dir, "train/<wnid>/ and val/")
    _need_dir(root / "train", "ImageNet train/ folder")
    _need_dir(root / "val", "ImageNet val/ folder")
    train_samples, classes = _image_folder(root / "train")
    solution = root / "LOC_val_solution.csv"
    if not any(d.is_dir() for d in (root / "val").iterdir()):
        # Kaggle's flat val/ with LOC_val_solution.csv (ImageId, "wnid x y x y ...")
        if not solution.exists():
            raise UserError(
                f"data_dir: ImageNet's val/ has no class folders and {solution} is missing (Kaggle's "
                "download keeps LOC_val_solution.csv two folders above ILSVRC/Data/CLS-LOC: copy it beside train/ and val/)"
            )
        rows = [line.split(",") for line in solution.read_text().splitlines()[1:] if line.strip()]
        if any(len(r) < 2 or not r[1].split() for r in rows):
            raise UserError(f"data_dir: {solution} is not ImageId,PredictionString rows")
        index = {c: i for i, c in enumerate(classes)}
        val_samples = _listed(
            root / "val", solution, [(f"{r[0]}.JPEG", r[1].split()[0]) for r in rows], index
        )
    else:
        val_samples, _ = _image_folder(root / "val", classes)
    # Every image becomes 224 x 224: resized_crop_flip crops at random scales and aspects (training)
    # and centre-crops (evaluation); the others take the evaluation's resize and centre crop, to
    # which crop_flip adds its padded random crop and flip.
    centre = v2.Compose([v2.Resize(IMAGENET_RESIZE, antialias=True), v2.CenterCrop(RESIZED_CROP)])
    if aug == "resized_crop_flip":
        train_t, test_t = _transforms(aug, RESIZED_CROP, True), _transforms(aug, RESIZED_CROP, False)
    else:
        extra = _transforms(aug, RESIZED_CROP, True)
        train_t, test_t = (centre if extra is None else v2.Compose([centre, extra])), centre
    return (
        _FileImageDataset(train_samples, train_t),
        _FileImageDataset(val_samples, test_t),
        len(classes),
        3,
        RESIZED_CROP,
    )


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes taken as one channel; any other as RGB


class _HFImageDataset(Dataset):
    """A ``datasets`` split as ``(image in [0, 1] CHW, label)``: PIL images converted to ``mode``
    (palette, CMYK and the like to RGB, a stray greyscale image among colour ones too), every
    image resized to ``size`` (the first image's) where it differs, labels through ``label_map``
    (string labels) or as they are."""

    def __init__(self, ds, image_column: str, label_column: str, *, mode: str, label_map: dict | None):
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.mode, self.label_map = mode, label_map
        self.size: tuple[int, int] | None = None
        self.transform: Callable | None = None
        self.class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2 import functional as TF

        row = self.ds[int(i)]
        img = row[self.image_column]
        if hasattr(img, "convert"):  # PIL
            x = TF.to_dtype(
                TF.to_image(img if img.mode == self.mode else img.convert(self.mode)),
                torch.float32,
                scale=True,
            )
        else:
            arr = torch.as_tensor(np.asarray(img))
            arr = (
                arr.unsqueeze(0)
                if arr.ndim == 2
                else arr.permute(2, 0, 1)
                if arr.shape[-1] in (1, 3)
                else arr
            )
            # integer pixels (uint8, or int64 after a round trip through Arrow) are 0..255
            x = arr.float().div(255) if not arr.is_floating_point() else arr.float()
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = TF.resize(x, list(self.size), antialias=True)
        label = row[self.label_column]
        label = self.label_map[label] if self.label_map is not None else int(label)
        return (self.transform(x) if self.transform else x), label


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """``datasets`` and ``huggingface_hub`` kept off the network (their offline flags, read at each
    call) unless ``download=true``: a name that is not in the local cache is then an error, not a
    download."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _load_hf(name: str, data_dir: str | None, download: bool):
    import datasets

    source = data_dir or name
    saved = Path(source).is_dir() and any(
        (Path(source) / f).exists() for f in ("dataset_dict.json", "state.json")
    )
    try:
        with _hub_offline(not download):
            # save_to_disk's folders; any other folder (imagefolder, parquet, csv) or a hub name
            return datasets.load_from_disk(source) if saved else datasets.load_dataset(source)
    except Exception as e:  # offline hub access, a bad path: the user's to fix
        hint = "" if download else "; download=true lets datasets fetch it"
        raise UserError(f"dataset: cannot load hf:{name} ({str(e).splitlines()[0][:200]}{hint})") from None


def _hf_labels(name: str, ds, label_column: str, test_split: str) -> tuple[int, dict | None]:
    """The number of classes and, for string labels, their map (sorted names of the training
    labels); every label of both splits checked to be a class. Read as NumPy arrays (a Python loop
    over ImageNet's 1.3 M labels took a minute)."""
    feature = ds["train"].features[label_column]
    train_labels, test_labels = (  # one Arrow read each ([:]: a column read row by row took minutes)
        np.asarray(ds[split].with_format("numpy", columns=[label_column])[:][label_column])
        for split in ("train", test_split)
    )
    if train_labels.dtype.kind in "OUS":  # strings (or a mix, refused below)
        if not all(isinstance(v, str) for v in np.unique(train_labels.astype(object))):
            raise UserError(
                f"dataset: hf:{name}'s {label_column!r} column holds neither integers nor strings"
            )
        label_map = {str(c): i for i, c in enumerate(np.unique(train_labels.astype(str)))}
        unknown = sorted(set(np.unique(test_labels.astype(str)).tolist()) - set(label_map))
        if unknown:
            raise UserError(f"dataset: hf:{name}'s {test_split} labels {unknown[:3]} are not training labels")
        return len(label_map), label_map
    if train_labels.dtype.kind not in "iu":
        raise UserError(f"dataset: hf:{name}'s {label_column!r} column holds neither integers nor strings")
    num_classes = feature.num_classes if hasattr(feature, "num_classes") else int(train_labels.max()) + 1
    for split, labels in (("train", train_labels), (test_split, test_labels)):
        if labels.dtype.kind not in "iu":
            raise UserError(f"dataset: hf:{name}'s {split} labels are not integers like the training ones")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise UserError(
                f"dataset: hf:{name}'s {split} split has label {int(bad[0])}, not one of the {num_classes} "
                "classes (an unlabelled split marks its labels -1)"
            )
    return num_classes, None


def _hf(name, data_dir, aug, image_column, label_column, download=False, **_):
    try:
        import datasets
    except ImportError:
        raise UserError(
            "dataset: hf: data sets need the datasets package (pip install 'scaling-abs[hf]')"
        ) from None
    ds = _load_hf(name, data_dir, download)
    if not isinstance(ds, datasets.DatasetDict) or "train" not in ds:
        raise UserError(f"dataset: hf:{name} must have a train split (and test or validation)")
    test_split = "test" if "test" in ds else "validation" if "validation" in ds else None
    if test_split is None:
        raise UserError(f"dataset: hf:{name} has no test or validation split")
    for col in (image_column, label_column):
        if col not in ds["train"].column_names:
            raise UserError(
                f"dataset: hf:{name} has no column {col!r} (columns: {ds['train'].column_names}; "
                "image_column= and label_column= name others)"
            )
    num_classes, label_map = _hf_labels(name, ds, label_column, test_split)
    # one channel only if the first images are all greyscale; PIL images of other modes converted
    head = ds["train"].select(range(min(32, len(ds["train"]))))[image_column]
    grey = all(getattr(img, "mode", None) in GREY_MODES for img in head)
    train, test = (
        _HFImageDataset(
            ds[split], image_column, label_column, mode="L" if grey else "RGB", label_map=label_map
        )
        for split in ("train", test_split)
    )
    x0, _ = train[0]
    if x0.is_floating_point() and not 0 <= float(x0.min()) <= float(x0.max()) <= 1:
        raise UserError(f"dataset: hf:{name}'s float images are not in [0, 1] (scale them, or store uint8)")
    train.size = test.size = tuple(x0.shape[-2:])
    feature = ds["train"].features[label_column]
    train.class_names = list(feature.names) if hasattr(feature, "names") else label_map and list(label_map)
    train.transform = _transforms(aug, x0.shape[-1], True)
    return train, test, num_classes, x0.shape[0], x0.shape[-1]


def build_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    augmentation: str = "none",
    download: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    limit_train_samples: int | None = None,
) -> DataBundle:
    """The named data set as a :class:`DataBundle` (train/test sets, classes, channels, size, mean/std)."""
    if data_dir and not Path(data_dir).exists():
        raise UserError(f"data_dir: no such directory: {data_dir}")
    if augmentation == "resized_crop_flip" and name != "imagenet":
        raise UserError(f"augmentation: {RESIZED_CROP_ONLY}")
    if name.startswith("hf:"):
        train, test, classes, channels, size = _hf(
            name[3:], data_dir, augmentation, image_column, label_column, download=download
        )
        mean = std = None
    elif name == "fashion_mnist":
        train, test, classes, channels, size = _fashion_mnist(data_dir, augmentation)
    elif name in ("cifar10", "cifar100"):
        train, test, classes, channels, size = _cifar(name, data_dir, augmentation, download)
    elif name in SVHN_SPLITS:
        train, test, classes, channels, size = _svhn(name, data_dir, augmentation, download)
    elif name == "tinyimagenet":
        train, test, classes, channels, size = _tinyimagenet(data_dir, augmentation)
    elif name == "imagenet":
        train, test, classes, channels, size = _imagenet(data_dir, augmentation)
    else:
        raise UserError(f"dataset: unknown data set {name!r} (choose {', '.join(DATASETS)} or hf:<name>)")
    class_names = getattr(train, "class_names", None)
    if not name.startswith("hf:"):
        mean, std = MEAN_STD[name]
    if limit_train_samples and limit_train_samples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:limit_train_samples]
        if isinstance(train, TensorImageDataset):
            train = TensorImageDataset(train.images[keep], train.targets[keep], train.transform)
        else:
            train = torch.utils.data.Subset(train, keep.tolist())
    return DataBundle(name, train, test, classes, channels, size, mean, std, class_names)
