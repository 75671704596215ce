"""MNIST-format data: IDX reading, the bundled sample, torchvision downloads, splits and batches.

Everything is held in memory as tensors (images ``float32 [N, 784]`` in [0, 1], labels
``int64 [N]``); minibatches are index slices of those tensors, so data loading costs
microseconds even at minibatch 10.
"""

from __future__ import annotations

import gzip
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .config import Config
from .errors import DatasetError
from .store import file_lock

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_UBYTE = 0x08


@dataclass(frozen=True)
class Splits:
    """Train / dev / test tensors and where they came from."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    dev_x: torch.Tensor
    dev_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str

    @property
    def n_features(self) -> int:
        return self.train_x.shape[1]

    @property
    def n_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "dev": len(self.dev_y), "test": len(self.test_y)}

    def to(self, device: torch.device) -> Splits:
        """The same splits with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in
                 ("train_x", "train_y", "dev_x", "dev_y", "test_x", "test_y")}
        return Splits(**moved, source=self.source)


def read_idx(path: Path) -> torch.Tensor:
    """Read an unsigned-byte IDX file (gzipped when its name ends in ``.gz``) into a uint8 tensor."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] == 0:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    n_dims = raw[3]
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{n_dims}I", raw[4:header])
    expected = 1
    for size in dims:
        expected *= size
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: truncated or padded: header says {dims}, {expected} bytes expected, "
                           f"{len(raw) - header} found")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((path for path in (folder / stem, folder / f"{stem}.gz") if path.is_file()), None)


def has_idx_files(folder: Path) -> bool:
    """True when ``folder`` holds the four standard IDX files, each plain or ``.gz``."""
    return all(_idx_file(folder, stem) is not None for stem in IDX_FILES.values())


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The four standard IDX files in ``folder``, each plain or ``.gz``."""
    found = {}
    for role, stem in IDX_FILES.items():
        path = _idx_file(folder, stem)
        if path is None:
            raise DatasetError(f"{folder}: missing {stem} (or {stem}.gz); "
                               f"the folder needs the four files {', '.join(IDX_FILES.values())}")
        found[role] = path
    return found


def load_idx_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train images, train labels, test images, test labels (uint8/int) from an IDX folder."""
    paths = find_idx_files(folder)
    arrays = {role: read_idx(path) for role, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1:
            raise DatasetError(f"{paths[f'{split}_images']}: expected images [N, rows, cols] and labels [N]")
        if len(images) != len(labels):
            raise DatasetError(f"{paths[f'{split}_labels']}: {len(labels)} labels for {len(images)} images")
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def bundled_sample_dir() -> Path:
    """The 10,000 real MNIST digits shipped with the package (8,000 train, 2,000 test)."""
    return Path(str(resources.files("mnist_meprop") / "bundled" / "mnist-sample"))


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise DatasetError(f"data_dir {folder}: not writable ({error.strerror or error}); "
                           "choose another data_dir") from None


TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def torchvision_raw_folder(dataset: str, root: Path) -> Path:
    """Where torchvision keeps ``dataset``'s IDX files under ``root`` (``<root>/MNIST/raw``)."""
    return root / TORCHVISION_FOLDERS[dataset] / "raw"


def download_torchvision(dataset: str, root: Path) -> tuple[torch.Tensor, ...]:
    """MNIST or Fashion-MNIST through torchvision: the files already in ``root`` if complete,
    else a download into ``root``."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[dataset]
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
        return train.data, train.targets, test.data, test.targets
    except RuntimeError:
        pass  # not there yet: download
    ensure_writable(root)
    try:
        with file_lock(root / ".download.lock"):  # processes (or Ray workers) starting together download once
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
    except (RuntimeError, OSError, ValueError) as error:
        raw_folder = torchvision_raw_folder(dataset, root)
        names = ", ".join(IDX_FILES.values())
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(f"could not download {dataset} into {root} ({reason}); put the four IDX files "
                           f"({names}, uncompressed) in {raw_folder}, or use dataset: idx with "
                           f"data_dir set to a folder holding them") from None
    return train.data, train.targets, test.data, test.targets


def load_raw(config: Config) -> tuple[tuple[torch.Tensor, ...], str]:
    """The raw train/test tensors for ``config.dataset`` and a description of their source."""
    if config.dataset == "sample":
        folder = bundled_sample_dir()
        return load_idx_folder(folder), "bundled MNIST sample (8,000 train + 2,000 test)"
    if config.dataset == "idx":
        folder = Path(config.data_dir or ".")
        if not folder.is_dir():
            raise DatasetError(f"data_dir {folder}: not a folder")
        return load_idx_folder(folder), f"IDX files in {folder}"
    root = Path(config.data_dir or "data")
    raw = torchvision_raw_folder(config.dataset, root)
    if has_idx_files(raw):  # offline: the IDX files where torchvision keeps them, gzipped or not
        return load_idx_folder(raw), f"{config.dataset} IDX files in {raw}"
    return download_torchvision(config.dataset, root), f"torchvision {config.dataset} in {root}"


def _as_features(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(len(images), -1).to(torch.float32).div_(255.0)


def make_splits(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                test_labels: torch.Tensor, dev_size: int, train_limit: int | None = None,
                test_limit: int | None = None, source: str = "") -> Splits:
    """Dev = the first ``dev_size`` training images, train = the rest, test = the test files.

    ``train_limit`` / ``test_limit`` keep only the first so many train / test examples (for
    quick runs); pixels are scaled to [0, 1].
    """
    if dev_size >= len(train_images):
        raise DatasetError(f"dev_size {dev_size} leaves no training data ({len(train_images)} training images)")
    train_end = len(train_images) if train_limit is None else min(len(train_images), dev_size + train_limit)
    test_end = len(test_images) if test_limit is None else min(len(test_images), test_limit)
    features, test_features = _as_features(train_images), _as_features(test_images)
    labels, test_labels = train_labels.to(torch.int64), test_labels.to(torch.int64)
    return Splits(
        train_x=features[dev_size:train_end], train_y=labels[dev_size:train_end],
        dev_x=features[:dev_size], dev_y=labels[:dev_size],
        test_x=test_features[:test_end], test_y=test_labels[:test_end],
        source=source,
    )


def load_data(config: Config) -> Splits:
    """Load ``config.dataset`` and split it into train / dev / test as the paper does."""
    (train_images, train_labels, test_images, test_labels), source = load_raw(config)
    return make_splits(train_images, train_labels, test_images, test_labels, config.dev_size,
                       config.train_limit, config.test_limit, source)


def iterate_minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                        generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of a seeded random permutation; the last one may be smaller."""
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield x.index_select(0, index), y.index_select(0, index)
