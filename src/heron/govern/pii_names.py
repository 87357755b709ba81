"""Person names, offline: a token classifier Heron trains on its own synthetic corpus.

How names are recognised, and why this way. Presidio finds names with a
spaCy or transformer NER model; the spaCy English models are not on the
package registry and the transformer ones download their weights from a hub
at run time, so neither can be had here. A pure gazetteer (a list of known
names) misses every name not on the list and flags listed names used as
words. So Heron learns a recogniser: a logistic regression over each
token's features (the lowercased word, its prefix and suffixes, its shape
"Xxxx"/"x"/"X.", whether it is a common English word, whether it starts a
sentence, and the same for the two tokens either side: "Dr.", "Dear",
"my name is", ", MD" and "@" are strong cues) gives p(token is part of a
name). A name is a run of tokens on one line that are all at least
`extend` (0.2) with one at least `threshold` (0.5): hysteresis, so a
surname the model is unsure of joins the first name it is sure of; the run
is trimmed of punctuation and common words at either end, then held to
title case (`NameModel._title_case`): the model learns its contexts from a
few dozen templates, and outside them it can be sure of "John" in "Call
John Smith at ..." and not of "Smith".

It is trained on `pii_corpus` examples built from `train`-split names and
distractors and three quarters of the templates (`pii_lexicon`,
`pii_corpus`), with the token's own word hidden for half the tokens (word
dropout), so that it leans on shape and context, which carry over to names
it has never seen. Its settings were chosen on `dev`-split names; its recall
is measured on `test`-split names (benchmarks/bench_pii.py). Adding the
training names as a gazetteer feature was tried and dropped: it lowered
recall on unseen names (the model learned "not on the list, not a name").

Training takes a few seconds on one core (about 39k tokens, four epochs of
AdaGrad in numpy) and happens once per process, on first use; the result is
deterministic for a seed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from presidio_analyzer import EntityRecognizer, RecognizerResult

from heron.govern.pii_lexicon import common_words

TOKEN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
SENTENCE_END = frozenset(".!?:;|")


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int
    starts_line: bool  # first token of a line (a name never runs across lines)
    starts_sentence: bool  # first of a line, or after sentence-ending punctuation


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    for m in TOKEN.finditer(text):
        prev = tokens[-1] if tokens else None
        starts_line = prev is None or "\n" in text[prev.end:m.start()]
        tokens.append(Token(m.group(), m.start(), m.end(), starts_line, starts_line or prev.text in SENTENCE_END))
    return tokens


@lru_cache(maxsize=65536)
def shape(word: str) -> str:
    """Character classes with runs collapsed: "McGregor" -> "XxXx", "J" -> "X", "42nd" -> "dx"."""
    classes = ("X" if c.isupper() else "x" if c.isalpha() else "d" if c.isdigit() else c for c in word)
    return re.sub(r"(.)\1+", r"\1", "".join(classes))


def features(tokens: Sequence[Token], common: frozenset[str], hidden: Sequence[bool] = ()) -> list[list[str]]:
    """Each token's features: its own word, affixes and shape, and the same for the two tokens
    either side. hidden[i] hides token i's own word (word dropout, in training)."""
    lows = [t.text.lower() for t in tokens]
    shapes = [shape(t.text) for t in tokens]
    commons = [w in common or (w.endswith("s") and w[:-1] in common) for w in lows]  # plurals too
    as_neighbour = [(f":w={w}", f":sh={sh}", f":c={c}") for w, sh, c in zip(lows, shapes, commons)]
    rows = []
    for i, (low, sh) in enumerate(zip(lows, shapes)):
        row = ["bias", f"sh={sh}", f"s2={low[-2:]}", f"s3={low[-3:]}", f"p2={low[:2]}", f"len={min(len(low), 10)}",
               f"common={commons[i]}", f"start={tokens[i].starts_sentence}|{sh}"]
        if not (hidden and hidden[i]):
            row.append(f"w={low}")
        for offset in (-2, -1, 1, 2):
            j = i + offset
            row += [f"{offset}{f}" for f in as_neighbour[j]] if 0 <= j < len(tokens) else [f"{offset}:none"]
        prev = lows[i - 1] if i else "<s>"
        nxt = lows[i + 1] if i + 1 < len(tokens) else "</s>"
        rows.append(row + [f"-1w|sh={prev}|{sh}", f"sh|+1w={sh}|{nxt}"])
    return rows


