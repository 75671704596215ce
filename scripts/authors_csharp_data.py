"""Turn the authors' C# program's logs into the committed data file the reports read.

Usage (on the project's machine, where the logs are): ``python scripts/authors_csharp_data.py
../shared/peers/authors-csharp --out mnist_meprop/paper/authors-csharp.yaml``. The package
never reads the logs themselves; it reads the YAML this writes, which carries their provenance.

Each log line ``EE:PP: loss: L, acc: A(...)`` is the mean training loss and accuracy over 1/8
of epoch EE+1; the ``dev:`` line after it is the evaluation that follows, and a ``tst:`` line
is there when dev improved (the program tests only then). ``Time: fp: .., bp: .., update: ..``
closes an epoch with its timers. A part whose dev line is missing was cut off when the run
was stopped and is left out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

PART = re.compile(r"^(\d+):(\d+): loss: ([\d.]+), acc: ([\d.]+)")
EVAL = re.compile(r"^\s+(dev|tst): loss: ([\d.]+), acc: ([\d.]+)")
TIMER = re.compile(r"^Time: fp: ([\d.]+)s, bp: ([\d.]+)s, update: ([\d.]+)s")
SETTING = re.compile(r"^(\w+): (.+)$")


def parse_log(path: Path) -> dict:
    settings: dict[str, str] = {}
    parts: list[dict] = []
    timers: list[dict] = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if match := PART.match(line):
            epoch, part = int(match[1]), int(match[2])
            parts.append({"epoch": epoch + 1, "part": part + 1, "at": epoch + (part + 1) / 8,
                          "train_loss": float(match[3]), "train_acc": float(match[4])})
        elif match := EVAL.match(line):
            name = "dev" if match[1] == "dev" else "test"
            parts[-1][f"{name}_loss"], parts[-1][f"{name}_acc"] = float(match[2]), float(match[3])
        elif match := TIMER.match(line):
            timers.append({"epoch": parts[-1]["epoch"], "forward_s": float(match[1]), "backward_s": float(match[2]),
                           "update_s": float(match[3])})
        elif not parts and (match := SETTING.match(line)) and match[1] not in ("Info", "Sep"):
            settings[match[1]] = match[2].strip()
    parts = [part for part in parts if "dev_acc" in part]
    best = None
    for part in parts:
        if best is None or part["dev_acc"] > best["dev_acc"]:
            best = part
    return {"settings": settings, "parts": parts, "timers": timers,
            "best": {"at": best["at"], "dev_acc": best["dev_acc"], "test_acc": best["test_acc"]}}


def run_name(settings: dict[str, str]) -> str:
    k = int(settings["TrainTop"]) if settings["NetType"] == "mlptop" else 0
    method = f"meprop-k{k}" if k else "dense"
    return f"{settings['OptType']}-{method}-seed{settings['RandomSeed']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the authors-csharp peer folder (with logs/)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = {}
    for log in sorted((args.folder / "logs").glob("*.txt")):
        parsed = parse_log(log)
        settings = parsed["settings"]
        n = len(parsed["parts"])
        runs[run_name(settings)] = {
            "log": log.name,
            "net": settings["NetType"], "optimizer": settings["OptType"],
            "k": int(settings["TrainTop"]) if settings["NetType"] == "mlptop" else 0,
            "seed": int(settings["RandomSeed"]), "minibatch": int(settings["MinibatchSize"]),
            "lr": None if settings["OptType"] == "adam" else float(settings["LearningRate"]),
            "epochs_completed": n / 8, "epochs_label": f"{n // 8}" + (f" {n % 8}/8" if n % 8 else ""),
            **parsed,
        }
    header = (
        "# The authors' C# program (github.com/lancopku/meProp, src/csharp/nnmnist, commit d256a51), run on\n"
        "# full MNIST on this project's 2-core machine on 2026-11-24 by the project's CEO; built with Mono 6.8\n"
        "# (one patch for mcs, no algorithmic change). Written by scripts/authors_csharp_data.py from the\n"
        "# program's own log files (named per run). Adam is hard-coded to lr 0.001; the AdaGrad run used lr 0.1\n"
        "# and k=20 (not the paper's k=10). Runs were stopped for time: none reached 20 epochs. Timers are the\n"
        "# program's (seconds per epoch) with 3-5 jobs sharing the machine: only ratios within a run mean much.\n"
        "# Each part is 1/8 epoch: train loss/accuracy over that part, then dev (and test when dev improved).\n"
    )
    text = yaml.safe_dump({"runs": json.loads(json.dumps(runs))}, sort_keys=False, width=120)
    args.out.write_text(header + text, encoding="utf-8")
    for name, run in runs.items():
        print(f"{name}: {run['epochs_label']} epochs, best dev {run['best']['dev_acc']} at {run['best']['at']}, "
              f"test {run['best']['test_acc']}")


if __name__ == "__main__":
    main()
