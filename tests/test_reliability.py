"""Faults on a local Ray: killed actors, a killed driver, an output that turns unwritable, a full disk,
a model that returns NaN/inf. Each ends with every id exactly once (after a rerun where the fault
stops the job), and with a clear error where the job cannot go on.

All Ray runs share the session Ray of conftest.py and use one small CPU actor.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_support import actor_processes

from pipeline import output
from pipeline.actor import GenerateActor
from pipeline.config import JobConfig, JobConfigError, load_job_config
from pipeline.run import PipelineError, Resources, actor_spec, plan_job, run
from pipeline.schema import OUTPUT_SCHEMA
from prophet.models import Tokenizer
from prophet.models.loading import SAFE_FILE

ROOT = Path(__file__).resolve().parents[1]


def no_log(_: str) -> None:
    """Swallow run()'s progress lines."""


def job(src: Path, out: Path, model_dir: Path, **over) -> JobConfig:
    """One actor on half a CPU, torch engine, small blocks and parts so that rows flow steadily."""
    base = {"input.path": str(src), "output.dir": str(out), "model.dir": str(model_dir), "model.engine": "torch",
            "decoding.gen_length": 8, "decoding.steps": 8, "decoding.batch_size": 8, "execution.actors": 1,
            "execution.cpus_per_actor": 0.5, "execution.batch_size": 8, "execution.rows_per_file": 8}
    return load_job_config(None, {**base, **over})


def write_prompts(path: Path, task_rows: list[dict], n: int) -> Path:
    """n rows cycling over the task prompts (ids derive from the line, so duplicates are distinct rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(task_rows[i % len(task_rows)]) + "\n" for i in range(n)))
    return path


def read_ids(out: Path) -> list[str]:
    """Every id in the visible parts of an output directory."""
    return [i for p in output.part_files(str(out)) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def assert_every_id_once(out: Path, n: int, name: str) -> pa.Table:
    """The output holds ids name:0 .. name:n-1, each exactly once; returns all its rows."""
    table = pa.concat_tables([pq.read_table(p) for p in output.part_files(str(out))])
    ids = table.column("id").to_pylist()
    assert len(ids) == n and set(ids) == {f"{name}:{i}" for i in range(n)}
    return table


def actor_pids() -> list[int]:
    """PIDs of live GenerateActor processes."""
    return actor_processes("GenerateActor")


def pool_actors() -> dict[str, dict]:
    """The session's GenerateActor pool actors ever created, by actor id (the GCS table, dead ones too)."""
    from ray._private.state import actors

    return {aid: a for aid, a in actors().items() if "GenerateActor" in a.get("ActorClassName", "")}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- killed processes

@pytest.mark.ray
def test_an_actor_killed_three_times_mid_batch_loses_no_row_and_duplicates_none(ray_local, tmp_path, tiny_model_dir,
                                                                                task_rows):
    n = 1200
    src = write_prompts(tmp_path / "many.jsonl", task_rows, n)
    cfg = job(tmp_path / "many.jsonl", tmp_path / "out", tiny_model_dir)
    killed: list[int] = []

    def killer() -> None:
        # One actor: while rows remain it is always inside a batch. Each incarnation is killed once
        # it has written two more parts, so every kill lands mid-job and the pool must restart it.
        parts_at_last_kill = 0
        deadline = time.time() + 240
        while len(killed) < 3 and time.time() < deadline:
            pids = [p for p in actor_pids() if p not in killed]
            parts = len(output.part_files(cfg.output.dir))
            if pids and parts >= parts_at_last_kill + 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                parts_at_last_kill = parts
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    before = set(pool_actors())
    s = run(cfg, log=no_log)
    thread.join(timeout=5)
    assert len(killed) == 3, f"only {len(killed)} kills landed before the job ended"
    table = assert_every_id_once(tmp_path / "out", n, src.name)
    assert (s.status, s.rows, s.ok, s.unique_ids) == ("complete", n, n, n)
    workers = {int(w.rsplit(":", 1)[1]) for w in table.column("worker_id").to_pylist()}
    assert workers & set(killed) and workers - set(killed)  # killed while working; a restart finished the job
    # Ray restarted the same actor (not a new one in its place): its __init__ ran again on the constructor
    # arguments Ray warns about (pipeline/console.py). The third kill may land as the job ends, before Ray
    # has recorded (or needed) that restart, so at least the first two are counted.
    restarts = [a["NumRestarts"] for aid, a in pool_actors().items() if aid not in before]
    assert len(restarts) == 1 and restarts[0] >= 2, restarts


def _job_args(src: Path, out: Path, model_dir: Path) -> list[str]:
    return [sys.executable, "jobs/generate.py", "--input", str(src), "--output", str(out), "--model", str(model_dir),
            "--engine", "torch", "--gen-length", "8", "--steps", "8", "--slots", "8", "--actors", "1",
            "--cpus-per-actor", "0.5", "--batch-size", "8", "--rows-per-file", "8"]


