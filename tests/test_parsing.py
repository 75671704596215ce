"""Arc-standard parsing: the oracle rebuilds every projective tree, features of a hand-checked
configuration, greedy parsing and attachment scores on tiny made-up treebanks."""

import random

import pytest

from mnist_meprop.conllu import Sentence
from mnist_meprop.parsing import (NULL, ROOT_TOKEN, SHIFT, Configuration, attachment_scores, feature_tokens,
                                  features, is_projective, oracle, parse, transitions)


def sentence(words, heads, relations=None, upos=None) -> Sentence:
    n = len(words)
    return Sentence(tuple(words), tuple(upos or ["X"] * n), tuple(f"T{i}" for i in range(1, n + 1)), tuple(heads),
                    tuple(relations or ["dep"] * n))


def random_projective_heads(n: int, rng: random.Random) -> list[int]:
    """A random projective tree over words 1..n: a root word, and each span's words hung recursively."""
    heads = [0] * n

    def hang(first: int, last: int, head: int) -> None:  # words first..last all depend (transitively) on head
        if first > last:
            return
        child = rng.randint(first, last)
        heads[child - 1] = head
        hang(first, child - 1, child)
        hang(child + 1, last, child)
    hang(1, n, 0)
    return heads


def rebuild(s: Sentence) -> Configuration:
    config = Configuration(len(s.words))
    for transition in oracle(s):
        config.apply(transition)
    return config


def test_oracle_rebuilds_every_projective_tree_of_a_random_sample():
    rng = random.Random(0)
    for n in list(range(1, 12)) * 20 + [40, 60]:
        heads = random_projective_heads(n, rng)
        relations = [rng.choice(["nsubj", "obj", "nmod:poss", "det"]) for _ in range(n)]
        s = sentence([f"w{i}" for i in range(n)], heads, relations)
        assert is_projective(heads)
        config = rebuild(s)
        assert config.heads[1:] == heads
        assert config.labels[1:] == [r.split(":")[0] for r in relations]
        assert len(oracle(s)) == 2 * n  # n shifts, n arcs


def test_non_projective_trees_are_left_out():
    heads = [3, 4, 0, 3]  # 1 <- 3 and 2 <- 4 cross
    assert not is_projective(heads)
    assert oracle(sentence(["a", "b", "c", "d"], heads)) is None


def test_features_of_a_hand_checked_configuration():
    # "the cat sat on the mat": the(1) <- cat(2) <- sat(3), on(4) <- mat(6), the(5) <- mat(6)
    s = sentence(["the", "cat", "sat", "on", "the", "mat"], [2, 3, 0, 6, 6, 3],
                 ["det", "nsubj", "root", "case", "det", "obl"])
    config = Configuration(6)
    for transition in [SHIFT, SHIFT, "L|det", SHIFT, "L|nsubj", SHIFT, SHIFT]:
        config.apply(transition)
    # stack: root, sat, on, the(5); buffer: mat
    tokens, children = feature_tokens(config)
    assert tokens[:6] == [5, 4, 3, 6, -1, -1]
    # children of s1 = the(5): none; of s2 = on(4): none
    assert children == [-1] * 12
    config.apply(SHIFT)  # stack: root, sat, on, the, mat
    config.apply("L|det")  # the(5) <- mat
    config.apply("L|case")  # on(4) <- mat; stack: root, sat, mat
    tokens, children = feature_tokens(config)
    assert tokens[:6] == [6, 3, 0, -1, -1, -1]
    # s1 = mat: lc1 = on(4), rc1 = none, lc2 = the(5), rc2 = none, lc1(lc1) = none, rc1(rc1) = none;
    # s2 = sat: lc1 = cat(2), rc1 = none, lc2 = none, rc2 = none, lc1(lc1) = the(1), rc1(rc1) = none
    assert children == [4, -1, 5, -1, -1, -1, 2, -1, -1, -1, 1, -1]
    vocabulary = {}

    def ids(value):
        return vocabulary.setdefault(value, len(vocabulary))
    values = features(config, s, ids, ids, ids)
    assert len(values) == 48
    names = {number: name for name, number in vocabulary.items()}
    assert [names[v] for v in values[:3]] == ["mat", "sat", ROOT_TOKEN]
    assert [names[v] for v in values[18:21]] == ["T6", "T3", ROOT_TOKEN]
    assert names[values[36]] == "case" and names[values[38]] == "det" and names[values[42]] == "nsubj"
    assert names[values[37]] == NULL


