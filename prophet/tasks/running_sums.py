"""Running sums: each output digit is easy given the previous one, hard all at once.

`running_parity`: 12 bits, the running parity (sum mod 2) after each: one XOR per step given
the previous output, but the parity of a long prefix in one pass, which transformers are known
to find hard. (Running sums mod 10 of 8 digits were tried first and dropped: the tiny models
stayed at chance on them after 2,000 steps, 0.0-0.1% held-out accuracy.)
"""
from __future__ import annotations

import functools
import itertools
import random

from prophet.tasks.base import Budget, Example, Split, Task

SUFFIX = "="


def running_sums(digits: str, modulus: int = 10) -> str:
    """'3517' -> '3896': the running sum mod `modulus` after each digit."""
    return "".join(str(s % modulus) for s in itertools.accumulate(int(d) for d in digits))


class RunningSums(Task):
    """Prompt TAG + `length` digits below `modulus` + '=', answer the running sums mod `modulus`.

    Fixed length on purpose: answer digit i then sits at a fixed offset from input digit i. With
    6-10 digits a tiny model learnt nothing past the first digit in 300 steps (the same trap as
    variable-width addition in the prototype).
    """

    # The same budget as sudoku4, so one decoding config serves the whole default prompt set.
    budget = Budget(gen_length=24, steps=24, block_length=None)

    def __init__(self, name: str, tag: str, modulus: int, length: int) -> None:
        if not 2 <= modulus <= 10 or not 1 <= length < self.budget.gen_length:
            raise ValueError(f"need 2 <= modulus <= 10 and 1 <= length < {self.budget.gen_length}")
        self.name, self.tag, self.modulus, self.length = name, tag, modulus, length
        self.max_answer_len = length
        self.symbols = "0123456789"[:modulus]

    def sample(self, rng: random.Random, split: Split = "train") -> Example:
        """A random digit string whose prompt lies in `split` (rejection: splits are 80/10/10)."""
        while True:
            digits = "".join(rng.choice(self.symbols) for _ in range(self.length))
            prompt = self.tag + digits + SUFFIX
            if self.split_of(prompt) == split:
                return Example(prompt, running_sums(digits, self.modulus))

    @functools.cached_property
    def _prompts_by_split(self) -> dict[str, list[str]]:
        """Every prompt of each split, enumerated (only done for spaces of at most 2**16)."""
        out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        for digits in itertools.product(self.symbols, repeat=self.length):
            prompt = self.tag + "".join(digits) + SUFFIX
            out[self.split_of(prompt)].append(prompt)
        return out

    def size(self, split: Split) -> int | None:
        """Distinct prompts of the split, counted where the space is small (12 bits: 4,096)."""
        if self.modulus ** self.length > 2 ** 16:
            return None
        return len(self._prompts_by_split[split])

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """n distinct examples of `split`: a seeded sample of the enumerated split where it is small."""
        if self.size(split) is None:
            return super().examples(split, n, seed)
        prompts = self._prompts_by_split[split]
        if n > len(prompts):
            raise ValueError(f"task {self.name}: split {split!r} has {len(prompts)} distinct prompts, not {n}")
        picked = random.Random(f"{self.name}:{split}:{seed}").sample(prompts, n)
        return [Example(p, running_sums(self.digits(p), self.modulus)) for p in picked]

    def digits(self, prompt: str) -> str:
        """The input digits of a prompt; raises ValueError on a malformed one."""
        ok = prompt.startswith(self.tag) and prompt.endswith(SUFFIX)
        body = prompt[len(self.tag):-len(SUFFIX)] if ok else ""
        if len(body) != self.length or not set(body) <= set(self.symbols):
            raise ValueError(f"not a {self.name} prompt: {prompt!r}")
        return body

    def score(self, prompt: str, completion: str) -> bool:
        """Exactly the running sums, nothing more."""
        return completion == running_sums(self.digits(prompt), self.modulus)

    def split_key(self, prompt: str) -> str:
        """The input digits."""
        return self.digits(prompt)


def running_parity() -> RunningSums:
    """12 bits, running parity: prompt 'X:011010011101=', answer '010011101001'."""
    return RunningSums("running_parity", "X:", 2, 12)
