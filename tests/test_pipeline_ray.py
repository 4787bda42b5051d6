"""End to end on a local Ray: every input format, per-row errors, resume, a killed actor, no GPU.

All tests share the session Ray of conftest.py; each run starts its own small actor pool.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import output
from pipeline.config import JobConfig, load_job_config
from pipeline.run import PipelineError, run
from pipeline.schema import MANIFEST, OUTPUT_COLUMNS

pytestmark = pytest.mark.ray


def job(tmp_path: Path, model_dir: Path, input_path: Path, **over) -> JobConfig:
    """A small CPU job: one actor on half a CPU, torch engine, the tasks' 24-step budget."""
    base = {"input.path": str(input_path), "output.dir": str(tmp_path / "out"), "model.dir": str(model_dir),
            "model.engine": "torch", "decoding.gen_length": 24, "decoding.steps": 24, "decoding.batch_size": 8,
            "execution.actors": 1, "execution.cpus_per_actor": 0.5, "execution.batch_size": 8}
    return load_job_config(None, {**base, **over})


def read_output(out: str | Path) -> pa.Table:
    """Every part of an output directory as one table."""
    return pa.concat_tables([pq.read_table(p) for p in output.part_files(str(out))], promote_options="permissive")


def pending_pool_actors() -> list[dict]:
    """GenerateActor entries of the session's Ray waiting to be placed (the GCS table: no dashboard here)."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if "GenerateActor" in a.get("ActorClassName", "") and a["State"] in ("PENDING_CREATION", "RESTARTING")]


def write_jsonl(path: Path, rows: list[dict], extra: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in rows) + extra)
    return path


def test_jsonl_end_to_end_with_deepspeed_errors_passthrough_and_manifest(ray_local, tmp_path, tiny_model_dir,
                                                                         task_rows):
    rows = task_rows[:30] + [{"prompt": "", "answer": "-"}, {"prompt": "S:" + "1" * 200 + "=", "answer": "-"}]
    src = write_jsonl(tmp_path / "in" / "prompts.jsonl", rows, b"{not json\n")
    cfg = job(tmp_path, tiny_model_dir, src, **{"model.engine": "deepspeed", "execution.actors": 2})
    s = run(cfg, log=lambda _: None)
    t = read_output(cfg.output.dir)
    expected = {f"prompts.jsonl:{i}" for i in range(len(rows) + 1)}
    assert (s.rows, s.ok, s.errors, s.status) == (33, 30, 3, "complete")
    assert sorted(t.column("id").to_pylist()) == sorted(expected) and t.num_rows == 33
    assert t.column_names[:len(OUTPUT_COLUMNS)] == list(OUTPUT_COLUMNS)
    assert "answer" in t.column_names and "task" in t.column_names
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert by_id["prompts.jsonl:0"]["answer"] == rows[0]["answer"] and by_id["prompts.jsonl:0"]["status"] == "ok"
    assert "empty" in by_id["prompts.jsonl:30"]["error"] and "tokens" in by_id["prompts.jsonl:31"]["error"]
    assert "invalid JSON" in by_id["prompts.jsonl:32"]["error"]
    ok = [r for r in by_id.values() if r["status"] == "ok"]
    assert all(r["generated_tokens"] == len(r["completion_ids"]) and 1 <= r["steps_used"] <= 24 for r in ok)
    assert all(r["steps_budget"] == 24 and r["settings_hash"] == s.settings_hash for r in by_id.values())

    manifest = json.loads((Path(cfg.output.dir) / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["rows"]["rows"] == 33
    assert manifest["settings"][s.settings_hash]["decode"]["steps"] == 24
    assert manifest["versions"]["ray"] and manifest["model"]["engine"] == "deepspeed"
    assert manifest["runs"][-1]["rows"] == 33 and manifest["ended_at"] >= manifest["started_at"]
    no_fallback = {"batches": 0, "rows": 0, "first_error": None}  # rows too long are refused before decoding
    assert manifest["batch_fallbacks"] == no_fallback == s.to_json()["batch_fallbacks"]

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(Path(cfg.output.dir) / "*.parquet"), split="train")
    assert loaded.num_rows == 33 and set(OUTPUT_COLUMNS) <= set(loaded.column_names)

    files = output.part_files(cfg.output.dir)
    again = run(cfg, log=lambda _: None)  # a completed rerun writes nothing (and starts no actor)
    assert (again.rows, again.status) == (0, "nothing to do") and output.part_files(cfg.output.dir) == files

    # derived ids are positions: appending keeps the old ones (inserting would not; give an id column)
    write_jsonl(src, rows, b"{not json\n" + json.dumps({"prompt": rows[0]["prompt"], "answer": "dup"}).encode())
    grown = run(cfg, log=lambda _: None)  # input grew by one line: only the new id is decoded
    assert (grown.rows, grown.skipped, grown.total_rows, grown.unique_ids) == (1, 33, 34, 34)
    new = read_output(cfg.output.dir).filter(pa.compute.equal(pa.compute.field("answer"), "dup"))
    assert new.column("id").to_pylist() == ["prompts.jsonl:33"]


@pytest.mark.parametrize("fmt", ["parquet-messages", "csv", "hf-ids"])
def test_every_input_format_end_to_end(ray_local, tmp_path, tiny_model_dir, task_rows, fmt):
    rows = task_rows[:12]
    over: dict = {}
    if fmt == "parquet-messages":
        src = tmp_path / "in" / "chat.parquet"
        src.parent.mkdir()
        msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
        pq.write_table(pa.table({"messages": msgs, "answer": [r["answer"] for r in rows]}), src)
        over["input.messages_column"] = "messages"
        want_ids = [f"chat.parquet:{i}" for i in range(12)]
    elif fmt == "csv":
        src = tmp_path / "in.csv"
        src.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
        want_ids = [f"in.csv:{i}" for i in range(12)]
    else:
        import datasets

        src = tmp_path / "hf"
        datasets.Dataset.from_dict({"question": [r["prompt"] for r in rows], "qid": list(range(100, 112)),
                                    "answer": [r["answer"] for r in rows]}).save_to_disk(str(src))
        over.update({"input.prompt_column": "question", "input.id_column": "qid"})
        want_ids = [str(i) for i in range(100, 112)]
    cfg = job(tmp_path, tiny_model_dir, src, **over)
    s = run(cfg, log=lambda _: None)
    t = read_output(cfg.output.dir)
    assert (s.rows, s.ok) == (12, 12)
    assert sorted(t.column("id").to_pylist()) == sorted(want_ids)
    got = sorted((r["prompt"], r["answer"]) for r in t.to_pylist())
    assert got == sorted((r["prompt"], r["answer"]) for r in rows)  # prompts arrived intact (messages rendered)
    if fmt == "parquet-messages":
        assert "messages" in t.column_names  # passthrough keeps the structured messages
    if fmt == "hf-ids":
        assert "question" not in t.column_names and "qid" not in t.column_names


def test_resume_after_a_limited_run_processes_only_the_rest(ray_local, tmp_path, tiny_model_dir, task_rows):
    src = write_jsonl(tmp_path / "p.jsonl", task_rows)
    first = run(job(tmp_path, tiny_model_dir, src, **{"input.limit": 15}), log=lambda _: None)
    assert (first.rows, first.status) == (15, "partial")
    first_ids = set(read_output(tmp_path / "out").column("id").to_pylist())
    (tmp_path / "out" / ".part-killed-000003.parquet.tmp").write_bytes(b"a killed run's half-written part")
    logs: list[str] = []
    second = run(job(tmp_path, tiny_model_dir, src), log=logs.append)
    assert (second.rows, second.skipped, second.total_rows, second.unique_ids) == (25, 15, 40, 40)
    assert any("1 partial parts" in line for line in logs)
    assert not list((tmp_path / "out").glob(".*.tmp"))
    new_parts = [p for p in output.part_files(str(tmp_path / "out")) if second.run_id in p]
    new_ids = pa.concat_tables([pq.read_table(p) for p in new_parts]).column("id").to_pylist()
    assert len(new_ids) == 25 and not first_ids & set(new_ids)
    third = run(job(tmp_path, tiny_model_dir, src), log=lambda _: None)
    assert (third.rows, third.status) == (0, "nothing to do")
    with pytest.raises(Exception, match="other settings"):
        run(job(tmp_path, tiny_model_dir, src, **{"decoding.steps": 12}), log=lambda _: None)


def _writers(out: str) -> set[int]:
    """Pids of the actors whose rows are already in visible parts."""
    pids = set()
    for path in output.part_files(out):
        pids |= {int(w.rsplit(":", 1)[1]) for w in pq.read_table(path, columns=["worker_id"]).column(0).to_pylist()}
    return pids


def test_an_actor_killed_mid_run_loses_no_row_and_duplicates_none(ray_local, tmp_path, tiny_model_dir, task_rows):
    import psutil

    rows = task_rows * 24  # 960 rows; duplicate prompts get distinct ids
    src = write_jsonl(tmp_path / "many.jsonl", rows)
    cfg = job(tmp_path, tiny_model_dir, src, **{"execution.actors": 2, "execution.rows_per_file": 8})
    killed: list[int] = []

    def kill_an_actor_that_has_written_rows() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in _writers(cfg.output.dir):
                if psutil.pid_exists(pid) and "GenerateActor" in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor_that_has_written_rows, daemon=True)
    killer.start()
    s = run(cfg, log=lambda _: None)
    killer.join(timeout=5)
    t = read_output(cfg.output.dir)
    assert killed, "no actor was seen writing rows"
    assert s.status == "complete" and t.num_rows == len(rows) == s.total_rows
    assert len(set(t.column("id").to_pylist())) == len(rows)
    assert set(t.column("status").to_pylist()) == {"ok"}
    pids = {int(w.rsplit(":", 1)[1]) for w in t.column("worker_id").to_pylist()}
    # the victim wrote rows before it died, and a restarted process (a third pid) took over its share
    assert killed[0] in pids and len(pids) >= 3 and not psutil.pid_exists(killed[0])


def test_a_gpu_request_on_a_cluster_without_gpus_fails_within_the_wait(ray_local, tmp_path, tiny_model_dir,
                                                                       task_rows):
    src = write_jsonl(tmp_path / "p.jsonl", task_rows[:4])
    cfg = job(tmp_path, tiny_model_dir, src, **{"execution.gpus_per_actor": 1, "execution.actor_start_timeout_s": 3})
    t0 = time.time()
    with pytest.raises(PipelineError, match=r"asks for 1 GPU\(s\) and 0.5 CPU\(s\); the cluster has 0 GPU\(s\)"):
        run(cfg, log=lambda _: None)
    assert time.time() - t0 < 60
    assert output.part_files(cfg.output.dir) == []
    # nothing is left asking the cluster for a GPU (an autoscaler would keep trying to add one)
    assert {v["state"] for v in ray_local.util.placement_group_table().values()} <= {"REMOVED"}
    assert not pending_pool_actors()


def test_fallbacks_reach_the_runs_named_counter(ray_local, tiny_model_dir, task_rows):
    from pipeline.actor import ActorSpec, GenerateActor
    from prophet.config import DecodeConfig
    from pipeline.run import start_counters

    counter = start_counters("t-fallback", replicas=False)["batch_fallbacks"]
    spec = ActorSpec(model_dir=str(tiny_model_dir), dtype="fp32", engine="torch", device="cpu",
                     decode=DecodeConfig(gen_length=8, steps=8).to_dict(), seed=0, settings_hash="h",
                     prompt_column="prompt", fallback_counter="prophet-fallbacks-t-fallback")
    actor = GenerateActor(spec)
    inner = actor.model.module

    def fail_batches(ids, mask, **kw):
        if ids.shape[0] > 1:
            raise ValueError("bad batch")
        return inner(ids, mask, **kw)

    actor.model.module = fail_batches
    batch = pa.table({"prompt": [r["prompt"] for r in task_rows[:2]], "id": ["a", "b"]})
    for _ in range(2):
        assert actor(batch).column("status").to_pylist() == ["ok", "ok"]
    deadline = time.time() + 10  # record() is fire-and-forget
    while (got := ray_local.get(counter.report.remote()))["batches"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert got == {"batches": 2, "rows": 4, "first_error": "ValueError: bad batch"}
