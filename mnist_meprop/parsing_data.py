"""Parsing data: vocabularies, the oracle's (48 features, gold transition) training examples, and
batched greedy parsing of whole splits for UAS / LAS.

POS tags for the features are the gold XPOS of the treebank (no tagger in the loop), as in the
usual Chen & Manning setup with gold tags. Words are lowercased with digits as 0; a word seen once
in train is unknown (index 1), so its embedding is trained. Index 0 of each vocabulary is
``<null>`` (no token), and words and tags have ``<root>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .conllu import Sentence
from .parsing import (NULL, ROOT_TOKEN, SHIFT, Configuration, attachment_scores, base_relation, features, oracle,
                      transitions)
from .pos_data import word_key

UNKNOWN = "<unknown>"


@dataclass(frozen=True)
class ParsingVocabulary:
    words: dict[str, int]
    tags: dict[str, int]
    labels: dict[str, int]
    transitions: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Sequence[Sentence], min_count: int = 2) -> ParsingVocabulary:
        counts = Counter(word_key(word) for s in sentences for word in s.words)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        words = {name: i for i, name in enumerate([NULL, UNKNOWN, ROOT_TOKEN, *kept])}
        tags = {name: i for i, name in enumerate([NULL, UNKNOWN, ROOT_TOKEN,
                                                  *sorted({t for s in sentences for t in s.xpos})])}
        relations = sorted({base_relation(r) for s in sentences for r in s.relations})
        labels = {name: i for i, name in enumerate([NULL, UNKNOWN, *relations])}
        return cls(words, tags, labels, tuple(transitions(relations)))

    def word_id(self, word: str) -> int:
        return self.words.get(word if word in (NULL, ROOT_TOKEN) else word_key(word), 1)

    def tag_id(self, tag: str) -> int:
        return self.tags.get(tag, 1)

    def label_id(self, label: str) -> int:
        return self.labels.get(label, 1)

    def features(self, config: Configuration, sentence: Sentence) -> list[int]:
        """The 48 indices, offset so that one embedding table holds words, then tags, then labels."""
        values = features(config, sentence, self.word_id, self.tag_id, self.label_id)
        tag_offset, label_offset = len(self.words), len(self.words) + len(self.tags)
        return values[:18] + [v + tag_offset for v in values[18:36]] + [v + label_offset for v in values[36:]]

    @property
    def n_embeddings(self) -> int:
        return len(self.words) + len(self.tags) + len(self.labels)


def oracle_examples(sentences: Sequence[Sentence], vocabulary: ParsingVocabulary
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features ``[M, 48]`` and gold transition indices ``[M]`` of every projective sentence, and how
    many sentences were left out as non-projective (or with a transition the vocabulary lacks)."""
    index = {name: i for i, name in enumerate(vocabulary.transitions)}
    rows: list[list[int]] = []
    targets: list[int] = []
    left_out = 0
    for sentence in sentences:
        found: list[tuple[list[int], str]] = []
        sequence = oracle(sentence, lambda config, transition: found.append(
            (vocabulary.features(config, sentence), transition)))
        if sequence is None or any(t not in index for _, t in found):
            left_out += 1
            continue
        rows += [f for f, _ in found]
        targets += [index[t] for _, t in found]
    return (torch.tensor(rows, dtype=torch.int64).reshape(-1, 48), torch.tensor(targets, dtype=torch.int64),
            left_out)


@torch.no_grad()
def parse_all(model: torch.nn.Module, sentences: Sequence[Sentence], vocabulary: ParsingVocabulary,
              batch: int = 4096) -> list[Configuration]:
    """Greedy parses of every sentence, stepping all of them together: one model call scores the
    current configuration of every unfinished sentence; each takes its best legal transition."""
    configs = [Configuration(len(s.words)) for s in sentences]
    names = vocabulary.transitions
    # legality depends only on a transition's kind (shift, left arc, right arc): one mask per kind
    kinds = {kind: torch.tensor([name.split("|")[0] == kind for name in names]) for kind in (SHIFT, "L", "R")}
    legal_masks: dict[tuple[bool, ...], torch.Tensor] = {}
    while True:
        active = [i for i, c in enumerate(configs) if not c.terminal]
        if not active:
            return configs
        for start in range(0, len(active), batch):
            chunk = active[start:start + batch]
            inputs = torch.tensor([vocabulary.features(configs[i], sentences[i]) for i in chunk], dtype=torch.int64)
            scores = model(inputs)
            for row, i in enumerate(chunk):
                config = configs[i]
                allowed = tuple(config.legal(kind if kind == SHIFT else f"{kind}|") for kind in kinds)
                if allowed not in legal_masks:
                    legal_masks[allowed] = torch.stack([mask for mask, ok in zip(kinds.values(), allowed) if ok]
                                                       ).any(dim=0)
                choice = int(scores[row].masked_fill(~legal_masks[allowed], float("-inf")).argmax())
                config.apply(names[choice])


def evaluate_parser(model: torch.nn.Module, sentences: Sequence[Sentence], vocabulary: ParsingVocabulary
                    ) -> tuple[float, float]:
    """UAS and LAS (%) of greedy parsing, punctuation excluded."""
    model.eval()
    return attachment_scores(sentences, parse_all(model, sentences, vocabulary))
