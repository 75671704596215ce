"""Every bad input is one line on stderr, exit code 2, no traceback (mostly run as a real subprocess)."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import idx_bytes, write_idx_folder

from mnist_meprop.cli import main
from mnist_meprop.data import IDX_FILES


def meprop(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mnist_meprop", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("override, fragments", [
    ("n_epochs=2", ["unknown key 'n_epochs'", "did you mean n_epoch?"]),
    ("k=ten", ["k: expected int"]),
    ("k=-1", ["k: must be >= 0"]),
    ("dropout=1", ["dropout: must be in [0, 1)"]),
    ("n_layer=0", ["n_layer: must be >= 1"]),
    ("d_hidden=0", ["d_hidden: must be >= 1"]),
    ("d_minibatch=0", ["d_minibatch: must be >= 1"]),
    ("n_epoch=0", ["n_epoch: must be >= 1"]),
    ("lr=-0.1", ["lr: must be > 0"]),
    ("optimizer=rmsprop", ["optimizer: must be one of adam, adagrad, sgd"]),
    ("dataset=cifar", ["dataset: must be one of"]),
    ("selection=bottomk", ["selection: must be one of topk, random"]),
    ("unified=maybe", ["unified: expected bool"]),
])
def test_bad_config_values(override, fragments):
    result = CliRunner().invoke(main, ["train", "--set", override])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert all(fragment in result.stderr for fragment in fragments)


def test_bad_config_files(tmp_path):
    assert_one_line_error(meprop("train", "--config", str(tmp_path / "nope.yaml")), "nope.yaml", "cannot read")
    broken = tmp_path / "broken.yaml"
    broken.write_text("n_epoch: 2\nk: [10,\nd_hidden: 5\n")
    assert_one_line_error(meprop("train", "--config", str(broken)), "broken.yaml line")
    assert_one_line_error(meprop("sweep", "--k", "0,x"), "--k: expected comma-separated whole numbers")
    assert_one_line_error(meprop("sweep", "--k", "0,-20"), "k: must be >= 0")


@pytest.fixture
def idx_folder(tmp_path, sample_arrays):
    return write_idx_folder(tmp_path / "idx", [a[:50] for a in sample_arrays], gz=False)


def idx_run(folder):
    return meprop("train", "--set", "dataset=idx", "--set", f"data_dir={folder}", "--set", "dev_size=10",
                  "--set", "n_epoch=1", "--out", str(folder.parent / "out"))


def test_idx_dataset_errors(idx_folder):
    images = idx_folder / IDX_FILES["train_images"]
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x0c\x03" + good[4:])
    assert_one_line_error(idx_run(idx_folder), str(images), "magic")
    images.write_bytes(good[:-100])
    assert_one_line_error(idx_run(idx_folder), str(images), "truncated")
    images.write_bytes(good)
    labels = idx_folder / IDX_FILES["test_labels"]
    labels.write_bytes(idx_bytes(torch.zeros(49, dtype=torch.uint8)))
    assert_one_line_error(idx_run(idx_folder), str(labels), "49 labels for 50 images")
    labels.unlink()
    assert_one_line_error(idx_run(idx_folder), "missing t10k-labels-idx1-ubyte")
    assert_one_line_error(idx_run(idx_folder.parent / "no-such-folder"), "not a folder")


def test_truncated_gzip_names_the_file(idx_folder):
    import gzip
    images = idx_folder / IDX_FILES["train_images"]
    packed = gzip.compress(images.read_bytes())
    images.unlink()
    gz = images.with_name(images.name + ".gz")
    gz.write_bytes(packed[: len(packed) // 2])
    assert_one_line_error(idx_run(idx_folder), str(gz))


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = meprop("train", "--set", "dataset=mnist", "--set", f"data_dir={blocker / 'data'}")
    assert_one_line_error(result, str(blocker / "data"), "not writable")


def test_k_at_least_d_hidden_is_a_warning_not_an_error(tmp_path):
    result = meprop("train", "--set", "d_hidden=16", "--set", "k=16", "--set", "n_epoch=1",
                    "--set", "train_limit=100", "--set", "dev_size=50", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning: k=16 >= d_hidden=16: meProp is off" in result.stderr
    assert "| dense" in result.stdout