@pytest.mark.ray
def test_a_driver_killed_mid_run_then_the_same_command_resumes_only_what_is_missing(ray_local, tmp_path,
                                                                                    tiny_model_dir, task_rows):
    n = 600
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    # The driver joins the session's Ray, as a driver on a cluster does (`ray job submit` sets RAY_ADDRESS)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    first = subprocess.Popen(_job_args(src, out, tiny_model_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(output.part_files(str(out))) >= 3 or first.poll() is not None, 240, "rows to be written")
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # Ray ends a dead driver's job: its actor goes, and with it any write still in flight
    wait_for(lambda: not actor_pids(), 60, "the killed job's actor to stop")
    done_before = set(read_ids(out))
    assert 0 < len(done_before) < n and output.read_manifest(str(out))["status"] == "running"

    second = subprocess.run(_job_args(src, out, tiny_model_dir), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    # the job's last line on stdout is its summary; a driver on a cluster also gets the cluster's log lines
    summary = json.loads([ln for ln in second.stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["skipped"], summary["rows"]) == (len(done_before), n - len(done_before))
    assert (summary["total_rows"], summary["unique_ids"], summary["status"]) == (n, n, "complete")
    assert_every_id_once(out, n, src.name)
    rerun_ids = {i for p in output.part_files(str(out)) if summary["run_id"] in p
                 for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()}
    assert rerun_ids == {f"{src.name}:{i}" for i in range(n)} - done_before  # only what was missing
    assert output.read_manifest(str(out))["status"] == "complete"


# ----------------------------------------------------------------------------- the output directory

@pytest.mark.ray
def test_an_output_dir_that_becomes_unwritable_fails_clearly_and_the_rerun_completes(ray_local, tmp_path,
                                                                                     tiny_model_dir, task_rows):
    # Tests run as root, where chmod does not bite: the directory is moved away and a file takes its
    # place, so every later write fails (ENOTDIR) exactly as an unmounted or revoked directory would.
    n = 400
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out, moved = tmp_path / "out", tmp_path / "out.moved"
    cfg = job(src, out, tiny_model_dir)

    def break_it() -> None:
        wait_for(lambda: len(output.part_files(str(out))) >= 2, 240, "rows to be written")
        out.rename(moved)
        out.write_text("not a directory any more")

    thread = threading.Thread(target=break_it, daemon=True)
    thread.start()
    with pytest.raises(PipelineError, match=r"^output\.dir: cannot write part-.* into .*out: .*Not a directory.*"
                                            r"rerun the same command"):
        run(cfg, log=no_log)
    thread.join(timeout=5)
    out.unlink()
    moved.rename(out)
    kept = read_ids(out)
    assert 0 < len(kept) < n and len(set(kept)) == len(kept)
    assert not [p for p in out.iterdir() if p.name.endswith(output.TMP_SUFFIX)]
    again = run(cfg, log=no_log)
    assert (again.skipped, again.rows, again.total_rows, again.unique_ids) == (len(kept), n - len(kept), n, n)
    assert_every_id_once(out, n, src.name)


def test_an_output_dir_that_cannot_be_written_is_refused_before_ray(tmp_path, tiny_model_dir, task_rows):
    src = write_prompts(tmp_path / "p.jsonl", task_rows, 4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobConfigError, match=r"^output\.dir: cannot write to .*file/out"):
        run(job(src, tmp_path / "file" / "out", tiny_model_dir), log=no_log)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return p.returncode == 0


@pytest.mark.ray
def test_a_full_disk_fails_clearly_leaves_only_complete_parts_and_resumes_once_space_is_freed(
        ray_local, tmp_path, tiny_model_dir, task_rows):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "48k"):
        pytest.skip("cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN); "
                    "test_a_part_write_that_hits_enospc_leaves_nothing_behind covers the writer")
    try:
        n = 300
        src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
        cfg = job(src, disk / "out", tiny_model_dir)
        with pytest.raises(PipelineError, match=r"^output\.dir: cannot write part-.*No space left on device"):
            run(cfg, log=no_log)
        kept = read_ids(disk / "out")
        assert len(kept) < n and len(set(kept)) == len(kept)  # whatever is visible is complete and readable
        assert not [p for p in (disk / "out").iterdir() if p.name.startswith(".part-")]  # temp part deleted
        assert output.read_manifest(str(disk / "out"))["status"] != "complete"
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = run(cfg, log=no_log)
        assert (again.skipped, again.rows, again.total_rows) == (len(kept), n - len(kept), n)
        assert_every_id_once(disk / "out", n, src.name)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_part_write_that_hits_enospc_leaves_nothing_behind(tmp_path, monkeypatch):
    """The writer alone, with ENOSPC injected (for machines where no tiny file system can be mounted)."""
    out = tmp_path / "out"
    out.mkdir()

    def disk_fills_up(table, sink, **_):
        sink.write(b"PAR1" + b"\0" * 512)  # some bytes reach the disk before it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.pq, "write_table", disk_fills_up)
    table = pa.Table.from_pylist([{"id": f"r{i}", "status": "ok", "prompt": "x" * 50} for i in range(50)],
                                 schema=OUTPUT_SCHEMA)
    with pytest.raises(output.OutputWriteError, match=r"^output\.dir: cannot write part-r-000000-000000\.parquet into .*"
                                                      r"No space left on device"):
        output.write_part(table, str(out), output.part_name("r", 0))
    assert list(out.iterdir()) == []  # neither a visible part nor its temp file
    monkeypatch.undo()
    assert output.write_part(table, str(out), output.part_name("r", 0)) == 50  # with room, it is written


# ----------------------------------------------------------------------------- non-finite logits

def _poisoned_copy(model_dir: Path, dest: Path) -> Path:
    """The model with NaN embeddings for '9' and +inf for '8': rows holding them get non-finite logits."""
    shutil.copytree(model_dir, dest)
    state = load_file(dest / SAFE_FILE)
    tok = Tokenizer.from_dir(dest)
    emb = next(k for k in state if k.endswith(("wte.weight", "embed_tokens.weight")))
    state[emb][tok.encode("9")[-1]] = float("nan")
    state[emb][tok.encode("8")[-1]] = float("inf")
    save_file(state, dest / SAFE_FILE, metadata={"format": "pt"})
    return dest


@pytest.mark.ray
def test_nan_and_inf_logits_end_as_error_rows_and_leave_the_other_rows_as_a_clean_model_decodes_them(
        ray_local, tmp_path, tiny_model_dir, task_rows):
    rows = [dict(r) for r in task_rows[:24]]
    for i in range(0, 24, 4):
        rows[i]["prompt"] = rows[i]["prompt"].replace(".", "9")   # NaN rows
        rows[i + 1]["prompt"] = rows[i + 1]["prompt"].replace(".", "8")  # inf rows
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    poisoned = _poisoned_copy(tiny_model_dir, tmp_path / "poisoned")
    cfg = job(src, tmp_path / "out", poisoned)
    s = run(cfg, log=no_log)
    assert (s.rows, s.ok, s.errors) == (24, 12, 12)
    by_id = {r["id"]: r for r in assert_every_id_once(tmp_path / "out", 24, "p.jsonl").to_pylist()}
    bad = {f"p.jsonl:{i}" for i in range(24) if i % 4 in (0, 1)}
    for rid in bad:
        assert by_id[rid]["status"] == "error" and "non-finite (NaN/inf) logits" in by_id[rid]["error"]
        assert by_id[rid]["completion"] is None
    # the clean model decodes the other rows to the same tokens: the poisoned rows changed nothing
    clean = GenerateActor(actor_spec(plan_job(job(src, tmp_path / "o2", tiny_model_dir)), Resources(1, 0, 1)))
    good = sorted(set(by_id) - bad)
    batch = pa.table({"prompt": [by_id[i]["prompt"] for i in good], "id": good})
    expected = dict(zip(good, clean(batch).column("completion_ids").to_pylist()))
    assert {i: by_id[i]["completion_ids"] for i in good} == expected
    assert all(by_id[i]["status"] == "ok" for i in good)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_the_driver_stops_cleanly_marks_the_run_interrupted_and_the_rerun_resumes(
        ray_local, tmp_path, tiny_model_dir, task_rows):
    n = 600
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    first = subprocess.Popen(_job_args(src, out, tiny_model_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: len(output.part_files(str(out))) >= 2 or first.poll() is not None, 240, "rows to be written")
        assert first.poll() is None, "the first run ended before it could be stopped"
        t = time.time()
        first.send_signal(signal.SIGTERM)  # what a scheduler sends first
        _, err = first.communicate(timeout=60)
        stop_s = time.time() - t
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "rerun the same command" in err
    manifest = output.read_manifest(str(out))
    assert manifest["status"] == "interrupted" and manifest["runs"][-1]["status"] == "interrupted", manifest["runs"]
    assert stop_s < 60
    wait_for(lambda: not actor_pids(), 180, "the interrupted job's actor to stop")  # slow on a loaded machine
    done_before = set(read_ids(out))
    assert 0 < len(done_before) < n

    second = subprocess.run(_job_args(src, out, tiny_model_dir), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads([ln for ln in second.stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["skipped"], summary["rows"]) == (len(done_before), n - len(done_before))
    assert_every_id_once(out, n, src.name)
    assert output.read_manifest(str(out))["status"] == "complete"
