"""The lm-eval model class (the `lmeval` extra): lm-eval's real CLI and simple_evaluate on the shipped
tiny models over an offline task directory, against jobs/evaluate.py's run_task on the same prompts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra 'lmeval': pip install -e .[lmeval]")

import torch  # noqa: E402
from tiny_support import ROOT, load_job, one_thread  # noqa: E402,F401 (one_thread is an autouse fixture)

from prophet.config import PRESETS, CalibrationWarning, ConfigError  # noqa: E402
from prophet.lmeval import ProphetLM, build_config, cut_at_until, mc_loglikelihood, write_task_dir  # noqa: E402
from prophet.models import load_model  # noqa: E402
from prophet.tasks import get_task  # noqa: E402
from prophet.tasks.evaluation import run_task, task_config  # noqa: E402

LLADA, DREAM = ROOT / "checkpoints" / "tiny-llada", ROOT / "checkpoints" / "tiny-dream"
LLADA2 = ROOT / "checkpoints" / "tiny-llada2"  # block diffusion: the block host, blocks of 8
N = 20


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lmeval-tasks")
    assert write_task_dir(d, ["sudoku4"], N, seed=0) == ["prophet_sudoku4"]
    write_choice_task(d)
    return d


@pytest.fixture(scope="module")
def task_manager(task_dir):
    """One TaskManager for the module: building one indexes all of lm-eval's own tasks (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir))


def reference(model_dir: Path, **overrides):
    """jobs/evaluate.py's evaluation of the same N held-out prompts (seed 0)."""
    model, task = load_model(model_dir), get_task("sudoku4")
    return run_task(model, task, task.examples("test", N, seed=0), task_config(model, task, **overrides), seed=0)


def test_cli_run_matches_evaluate_and_logs_steps_per_sample(task_dir, tmp_path, capsys):
    # calibrated Prophet on tiny-dream through lm-eval's own CLI, samples logged
    cal = DREAM / "calibration.json"
    out = tmp_path / "out"
    job = load_job("lm_eval")
    got = job.main(["--model", "prophet", "--model_args",
                    f"model={DREAM},gen_length=24,steps=24,confidence_eos_eot_inf=true,batch_size=128,"
                    f"calibration={cal}", "--tasks", "prophet_sudoku4", "--include_path", str(task_dir),
                    "--log_samples", "--output_path", str(out)])
    model, task = load_model(DREAM), get_task("sudoku4")
    ref = run_task(model, task, task.examples("test", N, seed=0), task_config(model, task).with_calibration(cal))
    assert ref.mean_steps < task.budget.steps  # the rule did stop early: the steps are worth checking
    metric = got["results"]["results"]["prophet_sudoku4"]["exact_match,none"]
    assert metric == pytest.approx(ref.accuracy)
    summary = got["prophet"]["prophet_sudoku4"]
    assert summary["n"] == N and summary["mean_steps"] == pytest.approx(ref.mean_steps, abs=1e-4)
    assert summary["speedup"] == pytest.approx(ref.speedup, abs=1e-3)
    text = capsys.readouterr().out
    assert "prophet summary | prophet_sudoku4 | exact_match,none=" in text and "speed-up" in text
    # per-sample steps and forward tokens in lm-eval's own samples file, in prompt order
    [samples] = list(out.rglob("samples_prophet_sudoku4_*.jsonl"))
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    stats = [r["arguments"]["gen_args_0"]["arg_2"]["prophet"][0] for r in rows]
    assert [s["steps_used"] for s in stats] == list(ref.steps)
    assert [s["forward_tokens"] for s in stats] == list(ref.forward_tokens)
    assert [bool(r["exact_match"]) for r in rows] == list(ref.correct)


def test_simple_evaluate_with_an_instance_matches_evaluate(task_manager):
    # two steps: accuracy strictly between one-shot and Full, so equality is not 1.0 == 1.0 by luck
    from lm_eval import simple_evaluate

    lm = ProphetLM(model=str(LLADA), gen_length=24, steps=2, confidence_eos_eot_inf=True, batch_size=8)
    res = simple_evaluate(model=lm, tasks=["prophet_sudoku4"], task_manager=task_manager)
    ref = reference(LLADA, steps=2)
    assert res["results"]["prophet_sudoku4"]["exact_match,none"] == pytest.approx(ref.accuracy)
    assert lm.summary()["prophet_sudoku4"]["mean_steps"] == pytest.approx(ref.mean_steps)
    assert lm.summary()["prophet_sudoku4"]["speedup"] == pytest.approx(1.0)  # budget is the config's 2 steps