def test_greedy_parse_with_an_oracle_score_is_exact_and_scores_count_non_punctuation():
    rng = random.Random(1)
    gold = []
    for n in (3, 7, 12):
        heads = random_projective_heads(n, rng)
        upos = ["PUNCT" if i == n - 1 else "NOUN" for i in range(n)]
        gold.append(sentence([f"w{i}" for i in range(n)], heads, ["dep"] * n, upos))
    names = transitions(["dep"])

    predicted = [parse(s, _oracle_scores(s, names), names) for s in gold]
    assert attachment_scores(gold, predicted) == (100.0, 100.0)
    chain = sentence(["a", "b", "."], [2, 0, 2], ["det", "root", "punct"], ["DET", "NOUN", "PUNCT"])
    wrong = Configuration(3)
    while not wrong.terminal:  # shift everything, then right arcs: 1 <- root, 2 <- 1, 3 <- 2
        wrong.apply(SHIFT if wrong.legal(SHIFT) else "R|dep")
    assert wrong.heads[1:] == [0, 1, 2]
    assert attachment_scores([chain], [wrong]) == (0.0, 0.0)  # "." (right by chance) is not scored
    assert attachment_scores([chain], [rebuild(chain)]) == (100.0, 100.0)


def _oracle_scores(s, names):
    """A score function preferring, at each call, the oracle's next transition."""
    wanted = list(oracle(s))

    def score(config):
        transition = wanted.pop(0)
        return [1.0 if name == transition else 0.0 for name in names]
    return score


@pytest.mark.parametrize("transition, stack, buffer_empty, legal", [
    ("L|dep", [0, 1], False, False),  # the root never gets a head
    ("R|dep", [0, 1], False, False),  # a word goes to the root only at the end
    ("R|dep", [0, 1], True, True),
    (SHIFT, [0, 1], True, False),
])
def test_legal_transitions(transition, stack, buffer_empty, legal):
    config = Configuration(1)
    config.stack = stack
    config.buffer_start = 2 if buffer_empty else 1
    assert config.legal(transition) == legal


def test_greedy_parse_never_takes_an_illegal_transition():
    s = sentence(["a", "b", "c"], [2, 0, 2])
    names = transitions(["dep"])
    always_left = parse(s, lambda config: [0.0, 1.0, 0.5], names)  # prefers L|dep, then R|dep
    assert sorted(always_left.heads[1:]).count(0) == 1  # one word on the root: a tree
    assert all(head != word for word, head in enumerate(always_left.heads[1:], 1))


