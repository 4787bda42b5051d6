"""The host schedules and Prophet's threshold schedule as pure functions."""
import torch

from prophet.schedules import dream_schedule, dream_timesteps, dream_transfer_fraction, llada_schedule, prophet_tau


def test_llada_schedule_spreads_the_remainder_over_the_first_steps():
    assert llada_schedule(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]


def test_llada_schedule_is_per_row_and_sums_to_each_rows_masks():
    n = torch.tensor([10, 4, 0, 7, 32])
    sched = llada_schedule(n, 4)
    assert sched.tolist()[1:3] == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert sched.sum(1).tolist() == n.tolist()
    assert (sched[:, :-1] >= sched[:, 1:]).all()


def test_llada_schedule_with_fewer_masks_than_steps_commits_nothing_at_the_end():
    assert llada_schedule(torch.tensor([2]), 5).tolist() == [[1, 1, 0, 0, 0]]


def test_dream_timesteps_run_from_one_to_eps():
    ts = dream_timesteps(8, 1e-3)
    assert ts.shape == (9,) and ts.dtype == torch.float32
    assert ts[0] == 1 and abs(float(ts[-1]) - 1e-3) < 1e-7


def test_dream_schedule_matches_the_reference_formula_per_row():
    steps, eps = 16, 1e-3
    ts = torch.linspace(1, eps, steps + 1)
    n = torch.tensor([16, 9, 3, 16])
    for i in range(steps):
        got = dream_schedule(n, torch.full_like(n, i), steps, eps).tolist()
        want = [int(v) if i == steps - 1 else int(v * (1 - ts[i + 1] / ts[i])) for v in n.tolist()]
        assert got == want


def test_dream_schedule_commits_everything_at_the_last_step_and_rows_may_differ_in_step():
    n = torch.tensor([5, 5])
    got = dream_schedule(n, torch.tensor([0, 9]), 10, 1e-3)
    assert got[1] == 5 and got[0] < 5


def test_dream_schedule_never_exceeds_the_masks_when_replayed():
    steps, n = 32, torch.tensor([32, 20, 7])
    for i in range(steps):
        k = dream_schedule(n, torch.full_like(n, i), steps, 1e-3)
        assert (k >= 0).all() and (k <= n).all()
        n = n - k
    assert n.tolist() == [0, 0, 0]


def test_dream_transfer_fraction_is_one_at_the_last_step():
    frac = dream_transfer_fraction(torch.tensor([0, 3, 4]), 5, 1e-3)
    assert 0 < frac[0] < frac[1] < 1 and frac[2] == 1


def test_prophet_tau_switches_exactly_at_the_thirds():
    th = (8.0, 5.0, 3.0)
    tau = prophet_tau(torch.arange(13), 12, th).tolist()
    assert tau == [8.0] * 4 + [5.0] * 4 + [3.0] * 5  # p = 4/12 is no longer below 1/3
    # a budget not divisible by 3: p = 3/10 < 1/3, 4/10 >= 1/3, 6/10 < 2/3, 7/10 >= 2/3
    assert prophet_tau(torch.tensor([3, 4, 6, 7]), 10, th).tolist() == [8.0, 5.0, 5.0, 3.0]
    assert prophet_tau(torch.tensor([0]), 1, th).tolist() == [8.0]
