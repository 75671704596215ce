"""POS-tagging data: words, their 7 features and their gold XPOS tags as tensors, per sentence.

The paper's tagger reads, per word, a 50-dimensional word embedding and 7 features of 20
dimensions each (190 inputs). Its 7 features are not listed; ours are the usual spelling cues
of an English tagger:

1. ``shape``: capitalisation (lower, Capitalised, UPPER, mIxed, no letters);
2. ``digits``: none, all digits, some digits;
3. ``hyphen``: whether the word contains ``-``;
4. ``prefix2``: the first two letters, lowercased;
5-7. ``suffix1``, ``suffix2``, ``suffix3``: the last one, two and three letters, lowercased.

Words are lowercased with every digit written ``0``. Vocabularies come from the training
sentences: a word (or feature value) seen fewer than ``min_count`` times there is unknown
(index 0), so the unknown embedding is trained on rare words and used for unseen ones. Tags
are the XPOS tags of the training set; a dev or test tag never seen in training (none in EWT
r2.16) is scored as an error and left out of the loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .conllu import Sentence

FEATURES = ("shape", "digits", "hyphen", "prefix2", "suffix1", "suffix2", "suffix3")
UNKNOWN = 0
NO_TAG = -100  # cross-entropy's ignore_index: a tag the training set does not have


def word_key(word: str) -> str:
    """The word as the vocabulary knows it: lowercased, digits as 0."""
    return "".join("0" if ch.isdigit() else ch for ch in word.lower())


def word_features(word: str) -> tuple[str, ...]:
    """The 7 feature values of ``word`` (see the module docstring)."""
    letters = [ch for ch in word if ch.isalpha()]
    if not letters:
        shape = "none"
    elif all(ch.islower() for ch in letters):
        shape = "lower"
    elif all(ch.isupper() for ch in letters):
        shape = "upper"
    elif letters[0].isupper() and all(ch.islower() for ch in letters[1:]):
        shape = "capitalised"
    else:
        shape = "mixed"
    digits = sum(ch.isdigit() for ch in word)
    lower = word.lower()
    return (shape, "all" if digits == len(word) else ("some" if digits else "none"), str("-" in word),
            lower[:2], lower[-1:], lower[-2:], lower[-3:])


def _index(counts: Counter, min_count: int) -> dict[str, int]:
    """Values seen at least ``min_count`` times, numbered from 1 (0 is unknown), most frequent first."""
    kept = sorted((value for value, count in counts.items() if count >= min_count), key=lambda v: (-counts[v], v))
    return {value: number for number, value in enumerate(kept, start=1)}


@dataclass(frozen=True)
class Vocabulary:
    """Word, feature-value and tag numbering, from the training sentences."""

    words: dict[str, int]
    features: tuple[dict[str, int], ...]
    tags: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Sequence[Sentence], min_count: int = 2) -> Vocabulary:
        words = Counter(word_key(word) for sentence in sentences for word in sentence.words)
        features = [Counter() for _ in FEATURES]
        for sentence in sentences:
            for word in sentence.words:
                for counter, value in zip(features, word_features(word)):
                    counter[value] += 1
        tags = sorted({tag for sentence in sentences for tag in sentence.xpos})
        return cls(_index(words, min_count), tuple(_index(c, min_count) for c in features), tuple(tags))

    def sizes(self) -> tuple[int, tuple[int, ...], int]:
        """Embedding rows for words and each feature (unknown included), and the number of tags."""
        return len(self.words) + 1, tuple(len(f) + 1 for f in self.features), len(self.tags)

    def encode(self, sentence: Sentence) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs [L, 8]`` (word index, then the 7 feature indices) and ``tags [L]``."""
        tag_index = {tag: number for number, tag in enumerate(self.tags)}
        rows = [[self.words.get(word_key(word), UNKNOWN),
                 *(table.get(value, UNKNOWN) for table, value in zip(self.features, word_features(word)))]
                for word in sentence.words]
        tags = [tag_index.get(tag, NO_TAG) for tag in sentence.xpos]
        return torch.tensor(rows, dtype=torch.int64), torch.tensor(tags, dtype=torch.int64)


@dataclass(frozen=True)
class TaggedSentences:
    """One split: per sentence, ``inputs [L, 8]`` and ``tags [L]``."""

    inputs: tuple[torch.Tensor, ...]
    tags: tuple[torch.Tensor, ...]

    @classmethod
    def encode(cls, sentences: Sequence[Sentence], vocabulary: Vocabulary) -> TaggedSentences:
        pairs = [vocabulary.encode(sentence) for sentence in sentences]
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def tokens(self) -> int:
        return sum(len(tags) for tags in self.tags)

    def to(self, device: torch.device) -> TaggedSentences:
        return TaggedSentences(tuple(t.to(device) for t in self.inputs), tuple(t.to(device) for t in self.tags))

    def batches(self, order: Sequence[int], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches of ``size`` sentences in ``order``: ``inputs [B, L, 8]`` and ``tags [B, L]``,
        padded to the longest sentence (padding: unknown inputs, tag ``NO_TAG``)."""
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            inputs = torch.nn.utils.rnn.pad_sequence([self.inputs[i] for i in chosen], batch_first=True)
            tags = torch.nn.utils.rnn.pad_sequence([self.tags[i] for i in chosen], batch_first=True,
                                                   padding_value=NO_TAG)
            yield inputs, tags
