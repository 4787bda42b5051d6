"""Running sums mod 10: each output digit is easy given the previous one, hard all at once."""
from __future__ import annotations

import itertools
import random

from prophet.tasks.base import Budget, Example, Split, Task

PREFIX = "P:"
SUFFIX = "="


def running_sums(digits: str) -> str:
    """'3517' -> '3896': the running sum mod 10 after each digit."""
    return "".join(str(s % 10) for s in itertools.accumulate(int(d) for d in digits))


class PrefixSums(Task):
    """Prompt 'P:' + 8 digits + '=', answer the running sum mod 10 after each digit.

    Fixed length on purpose: answer digit i then sits at a fixed offset from input digit i. With
    6-10 digits a tiny model learnt nothing past the first digit in 300 steps (the same trap as
    variable-width addition in the prototype).
    """

    name = "prefix_sums"
    # The same budget as sudoku4, so one decoding config serves the whole default prompt set.
    budget = Budget(gen_length=24, steps=24, block_length=None)

    def __init__(self, min_len: int = 8, max_len: int = 8) -> None:
        if not 1 <= min_len <= max_len < self.budget.gen_length:
            raise ValueError(f"lengths must satisfy 1 <= min_len <= max_len < {self.budget.gen_length}")
        self.min_len, self.max_len = min_len, max_len
        self.max_answer_len = max_len

    def sample(self, rng: random.Random, split: Split = "train") -> Example:
        """A random digit string whose prompt lies in `split` (rejection: splits are 80/10/10)."""
        while True:
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_len, self.max_len)))
            prompt = PREFIX + digits + SUFFIX
            if self.split_of(prompt) == split:
                return Example(prompt, running_sums(digits))

    def digits(self, prompt: str) -> str:
        """The input digits of a prompt; raises ValueError on a malformed one."""
        body = prompt[len(PREFIX):-len(SUFFIX)] if prompt.startswith(PREFIX) and prompt.endswith(SUFFIX) else ""
        if not body.isdigit() or not body.isascii():
            raise ValueError(f"not a prefix_sums prompt: {prompt!r}")
        return body

    def score(self, prompt: str, completion: str) -> bool:
        """Exactly the running sums, nothing more."""
        return completion == running_sums(self.digits(prompt))

    def split_key(self, prompt: str) -> str:
        """The input digits."""
        return self.digits(prompt)
