"""Security: no code runs that the user did not ask for; the input is never touched; the cluster stays closed.

- Remote code (a model directory's own Python) runs only with trust_remote_code AND a pinned
  40-hex revision; pickled checkpoints only with allow_pickle, and then only plain tensors.
- The output directory may not be the input, inside it, or hold it; --overwrite deletes only the
  pipeline's own parts.
- Config values are data: paths never reach a shell, YAML tags cannot build objects, and no
  module of the project calls a shell, eval or exec (a grep guard).
- cluster.yaml keeps the dashboard on localhost and Ray's token auth on.

None of these tests starts Ray: every refusal happens before any work is scheduled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from pipeline import output
from pipeline.config import JobConfigError, load_job_config
from pipeline.run import plan_job, prepare_output, run
from pipeline.schema import OUTPUT_SCHEMA
from prophet.models import ModelLoadError, load_model
from prophet.models.loading import SAFE_FILE, check_model_dir

ROOT = Path(__file__).resolve().parents[1]
PIN = "0123456789abcdef0123456789abcdef01234567"
# Written by the model directory's own code when (and only when) Python imports it.
REMOTE_CODE = '''import os
from pathlib import Path
Path(os.environ["PROPHET_TEST_MARKER"]).write_text("remote code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def no_log(_: str) -> None:
    """Swallow run()'s progress lines."""


def _tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (names relative to it)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _job(input_path: Path, out: Path, model_dir: Path, **over):
    return load_job_config(None, {"input.path": str(input_path), "output.dir": str(out), "model.dir": str(model_dir),
                                  "decoding.gen_length": 8, "decoding.steps": 8, **over})


@pytest.fixture
def prompts(tmp_path) -> Path:
    """A small JSONL input in its own directory."""
    src = tmp_path / "in" / "p.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps({"prompt": f"S:{i}="}) + "\n" for i in range(4)))
    return src


@pytest.fixture
def remote_code_dir(tmp_path, tiny_model_dir) -> Path:
    """A directory whose config.json points transformers at its own evil_code.py (auto_map)."""
    d = tmp_path / "remote"
    d.mkdir()
    (d / "evil_code.py").write_text(REMOTE_CODE)
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil_code.EvilConfig", "AutoModelForMaskedLM": "evil_code.EvilModel"}}))
    shutil.copy(tiny_model_dir / SAFE_FILE, d / SAFE_FILE)
    shutil.copy(tiny_model_dir / "tokenizer.json", d / "tokenizer.json")
    return d


# ----------------------------------------------------------------------------- remote code

@pytest.mark.parametrize("trust, revision", [(False, None), (False, PIN), (True, None), (True, "main"),
                                             (True, PIN[:12])])
def test_remote_code_never_runs_without_the_flag_and_a_full_pinned_revision(remote_code_dir, tmp_path,
                                                                           monkeypatch, trust, revision):
    marker = tmp_path / "marker"
    monkeypatch.setenv("PROPHET_TEST_MARKER", str(marker))
    with pytest.raises(ModelLoadError, match="40-hex commit|unknown model_type"):
        load_model(remote_code_dir, trust_remote_code=trust, revision=revision)
    with pytest.raises(ModelLoadError):
        check_model_dir(remote_code_dir, trust_remote_code=trust, revision=revision)
    assert not marker.exists()


