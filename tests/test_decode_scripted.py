"""The scripted fake DLM keeps the promises the decoder tests rely on."""
import torch

from prophet.rules import top2_gap
from prophet.scripted import ScriptedDLM
from prophet.types import DLM


def test_it_implements_the_dlm_protocol_with_distinct_special_ids():
    m = ScriptedDLM(8)
    assert isinstance(m, DLM)
    assert len({m.pad_id, m.mask_id, m.eos_id, m.eot_id}) == 4


def test_a_rows_logits_do_not_depend_on_padding_or_neighbours():
    m = ScriptedDLM(6)
    window = torch.tensor([1, 1, 9, 1, 12, 1])
    alone = m.logits(torch.cat([torch.tensor([7, 8, 9]), window])[None], torch.ones(1, 9, dtype=torch.bool))
    ids = torch.stack([torch.cat([torch.tensor([0, 0, 7, 8, 9]), window]),
                       torch.cat([torch.tensor([5, 6, 7, 8, 9]), window])])
    real = torch.ones(2, 11, dtype=torch.bool)
    real[0, :2] = False
    batched = m.logits(ids, real)
    assert torch.equal(batched[0, -6:], alone[0, -6:])
    assert not torch.equal(batched[1, -6:], alone[0, -6:])  # another prompt, another answer


def test_the_answer_gap_grows_as_the_window_is_decided():
    m = ScriptedDLM(16)
    prompts = torch.randint(4, 32, (64, 5), generator=torch.Generator().manual_seed(0))
    real = torch.ones(64, 21, dtype=torch.bool)
    empty = torch.full((64, 16), m.mask_id)
    first = m.logits(torch.cat([prompts, empty], 1), real)[:, -16:]
    answer = first.argmax(-1)
    late = m.logits(torch.cat([prompts, answer], 1), real)[:, -16:]
    assert top2_gap(late).mean() > top2_gap(first).mean() + 2
    changed = (late.argmax(-1) != answer).float().mean()
    assert 0.02 < changed < 0.5  # decoys: some early argmaxes are wrong


def test_prompts_starting_with_the_poison_token_get_nan():
    m = ScriptedDLM(4, nonfinite_token=5)
    ids = torch.tensor([[0, 5, 6, 1, 1, 1, 1], [4, 5, 6, 1, 1, 1, 1]])
    real = torch.tensor([[False] + [True] * 6, [True] * 7])
    out = m.logits(ids, real)
    assert out[0].isnan().all() and out[1].isfinite().all()