@dataclass(frozen=True)
class NameSettings:
    examples: int = 2000  # training examples from pii_corpus (split "train")
    seed: int = 0
    epochs: int = 4
    batch: int = 256
    lr: float = 0.3  # AdaGrad (Duchi et al. 2011)
    l2: float = 1e-6
    word_dropout: float = 0.5  # share of tokens whose own word is hidden in training
    threshold: float = 0.5  # a name has a token with p(name) at least this
    extend: float = 0.2  # ... and its other tokens at least this


class NameModel:
    """Logistic regression over sparse token features: p(token is part of a person's name)."""

    def __init__(self, vocab: dict[str, int], weights: np.ndarray, threshold: float = 0.5,
                 extend: float = 0.5) -> None:
        self.vocab, self.weights = vocab, weights  # weights: (F + 1,), the last the unknown features' 0
        self.threshold, self.extend = threshold, extend
        self.common = common_words()

    def token_probabilities(self, tokens: Sequence[Token]) -> np.ndarray:
        pad = len(self.weights) - 1
        rows = [[self.vocab.get(f, pad) for f in row] for row in features(tokens, self.common)]
        if not rows:
            return np.zeros(0)
        width = max(map(len, rows))
        index = np.array([r + [pad] * (width - len(r)) for r in rows])  # (T, width)
        return 1 / (1 + np.exp(-self.weights[index].sum(1)))  # (T,)

    def find(self, text: str) -> list[tuple[int, int, float]]:
        """(start, end, score) of each name, by hysteresis thresholding (as Canny's edge detector):
        a run of tokens on one line, each at or above `extend`, one at least at `threshold`;
        trimmed of punctuation and common words at either end, then held to title case
        (`_title_case`). Score: the mean probability of the tokens the model put in the name."""
        tokens = tokenize(text)
        p = self.token_probabilities(tokens)
        spans = []
        for run in self._runs(tokens, p):
            first, last = self._title_case(text, tokens, run)
            found = [i for i in run if first <= i <= last]
            spans.append((tokens[first].start, tokens[last].end, float(p[found].mean())))
        return spans

    def _runs(self, tokens: Sequence[Token], p: np.ndarray) -> Iterable[list[int]]:
        """The hysteresis runs of token indices, trimmed at both ends."""
        run: list[int] = []
        for i in range(len(tokens) + 1):
            if i < len(tokens) and p[i] >= self.extend and not (run and tokens[i].starts_line):
                run.append(i)
                continue
            while run and not self._can_edge(tokens[run[-1]]):
                run.pop()
            while run and not self._can_edge(tokens[run[0]]):
                run.pop(0)
            if run and p[run].max() >= self.threshold:
                yield run
            run = [i] if i < len(tokens) and p[i] >= self.extend else []

    def _title_case(self, text: str, tokens: Sequence[Token], run: list[int]) -> tuple[int, int]:
        """The run's first and last token once held to title case. A run with a title-case
        token sheds lowercase words at its ends ("met Sarah Williams" gives "Sarah
        Williams"), and takes in the title-case words written right beside it on the line
        ("John Smith" where the model was sure of John alone), but not a sentence's first
        word on its left ("Yesterday Paul" stays "Paul"). Names the model sees in lower
        case ("my name is ana lima") stay as found."""
        first, last = run[0], run[-1]
        if not any(_title(tokens[i].text) for i in run):
            return first, last
        while not _title(tokens[first].text):
            first += 1
        while not _title(tokens[last].text):
            last -= 1
        while last + 1 < len(tokens) and self._joins(text, tokens[last], tokens[last + 1]):
            last += 1
        while first > 0 and not tokens[first - 1].starts_sentence \
                and self._joins(text, tokens[first - 1], tokens[first]):
            first -= 1
        return first, last

    def _joins(self, text: str, left: Token, right: Token) -> bool:
        """Whether two neighbouring title-case words, apart only by spaces, may be one name
        (neither a common word)."""
        return (text[left.end:right.start].strip(" ") == "" and left.end < right.start
                and all(_title(t.text) and t.text.lower() not in self.common for t in (left, right)))

    def _can_edge(self, token: Token) -> bool:
        """Whether a name may start or end with this token: not punctuation, not a common word
        (the name lists leave those out; see pii_lexicon), so "Call Ana" gives "Ana"."""
        return token.text[0].isalnum() and token.text.lower() not in self.common


