"""A preference task with a known answer, generated in code: the test bed and the demo.

The user asks the assistant to say a word a few times ("Say stone a few
times."). Supervised data answers with the word repeated 1 to `max_count`
times, uniformly, so a model fine-tuned on it says the word the right way but
any number of times. The judge prefers exactly `target` repetitions: a format
rule the fine-tuned model follows only by chance (1 in `max_count`), which
alignment must teach from preferences or rewards alone. The judge's score is
graded (1 at the target count, falling by 1/target per repetition away from
it, 0 for any other word or text), so rewards carry a gradient for PPO and
GRPO, and pairs of candidates with different scores give DPO and reward-model
preferences whose right answer is known.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

Messages = list[dict[str, str]]

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "pixel", "amber", "delta", "maple", "orbit", "piano",
    "quartz", "raven", "sugar", "tulip", "vivid", "willow", "yacht", "zebra", "candle", "forest", "garden", "harbor",
)
_PROMPT = "Say {word} a few times."
_PARSE = re.compile(r"Say (\w+) a few times\.")


@dataclass(frozen=True)
class RepeatTask:
    """Say-the-word task: prompts, supervised chats, preference pairs and the judge."""

    target: int = 3
    max_count: int = 5
    words: tuple[str, ...] = WORDS

    def __post_init__(self) -> None:
        if not 1 <= self.target <= self.max_count:
            raise ValueError(f"target: must be in 1..max_count ({self.max_count}), got {self.target}")

    def prompt(self, word: str) -> Messages:
        return [{"role": "user", "content": _PROMPT.format(word=word)}]

    @staticmethod
    def response(word: str, count: int) -> str:
        return " ".join([word] * count)

    def prompts(self, n: int, seed: int) -> list[Messages]:
        rng = random.Random(seed)
        return [self.prompt(rng.choice(self.words)) for _ in range(n)]

    def judge(self, prompt: Messages, response: str) -> float:
        """Score in [0, 1]: 1 for exactly `target` repetitions of the asked word."""
        match = _PARSE.fullmatch(prompt[-1]["content"])
        if match is None:
            raise ValueError(f"prompt: not a prompt of this task: {prompt[-1]['content']!r}")
        parts = response.strip().split(" ")
        if not parts or any(p != match.group(1) for p in parts):
            return 0.0
        return max(0.0, 1.0 - abs(len(parts) - self.target) / self.target)

    def sft_chats(self, n: int, seed: int) -> list[Messages]:
        """Chats whose replies repeat the word 1..max_count times, uniformly."""
        rng = random.Random(seed)
        chats = []
        for _ in range(n):
            word = rng.choice(self.words)
            reply = self.response(word, rng.randint(1, self.max_count))
            chats.append(self.prompt(word) + [{"role": "assistant", "content": reply}])
        return chats

    def preference_pairs(self, n: int, seed: int) -> list[dict[str, object]]:
        """{"prompt": messages, "chosen": text, "rejected": text}: two counts the judge scores
        differently, the better one chosen (the prompt/chosen/rejected convention)."""
        rng = random.Random(seed)
        pairs = []
        while len(pairs) < n:
            word = rng.choice(self.words)
            a, b = rng.sample(range(1, self.max_count + 1), 2)
            prompt = self.prompt(word)
            good, bad = self.response(word, a), self.response(word, b)
            score_a, score_b = self.judge(prompt, good), self.judge(prompt, bad)
            if score_a == score_b:
                continue  # equally far from the target: no preference to learn
            if score_a < score_b:
                good, bad = bad, good
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
        return pairs


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """How often the first side beats the baseline on the same prompts; ties count half."""
    if len(scores) != len(baseline) or not scores:
        raise ValueError(f"scores: need two equally long non-empty lists, got {len(scores)} and {len(baseline)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)) / len(scores)


__all__ = ["WORDS", "RepeatTask", "win_rate"]