def test_simple_evaluate_on_the_tiny_block_model_matches_evaluate(task_manager):
    # the shipped block-diffusion model through lm-eval: its family's host, LLaDA2's threshold rule,
    # the same accuracy, steps and forward tokens as jobs/evaluate.py's run of those prompts
    from lm_eval import simple_evaluate

    lm = ProphetLM(model=str(LLADA2), gen_length=24, steps=24, rule="confidence_threshold", batch_size=8)
    res = simple_evaluate(model=lm, tasks=["prophet_sudoku4"], task_manager=task_manager)
    ref = reference(LLADA2, rule="confidence_threshold")
    assert lm.config_for(24).host == "block"
    assert res["results"]["prophet_sudoku4"]["exact_match,none"] == pytest.approx(ref.accuracy)
    assert ref.accuracy > 0.5  # a trained model: the comparison is not of two failures
    summary = lm.summary()["prophet_sudoku4"]
    assert summary["mean_steps"] == pytest.approx(ref.mean_steps)
    assert summary["mean_forward_tokens"] == pytest.approx(float(sum(ref.forward_tokens)) / N)


def test_model_args_are_coerced_to_decode_config_fields():
    cfg = build_config({"rule": "prophet", "thresholds": "7/5/2.5", "cache": None, "block_length": 8,
                        "steps": 24, "region": "block", "continuous": "false"}, "dream", max_gen_toks=24)
    assert (cfg.rule, cfg.thresholds, cfg.cache, cfg.block_length, cfg.host) == \
        ("prophet", (7.0, 5.0, 2.5), "none", 8, "dream")
    assert cfg.continuous is False and cfg.gen_length == 24
    assert build_config({"thresholds": "paper"}, "llada").thresholds == PRESETS["paper"]
    # a calibration file sets the rule; explicit fields win over it
    cal = build_config({"gen_length": 24, "quantile": 0.3, "confidence_eos_eot_inf": True}, "llada",
                       calibration=LLADA / "calibration.json")
    assert cal.rule == "prophet" and cal.quantile == 0.3
    # another sampling path (EOS ordering) keeps the thresholds' meaning: a warning, not a refusal
    with pytest.warns(CalibrationWarning, match="confidence_eos_eot_inf .calibrated True, here False"):
        build_config({"gen_length": 24}, "llada", calibration=LLADA / "calibration.json")
    with pytest.raises(ConfigError, match="gen_length .calibrated 24, here 32"):  # another window: refused
        build_config({"gen_length": 32, "confidence_eos_eot_inf": True}, "llada",
                     calibration=LLADA / "calibration.json")
    with pytest.raises(ConfigError, match="stepz"):
        build_config({"stepz": 3}, "llada")
    with pytest.raises(ConfigError, match="steps"):
        build_config({"steps": "many"}, "llada")
    with pytest.raises(ConfigError, match="cache"):
        build_config({"cache": "triple"}, "llada")
    with pytest.raises(ConfigError, match="thresholds"):
        build_config({"thresholds": "high/low"}, "llada")


def test_cli_batch_size_default_keeps_the_slots():
    lm = ProphetLM.create_from_arg_string(f"model={LLADA}", {"batch_size": 1, "device": "cuda:0"})
    assert lm.config_for(24).batch_size == 32  # the CLI's default 1 would decode one row at a time
    assert ProphetLM.create_from_arg_obj({"model": str(LLADA)}, {"batch_size": 16}).config_for(24).batch_size == 16
    assert ProphetLM.create_from_arg_obj({"model": str(LLADA), "batch_size": 4},
                                         {"batch_size": 16}).config_for(24).batch_size == 4