def _title(word: str) -> bool:
    """Whether a word is written in title case: a capital, then letters with a lower-case one
    among them ("Smith", "McGregor", "O'Neil", "Jean-Luc"; not "NASA", "J", "42nd")."""
    return word[0].isupper() and word.replace("'", "").replace("’", "").replace("-", "").isalpha() \
        and any(c.islower() for c in word[1:])


def labelled_tokens(text: str, names: Iterable[tuple[int, int]]) -> tuple[list[Token], np.ndarray]:
    """Tokens of `text` and their labels: 1 inside one of the (start, end) name spans."""
    tokens = tokenize(text)
    spans = list(names)
    labels = np.array([any(s <= t.start and t.end <= e for s, e in spans) for t in tokens], dtype=np.float64)
    return tokens, labels


def train_name_model(settings: NameSettings = NameSettings()) -> NameModel:
    """Fit the model on `settings.examples` training-split examples of pii_corpus."""
    from heron.govern.pii_corpus import generate

    rng = np.random.default_rng(settings.seed)
    common = common_words()
    vocab: dict[str, int] = {}
    rows: list[list[int]] = []
    labels: list[np.ndarray] = []
    for example in generate(settings.examples, seed=settings.seed, split="train"):
        tokens, y = labelled_tokens(example.text, [(s.start, s.end) for s in example.spans if s.entity == "PERSON"])
        hidden = (rng.random(len(tokens)) < settings.word_dropout).tolist()
        rows += [[vocab.setdefault(f, len(vocab)) for f in row] for row in features(tokens, common, hidden)]
        labels.append(y)
    pad = len(vocab)
    width = max(map(len, rows))
    x = np.array([r + [pad] * (width - len(r)) for r in rows])  # (N, width) feature ids
    y = np.concatenate(labels)  # (N,)
    return NameModel(vocab, _fit(x, y, pad, settings, rng), settings.threshold, settings.extend)


def _fit(x: np.ndarray, y: np.ndarray, pad: int, s: NameSettings, rng: np.random.Generator) -> np.ndarray:
    """Minibatch AdaGrad on the mean logistic loss; the pad feature's weight stays 0."""
    w = np.zeros(pad + 1)
    g2 = np.full(pad + 1, 1e-8)
    for _ in range(s.epochs):
        order = rng.permutation(len(y))
        for b in range(0, len(y), s.batch):
            idx = order[b:b + s.batch]
            xb = x[idx]  # (B, width)
            p = 1 / (1 + np.exp(-w[xb].sum(1)))  # (B,)
            grad = np.bincount(xb.ravel(), weights=np.repeat(p - y[idx], xb.shape[1]), minlength=pad + 1) / len(idx)
            touched = np.unique(xb)
            grad[touched] += s.l2 * w[touched]
            g2[touched] += grad[touched] ** 2
            w[touched] -= s.lr * grad[touched] / np.sqrt(g2[touched])
            w[pad] = 0.0
    return w


@lru_cache(maxsize=1)
def default_name_model() -> NameModel:
    """The model every default engine shares: NameSettings() defaults, trained once per process."""
    return train_name_model(NameSettings())


class NameRecognizer(EntityRecognizer):
    """A Presidio recogniser for PERSON backed by a NameModel."""

    def __init__(self, model: NameModel) -> None:
        self.model = model
        super().__init__(supported_entities=["PERSON"], name="HeronNameRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[RecognizerResult]:
        return [RecognizerResult("PERSON", start, end, score) for start, end, score in self.model.find(text)]
