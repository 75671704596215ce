"""What the stored parsers have learned: the scale of each layer's output, the logits, and which hidden units
per-example top-k selects.

Usage: python scripts/parser_diagnostics.py RUN_DIR [RUN_DIR ...] [--examples 10000] [--k 20]

For every run in each folder (``--out`` of ``meprop train/sweep/reproduce`` with ``task: parsing``),
loads its best-dev model and runs it forward and backward on the same random ``--examples`` training
transitions (fixed seed). Prints per run:

- the mean absolute output of every module of the MLP (linear, activation, ...);
- the mean and the spread (standard deviation over the transitions, averaged over examples) of the
  logits, and the training loss on those examples;
- the mean over examples of the sum of the softmax gradient ``dy = p - onehot`` kept by per-example
  top-``--k`` (the full ``dy`` sums to 0 over the transitions: a negative sum is the push that a
  masked output layer gives every logit upwards);
- per hidden layer, with its output gradient on these examples: the share of all top-``--k``
  selections that go to the ``--k`` most selected units, and the share of units never selected
  (for a backprop model: what top-k would select). A share near 100% means meProp trains about
  ``--k`` units of the layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mnist_meprop.config import validate
from mnist_meprop.store import model_path
from mnist_meprop.task import task_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, x, y = None, None, None
    for run_dir in args.run_dirs:
        for line in (run_dir / "runs.jsonl").read_text().splitlines():
            record = json.loads(line)
            if not model_path(run_dir, record["key"]).exists():  # runs stored before best models were kept
                print(f"{run_dir.name}: {record['method']}: no stored model, skipped")
                continue
            saved = torch.load(model_path(run_dir, record["key"]), map_location="cpu", weights_only=True)
            config = validate(saved["config"])
            if config.simplify.enabled:  # its layers were shrunk to the kept units: not the config's d_hidden
                print(f"{run_dir.name}: meSimp, seed {config.seed}: simplified model, skipped")
                continue
            task = task_for(config)
            if data is None:  # every run of the project's parsing configs shares the data
                data = task.load_data(config)
                order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
                x, y = data.train_x[order[:args.examples]], data.train_y[order[:args.examples]]
            model = task.build_model(config, data)
            model.load_state_dict(saved["model"])
            model.eval()  # no dropout: the model as evaluated (its gradients still flow)
            out = model.embed(x).reshape(len(x), -1).detach()
            scales, hidden = [], []
            for module in model.mlp:
                out = module(out)
                scales.append(float(out.detach().abs().mean()))
                if isinstance(module, torch.nn.Linear) and module is not model.mlp[-1]:
                    out.retain_grad()
                    hidden.append(out)
            loss = F.cross_entropy(out, y)
            loss.backward()
            with torch.no_grad():
                dy = out.softmax(-1)
                dy[torch.arange(len(y)), y] -= 1
                kept = dy.abs().topk(min(args.k, dy.shape[1]), dim=1).indices
                kept_sum = float(dy.gather(1, kept).sum(1).mean())
                selection = []
                for layer, z in enumerate(hidden, 1):
                    k = min(args.k, z.shape[1])  # a layer narrower than k keeps all its units
                    chosen = z.grad.abs().topk(k, dim=1).indices.reshape(-1)
                    counts = torch.bincount(chosen, minlength=z.shape[1]).double()
                    top_share = float(counts.sort(descending=True).values[:k].sum() / counts.sum())
                    selection.append(f"layer {layer}: {top_share:.0%} to its top {k} units, "
                                     f"{float((counts == 0).double().mean()):.0%} of units never")
            print(f"{run_dir.name}: {record['method']}, {config.optimizer}, {config.activation}, hidden "
                  f"{config.d_hidden}, dropout {config.dropout:g}, seed {config.seed}, best epoch "
                  f"{record['best_epoch']}: mean |output| per module {', '.join(f'{s:.3g}' for s in scales)}; "
                  f"logits mean {float(out.detach().mean()):.1f}, spread {float(out.detach().std(1).mean()):.1f}; "
                  f"loss {float(loss.detach()):.3f}; kept top-{args.k} dy sums to {kept_sum:.3f}; "
                  f"top-{args.k} selections: {'; '.join(selection)}")


if __name__ == "__main__":
    main()
