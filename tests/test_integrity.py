"""No row lost, none written twice (issue 17): the output proves it holds every input id, and one run
at a time writes into an output.

- completeness: the ids the driver expects equal what the job's readers give, per format, with
  samples and null ids; a part deleted from a finished output is redone by the rerun, not trusted away;
- rows_per_file is a maximum per part;
- the output's lock: two real processes racing for it, a job refused while another process holds it
  (exit 2, nothing started), a dead holder's lock taken over, a live one's only with --break-lock,
  a run whose lock was taken over finding out;
- a chat template that always raises, and a pad id outside the vocabulary, refused before Ray.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import completeness, lock, output
from pipeline import io as pio
from pipeline.config import JobConfigError, load_job_config
from pipeline.run import run
from pipeline.schema import OUTPUT_SCHEMA

from tests.test_reliability import ROOT, job, no_log, read_ids, write_prompts

GOOD = "S:1.3.2.4.3.1.4.2="


def reader_ids(cfg, fmt: str, num_samples: int = 1) -> list[str]:
    """The ids the job's own read path gives (Ray Data's file paths, the format's reader, ids_not_done)."""
    root = pio.normalize_root(cfg.path)
    done = pa.array([], pa.string())
    if fmt == "hf":
        chunks = list(pio.read_hf_range(cfg.path, 0, pio.hf_num_rows(cfg.path)))
    else:
        chunks = []
        for file in pio.input_files(Path(cfg.path), fmt):
            with open(file, "rb") as fh:
                raw = pio._maybe_gunzip(fh, file)
                chunks += list(pio.read_file(fmt, raw, pio.relative_name(os.path.abspath(file), root), cfg.prompt_column))
    return [i for c in chunks for i in pio.ids_not_done(c, cfg.id_column, done, None, num_samples)
            .column("id").to_pylist()]


