"""4x4 Sudoku with a unique solution; the answer is the whole 16-digit grid."""
from __future__ import annotations

import functools
import itertools
import random

from prophet.tasks.base import Budget, Example, Split, Task

PREFIX = "S:"
BLANK = "."
SUFFIX = "="
DIGITS = "1234"


def _units() -> list[tuple[int, ...]]:
    """The 12 rows, columns and 2x2 boxes of a 4x4 grid, as cell indices (row-major)."""
    rows = [tuple(4 * r + c for c in range(4)) for r in range(4)]
    cols = [tuple(4 * r + c for r in range(4)) for c in range(4)]
    boxes = [tuple(4 * (br + r) + bc + c for r in range(2) for c in range(2))
             for br in (0, 2) for bc in (0, 2)]
    return rows + cols + boxes


UNITS = _units()


def is_valid_grid(grid: str) -> bool:
    """16 digits 1-4 with every row, column and box a permutation of 1-4."""
    return (len(grid) == 16 and set(grid) <= set(DIGITS)
            and all(len({grid[i] for i in unit}) == 4 for unit in UNITS))


@functools.cache
def all_grids() -> tuple[str, ...]:
    """All 288 valid 4x4 Sudoku grids, sorted."""
    perms = ["".join(p) for p in itertools.permutations(DIGITS)]
    grids = ("".join(rows) for rows in itertools.product(perms, repeat=4))
    return tuple(g for g in grids if is_valid_grid(g))


@functools.cache
def _cell_masks() -> dict[tuple[int, str], int]:
    """(cell, digit) -> bitset over all_grids() of the grids holding that digit in that cell."""
    masks = {(i, d): 0 for i in range(16) for d in DIGITS}
    for bit, grid in enumerate(all_grids()):
        for i, d in enumerate(grid):
            masks[i, d] |= 1 << bit
    return masks


def _consistent(givens: str) -> int:
    """Bitset over all_grids() of the grids consistent with `givens`."""
    masks = _cell_masks()
    live = (1 << len(all_grids())) - 1
    for i, c in enumerate(givens):
        if c != BLANK:
            live &= masks.get((i, c), 0)  # a digit outside 1-4 matches no grid
    return live


def solutions(givens: str) -> list[str]:
    """Every grid consistent with `givens` (16 chars, BLANK where empty)."""
    live = _consistent(givens)
    return [g for bit, g in enumerate(all_grids()) if live >> bit & 1]


def is_unique(givens: str) -> bool:
    """Exactly one grid fits the givens."""
    return _consistent(givens).bit_count() == 1


class Sudoku4(Task):
    """4x4 Sudoku: prompt 'S:' + 16 cells ('.' = blank) + '=', answer the solved grid.

    Splits go by solution grid, so a held-out puzzle never shares its grid with a training one.
    """

    name = "sudoku4"
    # The paper's Sudoku budget (gen 24 = steps 24): 16 answer digits then EOS padding.
    budget = Budget(gen_length=24, steps=24, block_length=None)
    max_answer_len = 16

    def __init__(self, min_blanks: int = 6, max_blanks: int = 12) -> None:
        if not 1 <= min_blanks <= max_blanks <= 12:
            raise ValueError("blanks must satisfy 1 <= min_blanks <= max_blanks <= 12 "
                             "(a 4x4 Sudoku needs at least 4 givens to be unique)")
        self.min_blanks, self.max_blanks = min_blanks, max_blanks

    @functools.cached_property
    def grids_by_split(self) -> dict[str, tuple[str, ...]]:
        """The solution grids of each split."""
        out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        for g in all_grids():
            out[self._split_of_grid(g)].append(g)
        return {k: tuple(v) for k, v in out.items()}

    def _split_of_grid(self, grid: str) -> Split:
        return self.split_of(PREFIX + grid + SUFFIX)  # a full grid is its own solution

    def sample(self, rng: random.Random, split: Split = "train") -> Example:
        """A random puzzle with a unique solution whose grid lies in `split`."""
        grid = rng.choice(self.grids_by_split[split])
        while True:
            k = rng.randint(self.min_blanks, self.max_blanks)
            blanks = set(rng.sample(range(16), k))
            givens = "".join(BLANK if i in blanks else c for i, c in enumerate(grid))
            if is_unique(givens):
                return Example(PREFIX + givens + SUFFIX, grid)

    def givens(self, prompt: str) -> str:
        """The 16 cells of a prompt; raises ValueError on a malformed one."""
        if not (prompt.startswith(PREFIX) and prompt.endswith(SUFFIX)):
            raise ValueError(f"not a sudoku4 prompt: {prompt!r}")
        cells = prompt[len(PREFIX):-len(SUFFIX)]
        if len(cells) != 16 or not set(cells) <= set(DIGITS + BLANK):
            raise ValueError(f"not a sudoku4 prompt: {prompt!r}")
        return cells

    def score(self, prompt: str, completion: str) -> bool:
        """A valid grid that keeps every given."""
        givens = self.givens(prompt)
        return is_valid_grid(completion) and all(c in (BLANK, s) for c, s in zip(givens, completion))

    def split_key(self, prompt: str) -> str:
        """The puzzle's solution grid (the first one when a prompt is not unique)."""
        sols = solutions(self.givens(prompt))
        if not sols:
            raise ValueError(f"sudoku4 prompt has no solution: {prompt!r}")
        return sols[0]
