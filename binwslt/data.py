"""Datasets: scikit-learn's bundled digits, CIFAR-10/100 from the python-pickle batches, and a batch loader.

Images are kept as uint8 tensors ``[N, C, H, W]`` in memory and normalised per batch, so CIFAR costs
150 MB, not 600. The loader shuffles with a generator seeded by ``(seed, epoch)`` and shards the permutation
across DDP ranks, so an epoch's batches depend only on the seed and the epoch number: a run resumed at an
epoch boundary sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100")

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html) and their published MD5 sums.
ARCHIVES = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "filename": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "num_classes": 10,
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "filename": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "num_classes": 100,
    },
}

# Per-channel mean/std of the training images in [0, 1] units (the values the CIFAR literature uses).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass
class Dataset:
    """An image-classification dataset held in memory.

    ``train_images``/``test_images``: uint8 ``[N, C, H, W]`` with values in ``[0, max_value]``;
    ``train_labels``/``test_labels``: int64 ``[N]``. ``mean``/``std``: per-channel statistics in [0, 1] units
    used by :meth:`normalise`. ``augment_default``: whether crop/flip augmentation suits this data.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    max_value: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment_default: bool

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float, same units) ``[B, C, H, W]`` -> float32 ``[B, C, H, W]``, (x/max - mean)/std."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return (images.to(torch.float32) / self.max_value - mean) / std

    def loader(self, split: str, batch_size: int, *, shuffle: bool, augment: Optional[bool] = None, seed: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> "BatchLoader":
        """A :class:`BatchLoader` over ``split`` ("train" or "test"); ``augment=None`` takes the dataset default
        for the train split and never augments the test split."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = (self.train_images, self.train_labels) if split == "train" else \
            (self.test_images, self.test_labels)
        if augment is None:
            augment = self.augment_default and split == "train"
        return BatchLoader(self, images, labels, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                           rank=rank, world_size=world_size, drop_last=drop_last)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding (as torchvision's ``RandomCrop(size, padding)``) and horizontal flip.

    ``images``: ``[B, C, H, W]`` of any dtype, raw pixel values (padding is black, 0). Returns the same shape
    and dtype. Randomness comes only from ``generator`` (CPU).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    off_y = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
    off_x = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    rows = off_y[:, None] + torch.arange(h, device=images.device)[None, :]
    cols = off_x[:, None] + torch.arange(w, device=images.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Iterates ``(x float32 [B, C, H, W] normalised, y int64 [B])`` over a split.

    Shuffling uses a generator seeded from ``(seed, epoch)`` (call :meth:`set_epoch`), so every rank draws the
    same permutation; rank ``r`` of ``world_size`` takes every ``world_size``-th index (padded by wrapping so
    all ranks get the same number of samples, as ``DistributedSampler`` does).
    """

    def __init__(self, dataset: Dataset, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool, augment: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.dataset = dataset
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = -(-n // self.world_size) * self.world_size
            if total > n:
                order = torch.cat([order, order[: total - n]])
            order = order[self.rank::self.world_size]
        return order

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before ``drop_last``)."""
        return int(self._indices().numel())

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        aug_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank + 1)
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                break
            images = self.images[idx]
            if self.augment:
                images = random_crop_flip(images, aug_gen)
            yield self.dataset.normalise(images), self.labels[idx]


def check_dataset_name(name) -> str:
    """Return ``name`` if it is a known dataset, else raise ValueError listing the choices."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    return name


def load_dataset(name: str, data_dir: str = "./data", download: bool = False) -> Dataset:
    """Load ``name`` ("digits", "cifar10" or "cifar100").

    ``digits`` is scikit-learn's bundled 8x8 digits (1,797 images, 1 channel, values 0..16), split 80/20,
    stratified, with a fixed seed. CIFAR is read from ``data_dir`` (either the folder holding
    ``cifar-10-batches-py``/``cifar-100-python`` or that folder itself); ``download=True`` fetches and
    MD5-checks the official archive first when it is missing.
    """
    check_dataset_name(name)
    if name == "digits":
        return load_digits()
    return load_cifar(name, data_dir, download=download)


def load_digits() -> Dataset:
    """scikit-learn's digits: train/test uint8 ``[N, 1, 8, 8]`` (0..16), 10 classes, fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=DIGITS_TEST_FRACTION,
                                              random_state=DIGITS_SPLIT_SEED, stratify=labels)
    scaled = tr_x.astype(np.float64) / 16.0
    return Dataset("digits", torch.from_numpy(np.ascontiguousarray(tr_x)), torch.from_numpy(tr_y),
                   torch.from_numpy(np.ascontiguousarray(te_x)), torch.from_numpy(te_y), num_classes=10,
                   max_value=16.0, mean=(float(scaled.mean()),), std=(float(scaled.std()),),
                   augment_default=False)


def _cifar_folder(name: str, data_dir: str) -> str:
    spec = ARCHIVES[name]
    if os.path.basename(os.path.normpath(data_dir)) == spec["folder"]:
        return data_dir
    return os.path.join(data_dir, spec["folder"])


def _read_batch(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable CIFAR python-pickle batch ({exc})") from exc
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict with keys b'data' and {label_key!r}, "
                         f"got {keys}")
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected uint8 data of shape [N, 3072] and N labels, got data "
                         f"{data.dtype} {data.shape} and {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str = "./data", download: bool = False) -> Dataset:
    """CIFAR-10/100 from the standard python-pickle batches: uint8 ``[N, 3, 32, 32]``, crop/flip augmentation.

    Raises FileNotFoundError naming the folder and the batch files expected when the data is missing (and
    ``download`` is False), ValueError when a batch is corrupt or labels fall outside the class range.
    """
    if name not in ARCHIVES:
        raise ValueError(f"load_cifar handles {', '.join(ARCHIVES)}; got {name!r}")
    spec = ARCHIVES[name]
    folder = _cifar_folder(name, data_dir)
    expected = spec["train"] + spec["test"]
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        download_cifar(name, data_dir)
        missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: expected the python-pickle batches {', '.join(expected)} in {folder} "
            f"(missing: {', '.join(missing)}); pass --download to fetch {spec['url']}, or --data-dir to point "
            f"at the folder that holds {spec['folder']}")
    parts = {}
    for split in ("train", "test"):
        batches = [_read_batch(os.path.join(folder, f), spec["label_key"]) for f in spec[split]]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
            raise ValueError(f"{name} {split} labels in {folder} must lie in [0, {spec['num_classes']}), got "
                             f"[{labels.min()}, {labels.max()}]")
        parts[split] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    mean, std = CIFAR_STATS[name]
    return Dataset(name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                   num_classes=spec["num_classes"], max_value=255.0, mean=mean, std=std, augment_default=True)


def md5sum(path: str, chunk: int = 1 << 20) -> str:
    """Hex MD5 of the file at ``path``."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar(name: str, data_dir: str) -> str:
    """Fetch the official archive of ``name`` into ``data_dir``, check its MD5, extract it; returns the folder.

    An archive already present with the right MD5 is not fetched again. Raises RuntimeError when the network
    fails and ValueError (deleting the file) when the MD5 does not match.
    """
    spec = ARCHIVES[name]
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, spec["filename"])
    if not (os.path.isfile(archive) and md5sum(archive) == spec["md5"]):
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=spec["filename"] + ".", suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(spec["url"], timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as exc:
            os.unlink(tmp)
            raise RuntimeError(f"could not download {spec['url']} to {archive}: {exc}; fetch it by hand and "
                               f"place it there, or extract it into {data_dir}") from exc
        got = md5sum(tmp)
        if got != spec["md5"]:
            os.unlink(tmp)
            raise ValueError(f"MD5 of {spec['url']} is {got}, expected {spec['md5']}: the download is corrupt")
        os.replace(tmp, archive)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(data_dir, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tar.extractall(data_dir)
    return os.path.join(data_dir, spec["folder"])
