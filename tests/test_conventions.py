"""The reference decoders' conventions that the project offers as options (issue 11), and the
calibration contract: thresholds refuse to run under settings that change what they mean, and warn
under settings that change only the sampling path."""
import json

import pytest
import torch

from pipeline.config import JobConfigError, load_job_config
from prophet.config import CalibrationWarning, ConfigError, DecodeConfig
from prophet.schedules import prophet_tau
from tests.test_decode import check_against_oracle, prompts_for
from tests.test_pipeline import base

TH = (8.0, 5.0, 3.0)


def generate_earlyexit_tau(step_index: int, steps: int) -> float:
    """Prophet's reference code, as written there: progress (i + 1) / steps, cut-offs 0.33 / 0.67."""
    p = (step_index + 1) / steps
    return TH[0] if p < 0.33 else TH[1] if p < 0.67 else TH[2]


@pytest.mark.parametrize("steps,differ", [(24, [7]), (32, [10, 21]), (256, [84, 85])])
def test_reference_progress_is_generate_earlyexits_and_drops_one_step_early(steps, differ):
    pos = torch.arange(steps)
    ref = prophet_tau(pos, steps, TH, "reference").tolist()
    assert ref == [generate_earlyexit_tau(i, steps) for i in range(steps)]
    exact = prophet_tau(pos, steps, TH, "exact").tolist()
    assert [i for i in range(steps) if ref[i] != exact[i]] == differ  # 1-based steps 8; 11, 22; 85, 86
    assert all(ref[i] < exact[i] for i in differ)  # the reference lowers the threshold a step earlier


@pytest.mark.parametrize("host", ["llada", "dream"])
def test_decode_with_reference_progress_equals_the_oracle_and_can_exit_earlier(host):
    kw = dict(host=host, gen_length=24, steps=24, rule="prophet", thresholds=(6.0, 4.0, 2.0), batch_size=3)
    prompts = prompts_for(31, 12)
    ref = check_against_oracle(DecodeConfig(**kw, progress="reference"), prompts)
    exact = check_against_oracle(DecodeConfig(**kw), prompts)
    assert (ref.steps_used <= exact.steps_used).all()


def test_paper_presets_use_the_reference_progress_unless_told_otherwise(tmp_path):
    paper = load_job_config(None, base(tmp_path, **{"decoding.preset": "paper_gsm8k", "decoding.rule": "prophet"}))
    assert paper.decode_config("llada").progress == "reference"
    told = load_job_config(None, base(tmp_path, **{"decoding.preset": "paper", "decoding.progress": "exact"}))
    assert told.decode_config("llada").progress == "exact"
    ours = load_job_config(None, base(tmp_path, **{"decoding.preset": "default"}))
    assert ours.decode_config("llada").progress == "exact"


def calibration(tmp_path, **fitted):
    path = tmp_path / "cal.json"
    with_ = {"host": "llada", "gen_length": 24, "steps": 24, "block_length": None, "remasking": "low_confidence",
             "alg": "maskgit_plus", "temperature": 0.0, "confidence_eos_eot_inf": True, **fitted}
    path.write_text(json.dumps({"decode": {"rule": "prophet", "thresholds": [4, 4, 4]}, "calibrated_with": with_}))
    return path


def test_a_calibration_refuses_settings_it_was_not_fitted_with(tmp_path):
    path = calibration(tmp_path)
    same = DecodeConfig(gen_length=24, steps=24, confidence_eos_eot_inf=True, alg="entropy")  # alg: not LLaDA's
    assert same.with_calibration(path).thresholds == (4.0, 4.0, 4.0)
    with pytest.raises(ConfigError) as e:
        DecodeConfig(gen_length=32, steps=16, confidence_eos_eot_inf=True).with_calibration(path)
    assert "gen_length (calibrated 24, here 32)" in str(e.value) and "steps (calibrated 24, here 16)" in str(e.value)
    assert "pass thresholds explicitly" in str(e.value)
    with pytest.raises(ConfigError, match="progress .calibrated 'exact', here 'reference'"):
        DecodeConfig(gen_length=24, steps=24, confidence_eos_eot_inf=True, progress="reference").with_calibration(path)
    job = base(tmp_path, **{"decoding.calibration": str(path), "decoding.gen_length": 32, "decoding.steps": 32})
    with pytest.raises(JobConfigError, match="decoding: .*gen_length .calibrated 24, here 32"):
        load_job_config(None, job).decode_config("llada")


def test_a_calibration_warns_once_where_only_the_sampling_path_differs(tmp_path):
    path = calibration(tmp_path)
    with pytest.warns(CalibrationWarning) as w:
        got = DecodeConfig(gen_length=24, steps=24, confidence_eos_eot_inf=True, temperature=0.7).with_calibration(path)
    assert got.thresholds == (4.0, 4.0, 4.0) and got.temperature == 0.7  # the path kept, the thresholds applied
    assert len(w) == 1 and "temperature (calibrated 0.0, here 0.7)" in str(w[0].message)
    assert "jobs/calibrate.py --temperature" in str(w[0].message)  # the fix is named
    with pytest.raises(ConfigError, match="steps .calibrated 24, here 12") as e:  # a meaning field still refuses
        DecodeConfig(gen_length=24, steps=12, confidence_eos_eot_inf=True, temperature=0.7).with_calibration(path)
    assert "temperature" not in str(e.value)  # only what refuses is named in the refusal
    job = base(tmp_path, **{"decoding.calibration": str(path), "decoding.gen_length": 24, "decoding.steps": 24,
                            "decoding.confidence_eos_eot_inf": True, "decoding.temperature": 0.7})
    with pytest.warns(CalibrationWarning):
        assert load_job_config(None, job).decode_config("llada").rule == "prophet"
