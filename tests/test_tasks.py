"""Task generators, scorers and splits: real properties on real examples."""
import random

import pytest

from prophet.tasks import ALPHABET, SPLITS, TASKS, bucket, get_task
from prophet.tasks.running_sums import RunningSums, running_sums
from prophet.tasks.sudoku import all_grids, is_valid_grid, solutions


def test_all_288_sudoku_grids_are_valid_and_distinct():
    grids = all_grids()
    assert len(grids) == len(set(grids)) == 288
    assert all(is_valid_grid(g) for g in grids)


def test_sudoku_puzzles_have_one_solution_equal_to_the_answer_and_consistent_givens():
    task = get_task("sudoku4")
    rng = random.Random(1)
    for _ in range(300):
        ex = task.sample(rng)
        givens = task.givens(ex.prompt)
        assert solutions(givens) == [ex.answer]
        assert all(c == "." or c == s for c, s in zip(givens, ex.answer))
        assert task.min_blanks <= givens.count(".") <= task.max_blanks


def test_scorers_accept_the_answer_and_reject_a_corruption():
    rng = random.Random(2)
    for task in TASKS.values():
        for ex in task.examples("test", 50, seed=3):
            assert task.score(ex.prompt, ex.answer)
            i = rng.randrange(len(ex.answer))
            wrong = ex.answer[:i] + str((int(ex.answer[i]) + 1) % 10) + ex.answer[i + 1:]
            assert not task.score(ex.prompt, wrong)
            assert not task.score(ex.prompt, ex.answer[:-1])
            assert not task.score(ex.prompt, ex.answer + ex.answer[-1])


def test_sudoku_scorer_rejects_a_valid_grid_that_ignores_the_givens():
    task = get_task("sudoku4")
    ex = task.examples("valid", 1, seed=0)[0]
    other = next(g for g in all_grids() if g != ex.answer)
    assert is_valid_grid(other) and not task.score(ex.prompt, other)


def test_running_sums_and_parity():
    assert running_sums("3517") == "3896"
    assert running_sums("999") == "987"
    assert running_sums("0110100", modulus=2) == "0100111"
    task = get_task("running_parity")
    assert task.score("X:011010011101=", "010011101001")
    with pytest.raises(ValueError):
        task.score("X:0110=", "0100")  # wrong length: not a prompt of this task
    with pytest.raises(ValueError):
        RunningSums("bad", "B:", 11, 4)


def test_splits_are_stable_disjoint_and_sudoku_never_shares_a_grid():
    task = get_task("sudoku4")
    by_split = {s: task.examples(s, 200, seed=0) for s in SPLITS}
    grids = {s: {e.answer for e in exs} for s, exs in by_split.items()}
    assert not grids["train"] & grids["valid"] and not grids["train"] & grids["test"]
    assert not grids["valid"] & grids["test"]
    for s, exs in by_split.items():
        assert all(task.split_of(e.prompt) == s for e in exs)
        assert all(task.is_heldout(e.prompt) == (s != "train") for e in exs)
    # stable: same seed, same examples; the split of a prompt is a pure function of its text
    assert task.examples("test", 20, seed=0) == by_split["test"][:20]
    # frozen values: a changed hash function would silently reshuffle train and held-out
    assert bucket("hello") == 42
    assert task.split_of("S:1324241332414132=") == "test"
    assert task.split_of("S:1243342143122134=") == "valid"
    assert task.split_of("S:1.2.3.4.........=") == task.split_of("S:1.2.3.4.........=")


def test_parity_split_is_stable_and_disjoint():
    task = get_task("running_parity")
    prompts = {s: {e.prompt for e in task.examples(s, 300, seed=0)} for s in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["valid"] & prompts["test"]
    assert all(task.split_of(p) == s for s, ps in prompts.items() for p in ps)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_and_answers_fit_the_alphabet_and_budget(name):
    task = get_task(name)
    for ex in task.examples("train", 200, seed=5):
        assert set(ex.prompt + ex.answer) <= set(ALPHABET)
        assert len(ex.answer) <= task.max_answer_len < task.budget.gen_length


def test_get_task_names_the_known_tasks_on_a_typo():
    with pytest.raises(KeyError, match="sudoku4"):
        get_task("sudoku")
