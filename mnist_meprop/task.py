"""What a task gives the training harness: its data, model, loss and evaluation metric.

The harness (:func:`mnist_meprop.train.train_run`) owns everything else: the loop, the timers,
the evaluation schedule, the choice of the best model and the checkpoints. A task (MNIST, POS
tagging, parsing) is one :class:`Task`, not a second training loop; ``config.task`` names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, output_layer_k
from .conllu import Sentence, load_ewt
from .data import iterate_minibatches, load_data
from .model import build_model
from .parsing_data import ParsingVocabulary, evaluate_parser, oracle_examples
from .parsing_model import Parser
from .pos_data import NO_TAG, TaggedSentences, Vocabulary
from .pos_model import PosTagger

EVAL_BATCH = 2000
Batch = tuple[Any, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """A task as the harness sees it.

    ``load_data(config)`` returns the task's data (with ``to(device)``, ``sizes()`` and ``source``);
    ``n_train(data)`` counts training examples; ``batches(data, size, generator)`` yields the
    epoch's ``(inputs, targets)`` minibatches in the generator's order; ``build_model(config,
    data)`` returns the model (the harness seeds torch before calling it); ``loss(output, targets,
    reduction)`` is the training loss (``mean`` or ``sum`` over the minibatch's predictions);
    ``count(targets)`` is how many predictions a minibatch holds and ``count_correct(output,
    targets)`` how many are right; ``evaluate(model, data, split)`` returns the mean loss and the
    metric (``metric`` names it, in %) on ``dev`` or ``test``; ``model_info(data)`` is what the
    saved best model needs besides its config to be rebuilt.
    """

    name: str
    metric: str
    load_data: Callable[[Config], Any]
    n_train: Callable[[Any], int]
    batches: Callable[[Any, int, torch.Generator], Iterator[Batch]]
    build_model: Callable[[Config, Any], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    count: Callable[[torch.Tensor], int]
    count_correct: Callable[[torch.Tensor, torch.Tensor], int]
    evaluate: Callable[[nn.Module, Any, str], tuple[float, float]]
    model_info: Callable[[Any], dict[str, Any]]


# Tasks whose examples are rows of train_x / train_y tensors (MNIST, parsing) share these.
def _n_examples(data: Any) -> int:
    return len(data.train_y)


def _example_batches(data: Any, size: int, generator: torch.Generator) -> Iterator[Batch]:
    return iterate_minibatches(data.train_x, data.train_y, size, generator)


def _cross_entropy(scores: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(scores, target, reduction=reduction)


def _count_correct(logits: torch.Tensor, target: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == target).sum())


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` on ``x, y``, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += _count_correct(logits, target)
    return loss_sum / len(x), 100.0 * correct / len(x)


MNIST = Task(
    name="mnist",
    metric="accuracy",
    load_data=load_data,
    n_train=_n_examples,
    batches=_example_batches,
    build_model=lambda config, data: build_model(config, data.n_features, data.n_classes),
    loss=_cross_entropy,
    count=len,
    count_correct=_count_correct,
    evaluate=lambda model, data, split: evaluate_classifier(model, getattr(data, f"{split}_x"),
                                                            getattr(data, f"{split}_y")),
    model_info=lambda data: {"n_features": data.n_features, "n_classes": data.n_classes},
)


@dataclass(frozen=True)
class PosData:
    """EWT's train / dev / test sentences encoded with the training set's vocabulary."""

    train: TaggedSentences
    dev: TaggedSentences
    test: TaggedSentences
    vocabulary: Vocabulary
    source: str

    def to(self, device: torch.device) -> PosData:
        return PosData(self.train.to(device), self.dev.to(device), self.test.to(device), self.vocabulary,
                       self.source)

    def sizes(self) -> dict[str, int]:
        """Sentences per split (the tokens are in ``source``)."""
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def _ewt_splits(config: Config) -> tuple[list[Sentence], list[Sentence], list[Sentence], str]:
    """UD English-EWT's train, dev and test sentences (see :mod:`mnist_meprop.conllu`), the first
    ``train_limit`` of train and ``test_limit`` of dev and test when set (for quick runs), and
    where they came from."""
    sentences, source = load_ewt(config.data_dir)
    return (sentences["train"][:config.train_limit], sentences["dev"][:config.test_limit],
            sentences["test"][:config.test_limit], source)


def load_pos_data(config: Config) -> PosData:
    """EWT's sentences (:func:`_ewt_splits`) encoded with the training set's vocabulary."""
    train, dev, test, source = _ewt_splits(config)
    vocabulary = Vocabulary.build(train)
    splits = [TaggedSentences.encode(part, vocabulary) for part in (train, dev, test)]
    tokens = ", ".join(f"{split.tokens:,}" for split in splits)
    return PosData(*splits, vocabulary, f"{source}: {tokens} tokens, {len(vocabulary.tags)} tags")


def _pos_batches(data: PosData, size: int, generator: torch.Generator) -> Iterator[Batch]:
    order = torch.randperm(len(data.train), generator=generator).tolist()
    for inputs, tags in data.train.batches(order, size):
        yield inputs, tags.reshape(-1)


def _build_tagger(config: Config, data: PosData) -> PosTagger:
    n_words, feature_sizes, n_tags = data.vocabulary.sizes()
    return PosTagger(n_words, feature_sizes, n_tags, config.d_hidden, config.k, config.unified, config.selection,
                     config.dropout, config.bias_grad)


def _count_correct_tags(scores: torch.Tensor, tags: torch.Tensor) -> int:
    return int(((scores.argmax(dim=1) == tags) & (tags != NO_TAG)).sum())


@torch.no_grad()
def evaluate_tagger(model: nn.Module, data: PosData, split: str) -> tuple[float, float]:
    """Mean cross-entropy per scored token and per-token accuracy (%) on ``split``, in eval mode:
    every token counts, a tag the training set does not have as an error."""
    model.eval()
    sentences: TaggedSentences = getattr(data, split)
    loss_sum, scored, correct = 0.0, 0, 0
    for inputs, tags in sentences.batches(range(len(sentences)), 64):
        scores, tags = model(inputs), tags.reshape(-1)
        loss_sum += F.cross_entropy(scores, tags, ignore_index=NO_TAG, reduction="sum").item()
        scored += int((tags != NO_TAG).sum())
        correct += _count_correct_tags(scores, tags)
    return loss_sum / max(scored, 1), 100.0 * correct / sentences.tokens


POS = Task(
    name="pos",
    metric="accuracy",
    load_data=load_pos_data,
    n_train=lambda data: len(data.train),
    batches=_pos_batches,
    build_model=_build_tagger,
    loss=lambda scores, tags, reduction: F.cross_entropy(scores, tags, ignore_index=NO_TAG, reduction=reduction),
    count=lambda tags: int((tags != NO_TAG).sum()),
    count_correct=_count_correct_tags,
    evaluate=evaluate_tagger,
    model_info=lambda data: {"vocabulary": dataclasses.asdict(data.vocabulary)},  # plain data: loads weights_only
)


@dataclass(frozen=True)
class ParsingData:
    """The oracle's training (and dev) examples, the dev and test sentences to parse, the vocabulary."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    dev_x: torch.Tensor
    dev_y: torch.Tensor
    dev_sentences: tuple[Sentence, ...]
    test_sentences: tuple[Sentence, ...]
    vocabulary: ParsingVocabulary
    source: str

    def to(self, device: torch.device) -> ParsingData:
        return dataclasses.replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                                   dev_x=self.dev_x.to(device), dev_y=self.dev_y.to(device))

    def sizes(self) -> dict[str, int]:
        """Training examples (transitions); dev and test sentences."""
        return {"train": len(self.train_y), "dev": len(self.dev_sentences), "test": len(self.test_sentences)}