def test_generate_until_batches_by_config_and_honours_until_and_max_gen_toks(monkeypatch):
    from lm_eval.api.instance import Instance

    import prophet.lmeval as lmeval

    calls = []
    real = lmeval.decode

    def spy(model, prompts, config, **kw):
        calls.append((len(prompts), config.gen_length))
        return real(model, prompts, config, **kw)

    monkeypatch.setattr(lmeval, "decode", spy)
    task = get_task("sudoku4")
    exs = task.examples("test", 6, seed=0)
    kwargs = [{"until": [], "max_gen_toks": 24}, {"until": ["3"], "max_gen_toks": 24},
              {"until": [], "max_gen_toks": 16}, {"until": "2", "max_gen_toks": 16},
              {"until": [], "max_gen_toks": 24}, {"until": [], "max_gen_toks": 16}]
    reqs = [Instance("generate_until", {}, (e.prompt, kw), i, ("t", i, 1)) for i, (e, kw) in enumerate(zip(exs, kwargs))]
    lm = ProphetLM(model=str(LLADA), confidence_eos_eot_inf=True)
    texts = lm.generate_until(reqs)
    assert sorted(calls) == [(3, 16), (3, 24)]  # one decode per window, all its rows at once
    full = [t for t, kw in zip(texts, kwargs) if kw == {"until": [], "max_gen_toks": 24}]
    assert all(task.score(e.prompt, t) for e, t in zip([exs[0], exs[4]], full))
    assert "3" not in texts[1] and exs[1].answer.startswith(texts[1])
    assert "2" not in texts[3]
    # gen_length fixed in model_args: max_gen_toks cuts the text
    lm = ProphetLM(model=str(LLADA), gen_length=24, steps=24, confidence_eos_eot_inf=True)
    [short] = lm.generate_until([Instance("generate_until", {}, (exs[0].prompt, {"max_gen_toks": 5}), 0)])
    assert short == exs[0].answer[:5]
    assert cut_at_until("abcabc", ["c", "", "b"]) == "a"


def test_mc_loglikelihood_is_exact_for_one_token_and_seeded():
    model = load_model(LLADA)
    ex = get_task("sudoku4").examples("test", 1, seed=0)[0]
    prefix, answer = model.encode(ex.prompt), model.encode(ex.answer)
    # one target token: every sample masks it, with ratio 1, so the estimate is log p exactly
    ids = torch.tensor([prefix + [model.mask_id]])
    exact = torch.log_softmax(model.logits(ids, None, last=1)[0, 0].float(), -1)[answer[0]].item()
    assert mc_loglikelihood(model, prefix, answer[:1], 4, 2, seed=0) == pytest.approx(exact, abs=1e-5)
    a = mc_loglikelihood(model, prefix, answer, 8, 4, seed=3)
    assert a == mc_loglikelihood(model, prefix, answer, 8, 4, seed=3) and math.isfinite(a)
    wrong = "".join("1" if c != "1" else "2" for c in ex.answer)  # every cell changed
    assert a > mc_loglikelihood(model, prefix, model.encode(wrong), 8, 4, seed=3)


def test_loglikelihood_requests_and_rolling_refusal():
    from lm_eval.api.instance import Instance

    lm = ProphetLM(model=str(LLADA), mc_num=4, mc_batch=4, check_greedy=True)
    ex = get_task("sudoku4").examples("test", 1, seed=0)[0]
    wrong = ex.answer[::-1] if ex.answer[::-1] != ex.answer else "1" * 16
    reqs = [Instance("loglikelihood", {}, (ex.prompt, c), i) for i, c in enumerate((ex.answer, wrong))]
    (ll_right, greedy_right), (ll_wrong, greedy_wrong) = lm.loglikelihood(reqs)
    assert ll_right > ll_wrong and greedy_right and not greedy_wrong
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (ex.prompt,), 0)])


MC_YAML = """\
task: prophet_sudoku4_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{[answer, wrong]}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_choice_task(directory: Path) -> None:
    """A multiple-choice task: each held-out puzzle's grid against one with every cell changed."""
    exs = get_task("sudoku4").examples("test", 8, seed=0)
    data = directory / "choice.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer,
                                        "wrong": "".join("1" if c != "1" else "2" for c in e.answer)}) + "\n"
                            for e in exs))
    (directory / "prophet_sudoku4_choice.yaml").write_text(MC_YAML.format(data=json.dumps(str(data))))


def test_multiple_choice_task_through_lm_eval_uses_the_mc_loglikelihood(task_manager):
    # lm-eval's own loglikelihood requests (context, continuation) through the MC estimate
    from lm_eval import simple_evaluate

    lm = ProphetLM(model=str(LLADA), mc_num=4, mc_batch=4)
    res = simple_evaluate(model=lm, tasks=["prophet_sudoku4_choice"], task_manager=task_manager)
    assert res["results"]["prophet_sudoku4_choice"]["acc,none"] == 1.0
