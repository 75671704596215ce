"""Shared fixtures: small IDX folders written from the bundled sample."""

import gzip
import struct
from pathlib import Path

import pytest
import torch

from mnist_meprop.data import IDX_FILES, bundled_sample_dir, load_idx_folder

# Overrides that make an end-to-end run take a second or two.
TINY = ["dev_size=200", "train_limit=600", "test_limit=300", "n_epoch=2", "d_hidden=64", "d_minibatch=20"]


def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx_folder(folder: Path, arrays, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for (role, stem), array in zip(IDX_FILES.items(), arrays):
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def sample_arrays():
    return load_idx_folder(bundled_sample_dir())
