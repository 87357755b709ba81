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
is split at lower-case words between title-case ones (name particles such as
"van" excepted), trimmed of punctuation and common words at either end, then
held to title case (`NameModel._title_case`): the model learns its contexts
from a few dozen templates, and outside them it can be sure of "John" in
"Call John Smith at ..." and not of "Smith". A title-case word right after a
personal title ("Dr.", "Mrs") counts as sure. The name lists leave out
surnames that are also common words, so the model cannot learn them; the
title-case rule takes them in beside a name it found ("Sarah Green"), unless
they are function words or Heron's capitalised non-names ("Sarah Monday").

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

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from heron.govern.pii_lexicon import FUNCTION_WORDS, HONORIFICS, NAME_PARTICLES, common_words, non_names
from heron.govern.presidio import EntityRecognizer, RecognizerResult
from heron.store.atomic import write_file_atomic

TOKEN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
SENTENCE_END = frozenset(".!?:|")  # not ";": a capital after one is a name's, not the sentence's
CACHE_ENV = "HERON_CACHE"  # where the trained name model is kept (default_name_model)


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
        self.non_names = non_names() | FUNCTION_WORDS  # never part of a name, even beside one

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
        a run of tokens on one line, each at or above `extend`, one at least at `threshold` or
        the first right after a personal title ("Mrs. White"); split at lower-case words
        between title-case ones, trimmed of punctuation and common words at either end, then
        held to title case (`_title_case`). Score: the mean probability of the tokens the model
        put in the name, a word right after a personal title counting as sure."""
        tokens = tokenize(text)
        titled = [self._after_title(tokens, i) for i in range(len(tokens))]
        p = self.token_probabilities(tokens)
        p = np.where(np.array(titled, dtype=bool), np.maximum(p, self.threshold), p)
        spans = []
        for run in self._runs(tokens, p, titled):
            first, last = self._title_case(text, tokens, run)
            found = [i for i in run if first <= i <= last]
            spans.append((tokens[first].start, tokens[last].end, float(p[found].mean())))
        return spans

    def _runs(self, tokens: Sequence[Token], p: np.ndarray, titled: Sequence[bool]) -> Iterator[list[int]]:
        """The hysteresis runs of token indices, split and trimmed; titled[i]: token i follows
        a personal title."""
        for run in _hysteresis_runs(tokens, p, self.extend):
            for piece in _split_at_lower_case(tokens, run):
                while piece and not self._can_edge(tokens[piece[-1]].text, titled[piece[-1]]):
                    piece.pop()
                while piece and not self._can_edge(tokens[piece[0]].text, titled[piece[0]]):
                    piece.pop(0)
                if piece and p[piece].max() >= self.threshold:
                    yield piece

    def _title_case(self, text: str, tokens: Sequence[Token], run: list[int]) -> tuple[int, int]:
        """The run's first and last token once held to title case. A run with a title-case
        token sheds lowercase words at its ends, and takes in the title-case words written
        right beside it on the line ("John Smith" where the model was sure of John alone;
        "Sarah Green" and "Sarah K. Green" too, a surname that is also a common word), and a
        first name on its left ("Mary Jones" where the model was sure of Jones alone, even at a
        sentence's start, where the model is least sure), but not a word that opens sentences
        ("Yesterday Paul" stays "Paul"; pii_lexicon.OPENERS) or a request ("Contact Paul").
        Taking in a sentence's first word that is no name redacts a word too many; leaving out
        a first name leaks it. Names the model sees in lower case ("my name is ana lima") stay
        as found."""
        first, last = run[0], run[-1]
        if not any(_title(tokens[i].text) for i in run):
            return first, last
        while not _title(tokens[first].text):
            first += 1
        while not _title(tokens[last].text):
            last -= 1
        while (after := self._surname_after(text, tokens, last)) is not None:
            last = after
        while first > 0 and _spaced(text, tokens[first - 1], tokens[first]) \
                and self._joins(tokens[first - 1].text, tokens[first].text):
            first -= 1
        return first, last

    def _surname_after(self, text: str, tokens: Sequence[Token], last: int) -> int | None:
        """The title-case word that continues a name ending at token `last`: the next word
        ("John Smith") or the one after a middle initial ("John K. Smith"); else None."""
        before, nxt = last, last + 1
        if _initial(text, tokens, nxt):
            before, nxt = nxt + 1, nxt + 2  # the initial's full stop, the word after it
        if nxt < len(tokens) and _spaced(text, tokens[before], tokens[nxt]) \
                and self._joins(tokens[last].text, tokens[nxt].text, surname=True):
            return nxt
        return None

    def _joins(self, left: str, right: str, surname: bool = False) -> bool:
        """Whether two title-case words may be one name: neither a non-name (a weekday, a
        product, a function word: "Sarah Monday" is not one name) and neither a common word,
        except a `surname` on the right ("Sarah Green")."""
        if not all(_title(w) and w.lower() not in self.non_names for w in (left, right)):
            return False
        return left.lower() not in self.common and (surname or right.lower() not in self.common)

    def _can_edge(self, word: str, after_title: bool) -> bool:
        """Whether a name may start or end with this word: not punctuation, not a non-name
        ("Contact Ana" gives "Ana"), not a common word (the name lists leave those out; see
        pii_lexicon), so "Call Ana" gives "Ana"; but a common word right after a personal title
        is a surname ("Dr. Green")."""
        low = word.lower()
        return word[0].isalnum() and low not in self.non_names and (low not in self.common or after_title)

    def _after_title(self, tokens: Sequence[Token], i: int) -> bool:
        """Whether token i is a title-case word, not a non-name, right after a personal title
        ("Dr. Green", "Mrs White")."""
        j = i - 1 if i and tokens[i - 1].text == "." else i
        word = tokens[i].text
        return j > 0 and tokens[j - 1].text in HONORIFICS and _title(word) and word.lower() not in self.non_names


def _hysteresis_runs(tokens: Sequence[Token], p: np.ndarray, extend: float) -> Iterator[list[int]]:
    """Maximal runs of neighbouring tokens on one line, each with p(name) at least `extend`."""
    run: list[int] = []
    for i, token in enumerate(tokens):
        if p[i] >= extend and not (run and token.starts_line):
            run.append(i)
            continue
        if run:
            yield run
        run = [i] if p[i] >= extend else []
    if run:
        yield run


def _split_at_lower_case(tokens: Sequence[Token], run: list[int]) -> list[list[int]]:
    """A run holding a title-case word, split at its lower-case words other than name
    particles ("Emma Stone met Jack" gives "Emma Stone" and "Jack"; "Jan van Dijk" stays);
    a run without one, whole."""
    if not any(_title(tokens[i].text) for i in run):
        return [run]
    pieces: list[list[int]] = [[]]
    for i in run:
        word = tokens[i].text
        if word.isalpha() and word.islower() and word not in NAME_PARTICLES:
            pieces.append([])
        else:
            pieces[-1].append(i)
    return [piece for piece in pieces if piece]


def _spaced(text: str, left: Token, right: Token) -> bool:
    """Whether two tokens stand apart by spaces only (not glued, not across punctuation or lines)."""
    return left.end < right.start and not text[left.end:right.start].strip(" ")


def _initial(text: str, tokens: Sequence[Token], i: int) -> bool:
    """Whether tokens i and i + 1 are a middle initial ("K.") spaced from the word before."""
    if not 0 < i < len(tokens) - 1:
        return False
    letter, stop = tokens[i], tokens[i + 1]
    return len(letter.text) == 1 and letter.text.isupper() and stop.text == "." and letter.end == stop.start \
        and _spaced(text, tokens[i - 1], letter)


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
    """The model every default engine shares: NameSettings() defaults, trained once per machine.

    Training takes seconds, so the weights are kept in the cache folder ($HERON_CACHE, else
    ~/.cache/heron; "off" keeps nothing) under a key of everything they follow from: the
    settings, the code and word lists that make the corpus, and the Faker and NumPy versions.
    Any change trains anew; a cache file that cannot be read or written is trained over."""
    settings = NameSettings()
    file = _cache_file(settings)
    if file is not None and file.is_file():
        try:
            with np.load(file) as saved:
                vocab = {feature: i for i, feature in enumerate(saved["features"].tolist())}
                return NameModel(vocab, saved["weights"], settings.threshold, settings.extend)
        except (OSError, ValueError, KeyError):
            pass
    model = train_name_model(settings)
    if file is not None:
        _save(model, file)
    return model


def _cache_file(settings: NameSettings) -> Path | None:
    folder = os.environ.get(CACHE_ENV, "").strip() or str(Path.home() / ".cache" / "heron")
    if folder.lower() == "off":
        return None
    import faker

    here = Path(__file__).parent
    key = hashlib.sha256(repr((settings, faker.VERSION, np.__version__)).encode())
    for module in ("pii_names.py", "pii_corpus.py", "pii_lexicon.py"):
        key.update((here / module).read_bytes())
    return Path(folder) / f"pii_names-{key.hexdigest()[:16]}.npz"


def _save(model: NameModel, file: Path) -> None:
    """Write the weights and feature names atomically; a folder that cannot be written is let be."""
    features = np.array(sorted(model.vocab, key=model.vocab.__getitem__))
    try:
        write_file_atomic(file, lambda f: np.savez(f, weights=model.weights, features=features))
    except OSError:
        pass


class NameRecognizer(EntityRecognizer):
    """A Presidio recogniser for PERSON backed by a NameModel."""

    def __init__(self, model: NameModel) -> None:
        self.model = model
        super().__init__(supported_entities=["PERSON"], name="HeronNameRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None) -> list[RecognizerResult]:
        return [RecognizerResult("PERSON", start, end, score) for start, end, score in self.model.find(text)]
