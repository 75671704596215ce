"""The CI accuracy-regression guard: a few epochs of the paper's settings on the bundled sample must
reach floors set from measured runs (``tests/data/accuracy_guard.yaml``, measured by
``scripts/accuracy_guard_floors.py``).

Unit tests check each piece against a reference; this checks that the pieces still *learn*
together. A wrong gradient (top-k by signed value, a dropped ``dx``) or a broken optimizer
(gradients never zeroed) falls below the floors: ``scripts/accuracy_guard_floors.py --sabotage``
shows it.
"""

from pathlib import Path

import pytest
import yaml

from mnist_meprop.config import validate
from mnist_meprop.data import load_data
from mnist_meprop.train import train_run

GUARD = yaml.safe_load((Path(__file__).parent / "data" / "accuracy_guard.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sample():
    return load_data(validate(GUARD["base"]))


@pytest.mark.parametrize("name", list(GUARD["cases"]))
def test_short_training_reaches_its_floor(sample, name):
    case = GUARD["cases"][name]
    config = validate({**GUARD["base"], **case["set"], "seed": 1})
    result = train_run(config, sample, lambda _line: None)
    assert result.test_acc >= case["floor"], (
        f"{name}: test {result.test_acc:.2f}% < floor {case['floor']:.2f}% "
        f"(measured seeds 1-5: {case['measured']}); dev per epoch {[round(e['dev_acc'], 2) for e in result.epochs]}")
