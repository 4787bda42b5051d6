"""The Task interface: a checkable synthetic task with a generator, a scorer and stable splits."""
from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Percent of the hash space per held-out split: [0, TEST_PCT) is test, [TEST_PCT, TEST_PCT +
# VALID_PCT) is validation (calibration), the rest is training.
TEST_PCT = 10
VALID_PCT = 10


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer (the text the model should write before EOS)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Budget:
    """The task's default decoding budget."""

    gen_length: int              # generated positions: answer plus EOS padding
    steps: int                   # forward passes for "Full" decoding
    block_length: int | None     # LLaDA semi-AR block; None = one block
    # Commit EOS last (DecodeConfig.confidence_eos_eot_inf). The answer has a fixed length and
    # the rest of the window is EOS padding, which the model predicts with top confidence: with
    # this off, every rule first spends about 8 of 24 steps writing padding, during which the
    # answer cannot improve (measured: the all-in fill of a Full run stays at one-shot accuracy
    # for its first ~12 steps, and even an oracle early commit needs 7.9 steps for tiny-dream).
    eos_last: bool = True


def bucket(key: str) -> int:
    """Stable bucket in [0, 100) of a string (sha256, independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def split_of_bucket(b: int) -> Split:
    """Which split a hash bucket belongs to."""
    if b < TEST_PCT:
        return "test"
    return "valid" if b < TEST_PCT + VALID_PCT else "train"


class Task(ABC):
    """A synthetic task: prompts in the char tokenizer's alphabet, a scorer that needs no answer."""

    name: str
    budget: Budget
    max_answer_len: int          # longest answer; gen_length leaves room for at least one EOS

    @abstractmethod
    def sample(self, rng: random.Random, split: Split = "train") -> Example:
        """One random example whose prompt belongs to `split`."""

    @abstractmethod
    def score(self, prompt: str, completion: str) -> bool:
        """Whether `completion` (decoded text before EOS) solves `prompt`."""

    @abstractmethod
    def split_key(self, prompt: str) -> str:
        """The string whose hash decides the split (all prompts sharing it share a split)."""

    def split_of(self, prompt: str) -> Split:
        """The split `prompt` belongs to: 'train', 'valid' or 'test'."""
        return split_of_bucket(bucket(f"{self.name}:{self.split_key(prompt)}"))

    def is_heldout(self, prompt: str) -> bool:
        """True when the prompt is never used for training (validation or test)."""
        return self.split_of(prompt) != "train"

    def size(self, split: Split) -> int | None:
        """Distinct prompts in `split` when the task can count them (small spaces), else None."""
        return None

    def available(self, split: Split, n: int) -> int:
        """n, or fewer where the split holds fewer distinct prompts."""
        size = self.size(split)
        return n if size is None else min(n, size)

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """n distinct examples of `split`, reproducible from `seed`."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: dict[str, Example] = {}
        for _ in range(50 * n + 1000):  # bounded: a tiny split cannot loop forever
            if len(seen) == n:
                break
            ex = self.sample(rng, split)
            seen.setdefault(ex.prompt, ex)
        if len(seen) < n:
            raise ValueError(f"task {self.name}: split {split!r} has fewer than {n} distinct prompts")
        return list(seen.values())
