"""Transition-based dependency parsing after Chen & Manning (2014): the arc-standard system, its
static oracle, the 48 features of a configuration, greedy parsing and attachment scores.

Words are numbered 1..n as in CoNLL-U; 0 is the root. A configuration holds a stack (the root at
its bottom), a buffer and the arcs found so far. Transitions: ``SHIFT``; ``LEFT-ARC(l)`` makes the
stack's top the head of the word below it; ``RIGHT-ARC(l)`` makes the word below the head of the
top. Labels are the base UD relations (``nmod:poss`` counts as ``nmod``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .conllu import Sentence

SHIFT = "SHIFT"
NULL, ROOT_TOKEN = "<null>", "<root>"
N_WORD_FEATURES, N_TAG_FEATURES, N_LABEL_FEATURES = 18, 18, 12
PUNCTUATION_UPOS = "PUNCT"


def base_relation(relation: str) -> str:
    """``nmod:poss`` -> ``nmod``: the relation without its subtype."""
    return relation.split(":", 1)[0]


def is_projective(heads: Sequence[int]) -> bool:
    """Whether no two arcs cross (heads[i - 1] is the head of word i, 0 the root)."""
    arcs = [(min(d, h), max(d, h)) for d, h in enumerate(heads, start=1)]
    for left, right in arcs:
        for other_left, other_right in arcs:
            if left < other_left < right < other_right:
                return False
    return True


@dataclass
class Configuration:
    """Stack, buffer and the arcs found so far for a sentence of ``n`` words."""

    n: int
    stack: list[int] = field(default_factory=lambda: [0])
    buffer_start: int = 1
    heads: list[int] = field(default_factory=list)  # heads[i] of word i (index 0: the root, unused); -1: none yet
    labels: list[str] = field(default_factory=list)
    left_children: list[list[int]] = field(default_factory=list)  # sorted left to right
    right_children: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.heads = [-1] * (self.n + 1)
        self.labels = [NULL] * (self.n + 1)
        self.left_children = [[] for _ in range(self.n + 1)]
        self.right_children = [[] for _ in range(self.n + 1)]

    @property
    def terminal(self) -> bool:
        return self.buffer_start > self.n and self.stack == [0]

    def buffer(self, i: int) -> int:
        """The i-th word of the buffer (0-based), or -1."""
        word = self.buffer_start + i
        return word if word <= self.n else -1

    def stack_word(self, i: int) -> int:
        """The i-th word from the top of the stack (0-based), or -1."""
        return self.stack[-1 - i] if i < len(self.stack) else -1

    def legal(self, transition: str) -> bool:
        if transition == SHIFT:
            return self.buffer_start <= self.n
        if transition.startswith("L"):
            return len(self.stack) > 2  # the root never gets a head
        return len(self.stack) > 2 or (len(self.stack) == 2 and self.buffer_start > self.n)

    def apply(self, transition: str) -> None:
        if transition == SHIFT:
            self.stack.append(self.buffer_start)
            self.buffer_start += 1
            return
        kind, label = transition.split("|", 1)
        top, below = self.stack[-1], self.stack[-2]
        head, dependent = (top, below) if kind == "L" else (below, top)
        self.heads[dependent], self.labels[dependent] = head, label
        children = self.left_children[head] if dependent < head else self.right_children[head]
        children.append(dependent)
        children.sort()
        self.stack.pop(-2 if kind == "L" else -1)

    def left_child(self, word: int, i: int) -> int:
        """The i-th leftmost child (1-based) of ``word``, or -1."""
        children = self.left_children[word] if word >= 0 else []
        return children[i - 1] if len(children) >= i else -1

    def right_child(self, word: int, i: int) -> int:
        """The i-th rightmost child (1-based) of ``word``, or -1."""
        children = self.right_children[word] if word >= 0 else []
        return children[-i] if len(children) >= i else -1


def transitions(labels: Sequence[str]) -> list[str]:
    """Every transition of a label set: ``SHIFT``, then ``L|label`` and ``R|label`` per label (sorted)."""
    return [SHIFT] + [f"{kind}|{label}" for label in sorted(labels) for kind in ("L", "R")]


def oracle(sentence: Sentence, visit: Callable[[Configuration, str], None] | None = None) -> list[str] | None:
    """The static arc-standard oracle: the transitions that build the gold tree, or None if the tree is
    not projective (the oracle cannot build it). ``visit(configuration, transition)`` is called
    before each transition is applied (e.g. to extract the training example's features)."""
    heads = sentence.heads
    if not is_projective(heads):
        return None
    n = len(heads)
    pending = [0] * (n + 1)  # children not yet attached
    for head in heads:
        pending[head] += 1
    config = Configuration(n)
    sequence: list[str] = []
    while not config.terminal:
        top, below = config.stack_word(0), config.stack_word(1)
        if below > 0 and heads[below - 1] == top:
            transition = f"L|{base_relation(sentence.relations[below - 1])}"
        elif below >= 0 and top > 0 and heads[top - 1] == below and pending[top] == 0:
            transition = f"R|{base_relation(sentence.relations[top - 1])}"
        else:
            transition = SHIFT
        if not config.legal(transition):
            return None  # e.g. a second word attached to the root
        if visit is not None:
            visit(config, transition)
        if transition != SHIFT:
            dependent = below if transition.startswith("L") else top
            pending[heads[dependent - 1]] -= 1
        config.apply(transition)
        sequence.append(transition)
    return sequence


def feature_tokens(config: Configuration) -> tuple[list[int], list[int]]:
    """Chen & Manning's 18 token positions (-1: none; 0: the root) and the 12 of them whose arc label
    is a feature: s1..s3, b1..b3; lc1, rc1, lc2, rc2 of s1 and s2; lc1(lc1) and rc1(rc1) of s1 and s2."""
    tokens = [config.stack_word(0), config.stack_word(1), config.stack_word(2),
              config.buffer(0), config.buffer(1), config.buffer(2)]
    children = []
    for word in (config.stack_word(0), config.stack_word(1)):
        lc1, rc1 = config.left_child(word, 1), config.right_child(word, 1)
        children += [lc1, rc1, config.left_child(word, 2), config.right_child(word, 2),
                     config.left_child(lc1, 1), config.right_child(rc1, 1)]
    return tokens + children, children


def features(config: Configuration, sentence: Sentence, word_ids: Callable[[str], int],
             tag_ids: Callable[[str], int], label_ids: Callable[[str], int]) -> list[int]:
    """The 48 feature indices of ``config``: 18 words, their 18 POS tags (gold XPOS) and the arc
    labels of the 12 children, through the given vocabularies (``<null>`` for a missing token,
    ``<root>`` for the root)."""
    tokens, children = feature_tokens(config)

    def word(t: int) -> str:
        return NULL if t < 0 else (ROOT_TOKEN if t == 0 else sentence.words[t - 1])

    def tag(t: int) -> str:
        return NULL if t < 0 else (ROOT_TOKEN if t == 0 else sentence.xpos[t - 1])
    return ([word_ids(word(t)) for t in tokens] + [tag_ids(tag(t)) for t in tokens]
            + [label_ids(NULL if t < 0 else config.labels[t]) for t in children])


def parse(sentence: Sentence, score: Callable[[Configuration], Sequence[float]],
          transition_names: Sequence[str]) -> Configuration:
    """Greedy parsing: at each step the highest-scoring legal transition (``score`` gives one value
    per name in ``transition_names``). Returns the terminal configuration (its heads and labels)."""
    config = Configuration(len(sentence.words))
    while not config.terminal:
        scores = score(config)
        best = max((i for i, name in enumerate(transition_names) if config.legal(name)), key=lambda i: scores[i])
        config.apply(transition_names[best])
    return config


def attachment_scores(gold: Sequence[Sentence], predicted: Sequence[Configuration]) -> tuple[float, float]:
    """UAS and LAS (%) over every word that is not punctuation (UPOS ``PUNCT``); labels compared as
    base relations."""
    scored = heads_right = labels_right = 0
    for sentence, config in zip(gold, predicted):
        for word, (head, relation, upos) in enumerate(zip(sentence.heads, sentence.relations, sentence.upos), 1):
            if upos == PUNCTUATION_UPOS:
                continue
            scored += 1
            if config.heads[word] == head:
                heads_right += 1
                labels_right += config.labels[word] == base_relation(relation)
    return 100.0 * heads_right / max(scored, 1), 100.0 * labels_right / max(scored, 1)