def test_parser_trains_end_to_end_on_a_few_sentences_through_the_cli(tmp_path):
    import json

    from click.testing import CliRunner
    from test_pos import SENTENCES, write_tiny_ewt

    from mnist_meprop.cli import main

    write_tiny_ewt(tmp_path)
    args = ["train", "--set", "task=parsing", "--set", "dataset=ewt", "--set", f"data_dir={tmp_path}", "--set",
            "d_hidden=32", "--set", "k=4", "--set", "d_minibatch=16", "--set", "n_epoch=8", "--set", "lr=0.01",
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "parser MLP 3 layers, hidden 32" in result.output and "UAS in %" in result.output
    assert "  epoch 8/8 " in result.output and "dev UAS " in result.output and "test@best UAS " in result.output
    assert "done: best dev UAS " in result.output  # the score is named: a parser's is UAS, not accuracy
    [record] = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert record["config"]["task"] == "parsing"
    assert record["data"] == {**record["data"], "train": 2 * 5 * sum(len(s) for s in SENTENCES), "test": 4}
    assert record["test_acc"] > 50  # UAS: the made-up trees are flat (every word on word 2)
    assert record["epochs"][-1]["train_loss"] < record["epochs"][0]["train_loss"]


@pytest.mark.parametrize(("activation", "output_k"), [("relu", None), ("cube", None), ("cube", 0), ("cube", 5)])
def test_parser_gradients_equal_the_masked_reference_output_layer_included(activation, output_k):
    """Every layer (the output layer too, with its own ``output_k`` when given) back-propagates the
    per-example top-k of its output gradient, down into the embeddings: against the same model run
    densely with hooks masking each layer's gradient to that layer's k."""
    import copy

    import torch
    from torch import nn

    from mnist_meprop.layers import MePropLinear
    from mnist_meprop.parsing_model import Parser

    torch.manual_seed(0)
    model = Parser(100, 12, 16, 3, k=3, activation=activation, output_k=output_k).double()
    reference = copy.deepcopy(model)
    layer_k = {0: 3, 2: 3, 4: 3 if output_k is None else output_k}  # the output layer: the hidden k unless given

    def mask_output_gradient(module, args, out):
        def mask(grad):
            kept = grad.abs().topk(module.kept, dim=-1).indices
            return torch.zeros_like(grad).scatter_(-1, kept, grad.gather(-1, kept))
        if module.kept:
            out.register_hook(mask)
    for index, layer in enumerate(reference.mlp):
        if isinstance(layer, MePropLinear):
            layer.k, layer.kept = 0, layer_k[index]
            layer.register_forward_hook(mask_output_gradient)
    assert [model.mlp[i].k for i in (0, 2, 4)] == list(layer_k.values())
    x, y = torch.randint(0, 100, (64, 48)), torch.randint(0, 12, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for (name, ours), expected in zip(model.named_parameters(), reference.parameters()):
        grad = ours.grad.to_dense() if ours.grad.is_sparse else ours.grad
        torch.testing.assert_close(grad, expected.grad, msg=name)


def test_cube_activation_is_the_parsers_with_chen_and_mannings_init():
    import torch

    from mnist_meprop.config import load_config
    from mnist_meprop.errors import ConfigError
    from mnist_meprop.parsing_model import Cube, Parser

    model = Parser(100, 12, 16, 3, k=3, activation="cube")
    assert sum(isinstance(m, Cube) for m in model.mlp) == 2
    assert float(model.embed.weight.detach().abs().max()) <= 0.01 and float(model.mlp[0].weight.detach().abs().max()) <= 0.01
    assert torch.equal(Cube()(torch.tensor([-2.0, 3.0])), torch.tensor([-8.0, 27.0]))
    with pytest.raises(ConfigError, match="activation: cube is for the parser"):
        load_config(None, ["activation=cube"])
    assert load_config(None, ["task=parsing", "dataset=ewt", "activation=cube"]).activation == "cube"


def test_output_k_is_validated_and_names_the_method():
    from mnist_meprop.config import load_config
    from mnist_meprop.errors import ConfigError
    from mnist_meprop.train import method_name

    parsing = ["task=parsing", "dataset=ewt", "k=20"]
    assert method_name(load_config(None, parsing)) == "meProp per-example top-k"  # the paper: output k = k
    assert method_name(load_config(None, [*parsing, "output_k=20"])) == "meProp per-example top-k"
    assert method_name(load_config(None, [*parsing, "output_k=0"])) == "meProp per-example top-k, output layer dense"
    assert method_name(load_config(None, [*parsing, "k=0", "output_k=20"])) == "dense, output layer k=20"
    assert method_name(load_config(None, ["output_k=5"])) == "meProp per-example top-k, output layer k=5"
    assert load_config(None, ["output_k=5"]).engine == "autograd"  # the fused engine's output layer is dense
    with pytest.raises(ConfigError, match="output_k: .*task pos"):
        load_config(None, ["task=pos", "dataset=ewt", "output_k=5"])
    with pytest.raises(ConfigError, match="output_k: must be >= 0"):
        load_config(None, ["output_k=-1"])
    with pytest.raises(ConfigError, match="engine: fused does not support output_k"):
        load_config(None, ["output_k=5", "engine=fused"])


def test_parsing_bench_times_every_model_against_stock_with_its_bound():
    from mnist_meprop.bench import MachineRates, layers_bound
    from mnist_meprop.bench_parsing import parser_flop_limit, parser_layers, parsing_markdown, run_parsing_bench

    records, rates = run_parsing_bench(k=4, minibatch=64, d_hidden=32, rounds=3, steps=1, warmup=1)
    assert [(r.model, r.k) for r in records] == [("stock", 0), ("ours_k0", 0), ("meprop", 4)]
    stock, ours, meprop = records
    assert stock.step_speedup is None and ours.bound_speedup is None
    assert meprop.linear_backward_speedup > 0 and meprop.linear_backward_speedup_vs_ours_k0 > 0
    assert len(meprop.touched_rows) == 3 and all(0 < rows <= 64 * 4 for rows in meprop.touched_rows)
    # the FLOP limit: (2400*32 + 32*32 + 32*73) / (2400*4 + 32*4 + 32*4), dx on every layer
    assert meprop.flop_limit == round((2400 * 32 + 32 * 32 + 32 * 73) / (2400 * 4 + 32 * 4 + 32 * 4), 1)
    assert parser_flop_limit(500, 20) == pytest.approx((2400 * 500 + 500 * 500 + 500 * 73) / (2400 * 20 + 500 * 20 * 2))
    # with unlimited bandwidth only FLOPs bind, and the bound is the FLOP limit
    flops_only = layers_bound(parser_layers(32), 64, 4, False, None, MachineRates(1e9, float("inf")),
                              activations_in_memory=True)
    assert flops_only.binding == "flops" and flops_only.speedup == pytest.approx(parser_flop_limit(32, 4))
    assert "linear bwd vs ours_k0" in parsing_markdown(records) and rates.gemm_flops > 0


def test_mesimp_prunes_the_parsers_hidden_units_and_not_the_taggers(tmp_path):
    import json

    from click.testing import CliRunner
    from test_pos import write_tiny_ewt

    from mnist_meprop.cli import main
    from mnist_meprop.config import validate
    from mnist_meprop.errors import ConfigError

    write_tiny_ewt(tmp_path)
    args = ["train", "--set", "task=parsing", "--set", "dataset=ewt", "--set", f"data_dir={tmp_path}", "--set",
            "d_hidden=64", "--set", "k=8", "--set", "d_minibatch=16", "--set", "n_epoch=2", "--set", "lr=0.01",
            "--set", "simplify.enabled=true", "--set", "simplify.cycle_epochs=1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    units = record["simplify"]["units_final"]
    assert len(units) == 2 and all(0 < u < 64 for u in units)  # both hidden layers shrank; the output layer is not pruned
    export = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "out"), "--out", str(tmp_path / "m.pt")])
    assert export.exit_code == 2 and "export writes the MNIST MLP" in export.output and "Traceback" not in export.output
    with pytest.raises(ConfigError, match="not the LSTM of task pos"):
        validate({"task": "pos", "dataset": "ewt", "k": 5, "simplify": {"enabled": True}})