def load_parsing_data(config: Config) -> ParsingData:
    """UD English-EWT: the oracle's examples of every projective training sentence (the others are
    left out, and counted in ``source``); every dev and test sentence is parsed. ``train_limit`` /
    ``test_limit`` keep the first sentences of train / of dev and test."""
    train, dev, test, source = _ewt_splits(config)
    vocabulary = ParsingVocabulary.build(train)
    train_x, train_y, left_out = oracle_examples(train, vocabulary)
    dev_x, dev_y, _ = oracle_examples(dev, vocabulary)
    return ParsingData(train_x, train_y, dev_x, dev_y, tuple(dev), tuple(test), vocabulary,
                       f"{source}: {len(train) - left_out:,} of {len(train):,} train sentences ({left_out} "
                       f"non-projective left out), {len(train_y):,} transition examples, "
                       f"{len(vocabulary.transitions)} transitions")


@torch.no_grad()
def _evaluate_parser(model: nn.Module, data: ParsingData, split: str) -> tuple[float, float]:
    """Dev: the mean cross-entropy on the dev oracle's examples and UAS; test: UAS (loss not computed)."""
    loss = float("nan")
    if split == "dev" and len(data.dev_y):
        loss, _ = evaluate_classifier(model, data.dev_x, data.dev_y)
    uas, _ = evaluate_parser(model, data.dev_sentences if split == "dev" else data.test_sentences, data.vocabulary)
    return loss, uas


PARSING = Task(
    name="parsing",
    metric="UAS",
    load_data=load_parsing_data,
    n_train=_n_examples,
    batches=_example_batches,
    build_model=lambda config, data: Parser(data.vocabulary.n_embeddings, len(data.vocabulary.transitions),
                                            config.d_hidden, config.n_layer, config.k, config.unified,
                                            config.selection, config.dropout, config.bias_grad, config.init,
                                            config.activation, output_layer_k(config)),
    loss=_cross_entropy,
    count=len,
    count_correct=_count_correct,
    evaluate=_evaluate_parser,
    model_info=lambda data: {"vocabulary": dataclasses.asdict(data.vocabulary)},  # plain data: loads weights_only
)

TASKS = {task.name: task for task in (MNIST, POS, PARSING)}


def task_for(config: Config) -> Task:
    """The task ``config.task`` names."""
    return TASKS[config.task]


def score_label(task_name: str) -> str:
    """What a score line calls the task's metric before its percentage: nothing for accuracy, else its name
    and a space (``UAS 80.47%``)."""
    metric = TASKS[task_name].metric
    return "" if metric == "accuracy" else f"{metric} "