def _inputs(tmp: Path) -> dict[str, tuple[Path, dict]]:
    d = tmp / "jsonl"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"prompt": "x", "k": "a1"}\n\n{broken\n{"prompt": "y", "k": null}\n')
    (d / "sub").mkdir()
    (d / "sub" / "b.jsonl").write_text('{"prompt": "z", "k": "b1", "id": "not the id"}\n')
    (tmp / "c.csv").write_text('prompt,k\n"multi\nline",c1\nshort\n')
    pq.write_table(pa.table({"prompt": ["p"] * 25, "k": [f"q{i}" if i % 7 else None for i in range(25)]}),
                   tmp / "p.parquet", row_group_size=10)
    import datasets

    datasets.Dataset.from_dict({"prompt": ["h"] * 5, "k": ["h0", "h1", "", "h3", "h4"]}).save_to_disk(str(tmp / "hf"))
    return {"jsonl": (d, {}), "jsonl, id column": (d, {"input.id_column": "k"}), "csv": (tmp / "c.csv", {}),
            "parquet": (tmp / "p.parquet", {}), "parquet, id column": (tmp / "p.parquet", {"input.id_column": "k"}),
            "hf, id column": (tmp / "hf", {"input.id_column": "k"})}


@pytest.mark.parametrize("samples", [1, 3])
def test_the_expected_ids_are_the_ids_the_readers_give(tmp_path, tiny_model_dir, samples):
    for case, (src, over) in _inputs(tmp_path).items():
        cfg = job(src, tmp_path / "out", tiny_model_dir, **over).input
        fmt = pio.detect_format(cfg)
        expected = completeness.input_ids(cfg, fmt, samples)
        assert expected.ids.to_pylist() == reader_ids(cfg, fmt, samples), case
        assert len(set(expected.ids.to_pylist())) == len(expected), case


def test_the_check_counts_missing_and_repeated_ids_and_accepts_a_rows_key(tmp_path):
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out")
    rows = lambda ids: pa.Table.from_pylist([{"id": i, "status": "ok"} for i in ids], schema=OUTPUT_SCHEMA)  # noqa: E731
    expected = completeness.InputIds(pa.array(["a", "b", "c", "d"]), pa.array(["f:0", "f:1", "f:2", "f:3"]))
    output.write_part(rows(["a", "b"]), out, output.part_name("r", 0))
    output.write_part(rows(["b", "f:2"]), out, output.part_name("r", 1))  # c written under its key
    found = completeness.check(expected, out)
    assert (found.input_ids, found.output_ids, found.missing_ids, found.duplicate_rows) == (4, 3, 1, 1)
    assert found.missing_examples == ["d"] and not found.complete


@pytest.mark.ray
def test_parts_hold_at_most_rows_per_file_and_a_deleted_part_is_redone_by_the_rerun(ray_local, tmp_path,
                                                                                     tiny_model_dir, task_rows):
    n = 20
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    cfg = job(src, out, tiny_model_dir, **{"execution.rows_per_file": 6})
    first = run(cfg, log=no_log)
    sizes = sorted(pq.read_metadata(p).num_rows for p in output.part_files(str(out)))
    assert max(sizes) <= 6 and sum(sizes) == n and len(sizes) >= 4  # 20 rows: parts of at most 6, not one of 20
    assert (first.status, first.input_ids, first.output_ids, first.missing_ids) == ("complete", n, n, 0)
    assert output.read_manifest(str(out))["rows"]["missing_ids"] == 0

    gone = output.part_files(str(out))[0]
    lost = set(pq.read_table(gone, columns=["id"]).column("id").to_pylist())
    os.remove(gone)  # the manifest still says complete
    logged: list[str] = []
    again = run(cfg, log=logged.append)
    assert any(f"parts hold {n - len(lost)} of the input's {n} ids" in line for line in logged), logged
    assert (again.status, again.rows, again.skipped) == ("complete", len(lost), n - len(lost))
    assert {i for p in output.part_files(str(out)) if again.run_id in p
            for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()} == lost  # exactly what was lost
    assert sorted(read_ids(out)) == sorted(f"p.jsonl:{i}" for i in range(n))
    third = run(cfg, log=no_log)
    assert (third.status, third.output_ids, third.input_ids) == ("nothing to do", n, n)


# ----------------------------------------------------------------------------- the lock

HOLD = """
import sys, time
from pipeline.lock import OutputLock
lock = OutputLock(sys.argv[1], sys.argv[2], log=lambda _: None)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""

RACE = """
import sys, time
from pipeline.lock import OutputLock, OutputLocked
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
    OutputLock(sys.argv[1], sys.argv[2], log=lambda _: None).acquire()
    print("won")
except OutputLocked:
    print("refused")
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_of_processes_racing_for_an_outputs_lock_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for round_ in range(2):
        start = time.time() + 3  # every process is past its imports by then
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(out), f"r{round_}-{i}", str(start)], env=_env(),
                                  stdout=subprocess.PIPE, text=True) for i in range(4)]
        results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert results == ["refused", "refused", "refused", "won"], results
        (out / lock.LOCK_NAME).unlink()  # the winner exited without releasing: its lock stays until removed


def test_a_job_into_an_output_another_process_holds_is_refused_then_the_dead_holders_lock_is_taken_over(
        tmp_path, tiny_model_dir):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": GOOD}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "first-run"], env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "jobs/generate.py", "--input", str(src), "--output", str(out),
                                 "--model", str(tiny_model_dir), "--engine", "torch", "--gen-length", "8",
                                 "--steps", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"error: output.dir: {out} is in use by run first-run (host ")
        assert f"pid {holder.pid}, started " in second.stderr and "--break-lock" in second.stderr
        assert "Traceback" not in second.stderr and "Ray" not in second.stdout  # nothing started
        assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_NAME]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    logged: list[str] = []
    taken = lock.OutputLock(str(out), "third-run", log=logged.append)
    taken.acquire()  # the holder is dead: same host, its pid gone
    assert "took over the lock of run first-run" in logged[0] and f"process {holder.pid}" in logged[0]
    taken.release()
    assert not (out / lock.LOCK_NAME).exists()


def _foreign_lock(out: Path, age_s: float) -> None:
    now = time.time()
    h = lock.Holder("elsewhere", "other-host", 4242, None, now - age_s - 60, now - age_s, ["generate.py"])
    out.mkdir(exist_ok=True)
    (out / lock.LOCK_NAME).write_bytes(h.to_bytes())


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh_and_break_lock_takes_it(tmp_path):
    out = tmp_path / "out"
    _foreign_lock(out, age_s=10)
    with pytest.raises(lock.OutputLocked, match=r"in use by run elsewhere \(host other-host, pid 4242, .*"
                                                r"last heartbeat 10s ago\).*--break-lock"):
        lock.OutputLock(str(out), "mine", log=no_log).acquire()
    logged: list[str] = []
    forced = lock.OutputLock(str(out), "mine", log=logged.append)
    forced.acquire(break_lock=True)
    assert "took over the lock of run elsewhere" in logged[0] and "--break-lock" in logged[0]
    forced.release()

    _foreign_lock(out, age_s=lock.STALE_S + 5)  # the other host's run died: its heartbeat stopped
    logged.clear()
    stale = lock.OutputLock(str(out), "mine", log=logged.append)
    stale.acquire()
    assert "heartbeat is" in logged[0] and "old" in logged[0]
    stale.release()