def test_a_job_asking_for_remote_code_without_a_pin_is_refused_naming_the_field(remote_code_dir, prompts,
                                                                                tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("PROPHET_TEST_MARKER", str(marker))
    cfg = _job(prompts, tmp_path / "out", remote_code_dir, **{"model.trust_remote_code": True})
    with pytest.raises(JobConfigError, match=r"model\.revision: .*40-hex"):
        run(cfg, log=no_log)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_with_the_flag_and_a_pinned_revision_the_directory_code_is_what_runs(remote_code_dir, tmp_path):
    """The other side of the gate: flag + pin is what lets the code in (in a subprocess, own module cache)."""
    marker = tmp_path / "marker"
    code = (f"from prophet.models import load_model\n"
            f"try:\n    load_model({str(remote_code_dir)!r}, trust_remote_code=True, revision={PIN!r})\n"
            f"except Exception as e:\n    print(type(e).__name__)\n")
    env = {**os.environ, "PROPHET_TEST_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert marker.read_text() == "remote code ran"  # evil_code.EvilModel is missing, so the load then fails


# ----------------------------------------------------------------------------- pickles

@pytest.fixture
def pickled_dir(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with its weights as a pickled state dict (pytorch_model.bin) instead of safetensors."""
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    torch.save(load_file(d / SAFE_FILE), d / "pytorch_model.bin")
    (d / SAFE_FILE).unlink()
    return d


def test_pickled_weights_are_refused_unless_allowed_and_then_equal_the_safetensors(pickled_dir, tiny_model_dir,
                                                                                  prompts, tmp_path):
    with pytest.raises(ModelLoadError, match="pickled checkpoints .* refused"):
        load_model(pickled_dir)
    with pytest.raises(JobConfigError, match=r"model\.dir: .*pickled"):
        run(_job(prompts, tmp_path / "out", pickled_dir), log=no_log)
    assert not (tmp_path / "out").exists()
    plan_job(_job(prompts, tmp_path / "out", pickled_dir, **{"model.allow_pickle": True}))  # opt-in accepted
    allowed, safe = load_model(pickled_dir, allow_pickle=True), load_model(tiny_model_dir)
    ids = torch.tensor([safe.encode("S:12=") + [safe.mask_id] * 4])
    assert torch.equal(allowed.logits(ids, torch.ones_like(ids)), safe.logits(ids, torch.ones_like(ids)))


def test_an_allowed_pickle_that_carries_code_is_refused_and_nothing_in_it_runs(tmp_path, tiny_model_dir):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, d)
    (d / SAFE_FILE).unlink()
    torch.save({"model.transformer.wte.weight": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin holds more than plain tensors.*posix\.system"):
        load_model(d, allow_pickle=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------- input and output paths

@pytest.mark.parametrize("where", ["same dir", "inside", "holds the input", "the input file", "symlink to input"])
def test_the_output_may_not_be_the_input_inside_it_or_hold_it(prompts, tmp_path, tiny_model_dir, where):
    inp = prompts.parent
    out = {"same dir": inp, "inside": inp / "out", "holds the input": tmp_path, "the input file": prompts,
           "symlink to input": tmp_path / "link"}[where]
    if where == "symlink to input":
        out.symlink_to(inp, target_is_directory=True)
    before = _tree_digest(inp)
    with pytest.raises(JobConfigError, match=r"^output\.dir: .*(is the input or inside it|holds the input)"):
        run(_job(inp, out, tiny_model_dir, **{"output.overwrite": True}), log=no_log)
    assert _tree_digest(inp) == before and sorted(p.name for p in inp.iterdir()) == ["p.jsonl"]


def test_overwrite_deletes_only_the_pipelines_own_parts(prompts, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "train-00000-of-00001.parquet"  # someone's data set, not written by the pipeline
    theirs.write_bytes(b"PAR1 user data PAR1")
    cfg = _job(prompts, out, tiny_model_dir, **{"output.overwrite": True})
    with pytest.raises(JobConfigError, match="Parquet files this pipeline did not write .*train-00000"):
        prepare_output(plan_job(cfg))
    assert theirs.read_bytes() == b"PAR1 user data PAR1"
    theirs.unlink()
    table = pa.Table.from_pylist([{"id": "a", "status": "ok"}], schema=OUTPUT_SCHEMA)
    output.write_part(table, str(out), output.part_name(output.new_run_id(), 0))
    (out / "notes.txt").write_text("kept")
    output.write_manifest(str(out), {"status": "complete"})
    assert prepare_output(plan_job(cfg)) == (None, False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- config values are data

def test_paths_with_shell_syntax_are_plain_paths(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a shell would create the marker here
    marker = tmp_path / "PWNED"
    odd = tmp_path / "in; touch PWNED $(touch PWNED) `touch PWNED` | touch PWNED"
    odd.mkdir()
    (odd / "p.jsonl").write_text(json.dumps({"prompt": "S:1="}) + "\n")
    plan = plan_job(_job(odd, tmp_path / "out && touch PWNED", tiny_model_dir))
    assert plan.fmt == "jsonl" and plan.cfg.input.path == str(odd)
    assert not marker.exists()


def test_yaml_tags_cannot_build_objects_or_run_commands(tmp_path):
    marker = tmp_path / "marker"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: !!python/object/apply:os.system ['touch {marker}']}}\n"
                   f"output: {{dir: {tmp_path}/o}}\nmodel: {{dir: {tmp_path}/m}}\n")
    with pytest.raises(JobConfigError, match="not valid YAML"):
        load_job_config(job)
    assert not marker.exists()


FORBIDDEN = {
    "a shell": re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "unsafe YAML": re.compile(r"yaml\.(unsafe_)?load\(|yaml\.Loader|UnsafeLoader"),
    "pickle": re.compile(r"pickle\.loads?\(|dill\.|cloudpickle\.loads?\("),
}


def test_no_module_calls_a_shell_eval_exec_or_an_unsafe_loader():
    """A guard: config values (paths, names) can only ever be data in this code base."""
    found = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("jobs/**/*.py"), *ROOT.glob("prophet/**/*.py")]):
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            found += [f"{path.relative_to(ROOT)}:{lineno}: {what}: {line.strip()}"
                      for what, rx in FORBIDDEN.items() if rx.search(code)]
            if "torch.load(" in code and "weights_only=True" not in code:
                found.append(f"{path.relative_to(ROOT)}:{lineno}: torch.load without weights_only=True")
    assert found == []


# ----------------------------------------------------------------------------- cluster.yaml

def _start_commands(config: dict) -> list[str]:
    keys = ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "initialization_commands")
    return [" ".join(str(c).split()) for k in keys for c in (config.get(k) or [])]


def test_cluster_yaml_keeps_the_dashboard_on_localhost_and_token_auth_on():
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    commands = _start_commands(config)
    starts = [c for c in commands if "ray start" in c]
    heads = [c for c in starts if "--head" in c]
    assert heads and len(starts) >= 2
    # the dashboard (and the job API behind it) listens on loopback only; reach it by `ray dashboard`
    hosts = [h for c in heads for h in re.findall(r"--dashboard-host[= ](\S+)", c)]
    assert hosts and set(hosts) <= {"127.0.0.1", "localhost"}
    assert "0.0.0.0" not in text
    # token auth stays on: every `ray start` runs with RAY_AUTH_MODE=token, nothing disables it
    assert all("RAY_AUTH_MODE=token" in c for c in starts)
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text)
    # no provider rule opens a port to the world (the launcher's default group allows SSH only)
    provider = json.dumps(config.get("provider", {})) + json.dumps(config.get("available_node_types", {}))
    assert "0.0.0.0/0" not in provider and "8265" not in provider