def test_a_run_whose_lock_is_taken_over_finds_out_and_leaves_the_new_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "out"
    out.mkdir()
    first = lock.OutputLock(str(out), "first", log=no_log)
    first.acquire()
    time.sleep(0.3)
    beat = json.loads((out / lock.LOCK_NAME).read_text())["heartbeat_at"]
    assert time.time() - beat < 0.3  # the heartbeat refreshes the lock
    second = lock.OutputLock(str(out), "second", log=no_log)
    second.acquire(break_lock=True)
    time.sleep(0.3)
    assert first.lost is not None and "taken over by run second" in first.lost
    first.release()
    assert json.loads((out / lock.LOCK_NAME).read_text())["run_id"] == "second"
    second.release()
    assert not (out / lock.LOCK_NAME).exists()


# ----------------------------------------------------------------------------- refused before Ray

def _model_copy(tmp: Path, model_dir: Path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(model_dir, tmp / name))


def test_a_chat_template_that_always_raises_is_refused_before_ray_with_its_own_message(tmp_path, tiny_model_dir):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": GOOD}) + "\n" for _ in range(3)))
    model = _model_copy(tmp_path, tiny_model_dir, "m")
    (model / "chat_template.jinja").write_text("{{ raise_exception('Only user and assistant roles are supported') }}")
    with pytest.raises(JobConfigError, match=r"^model\.dir: the chat template of .* failed on each of the first 3 "
                                             r"rows .*TemplateError: Only user and assistant roles are supported\. "
                                             r".*input\.chat_template: never"):
        run(job(src, tmp_path / "out", model), log=no_log)
    assert not (tmp_path / "out").exists()
    # a template that fails on some rows only is the rows' business (error rows), not the job's
    (model / "chat_template.jinja").write_text(
        "{% if 'bad' in messages[0]['content'] %}{{ raise_exception('bad row') }}{% endif %}"
        "{{ messages[0]['content'] }}")
    src.write_text(json.dumps({"prompt": "bad"}) + "\n" + json.dumps({"prompt": GOOD}) + "\n")
    from pipeline.run import plan_job

    assert plan_job(job(src, tmp_path / "out", model)).chat_template


@pytest.mark.parametrize("key", ["pad_token_id", "mask_token_id", "eos_token_id"])
def test_a_special_id_outside_the_vocabulary_is_refused_at_load_naming_the_key(tmp_path, tiny_model_dir, key):
    from prophet.models import ModelLoadError, load_model

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": GOOD}) + "\n")
    model = _model_copy(tmp_path, tiny_model_dir, "m")
    config = json.loads((model / "config.json").read_text())
    config[key] = 999
    (model / "config.json").write_text(json.dumps(config))
    pattern = rf"config\.json: {key} 999 is outside the vocabulary \(ids 0\.\.101.*set {key} in config\.json"
    with pytest.raises(JobConfigError, match=r"^model\.dir: " + pattern):
        run(job(src, tmp_path / "out", model), log=no_log)
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(model)


def test_on_other_file_systems_the_lock_is_a_checked_write_and_a_compare_before_swap():
    from pyarrow.fs import _MockFileSystem

    fs = _MockFileSystem()
    fs.create_dir("out")
    a, b = lock._ArrowFile(fs, f"out/{lock.LOCK_NAME}"), lock._ArrowFile(fs, f"out/{lock.LOCK_NAME}")
    token = a.create(b"run a")
    assert token == b"run a" and b.create(b"run b") is None
    assert b.swap(b"stale token", b"run b") is None and a.read()[0] == b"run a"
    assert a.swap(token, b"run a, beat") == b"run a, beat"
    assert a.swap(b"run a, beat", None) == b"" and a.read() is None
