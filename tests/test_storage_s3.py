"""input.path and output.dir on object storage: a real S3 server (moto's) on 127.0.0.1, pyarrow's S3
file system, the whole job on the session's local Ray: a full job and its manifest, a resume after a
killed driver, --overwrite deleting only the job's own parts, a missing bucket refused up front."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import output, storage
from pipeline.config import JobConfigError, load_job_config
from pipeline.run import PipelineError, run

from tests.test_reliability import ROOT, actor_pids, no_log, wait_for

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
BUCKET = "prophet-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; yields its endpoint URL."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    storage.use_endpoint(url)  # for this process's own listings, whichever test runs first
    yield url
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)  # run() exported the endpoint of this (now stopped) server


def put_prompts(url: str, key: str, task_rows: list[dict], n: int) -> str:
    """n JSONL prompt rows uploaded to s3://BUCKET/key; returns the URI."""
    fs = storage.s3(url)
    with fs.open_output_stream(f"{BUCKET}/{key}") as f:
        f.write("".join(json.dumps(task_rows[i % len(task_rows)]) + "\n" for i in range(n)).encode())
    return f"s3://{BUCKET}/{key}"


def s3_job(src: str, out: str, model_dir, url: str, **over):
    base = {"input.path": src, "output.dir": out, "model.dir": str(model_dir), "model.engine": "torch",
            "storage.s3_endpoint": url, "decoding.gen_length": 8, "decoding.steps": 8, "decoding.batch_size": 8,
            "execution.actors": 1, "execution.cpus_per_actor": 0.5, "execution.batch_size": 8,
            "execution.rows_per_file": 8}
    return load_job_config(None, {**base, **over})


def s3_ids(url: str, out: str) -> list[str]:
    fs = storage.s3(url)
    return [i for p in output.part_files(out) for i in pq.read_table(p, columns=["id"], filesystem=fs)
            .column("id").to_pylist()]


@pytest.mark.ray
def test_a_job_reads_and_writes_s3_then_overwrite_deletes_only_its_own_parts(ray_local, s3_endpoint,
                                                                             tiny_model_dir, task_rows):
    src = put_prompts(s3_endpoint, "in/full.jsonl", task_rows, 20)
    out = f"s3://{BUCKET}/runs/full"
    s = run(s3_job(src, out, tiny_model_dir, s3_endpoint), log=no_log)
    assert (s.rows, s.total_rows, s.unique_ids, s.status) == (20, 20, 20, "complete")
    assert sorted(s3_ids(s3_endpoint, out)) == sorted(f"full.jsonl:{i}" for i in range(20))
    manifest = output.read_manifest(out)
    assert manifest["status"] == "complete" and manifest["rows"]["rows"] == 20
    assert manifest["input"]["path"] == src and manifest["input"]["fingerprint"]
    # a completed rerun sees the same input fingerprint on S3 and does nothing
    again = run(s3_job(src, out, tiny_model_dir, s3_endpoint), log=no_log)
    assert (again.status, again.rows) == ("nothing to do", 0)

    fs = storage.s3(s3_endpoint)
    with fs.open_output_stream(f"{BUCKET}/runs/full/notes.txt") as f:  # someone's file beside the parts
        f.write(b"keep me")
    before = set(output.part_files(out))
    over = run(s3_job(src, out, tiny_model_dir, s3_endpoint, **{"output.overwrite": True, "input.limit": 5}),
               log=no_log)
    after = set(output.part_files(out))
    assert over.rows == 5 and not (before & after) and len(s3_ids(s3_endpoint, out)) == 5
    assert fs.get_file_info(f"{BUCKET}/runs/full/notes.txt").type == pafs.FileType.File

    # a foreign Parquet file makes --overwrite refuse the prefix, and it stays
    pq.write_table(pa.table({"x": [1]}), f"{BUCKET}/runs/full/theirs.parquet", filesystem=fs)
    with pytest.raises(JobConfigError, match="did not write"):
        run(s3_job(src, out, tiny_model_dir, s3_endpoint, **{"output.overwrite": True}), log=no_log)
    assert fs.get_file_info(f"{BUCKET}/runs/full/theirs.parquet").type == pafs.FileType.File


def test_a_missing_bucket_is_refused_before_ray_with_the_field_and_the_fix(s3_endpoint, tiny_model_dir, task_rows):
    src = put_prompts(s3_endpoint, "in/m.jsonl", task_rows, 2)
    with pytest.raises(JobConfigError, match=r"output.dir: bucket 'no-such-bucket' .* does not exist.*create it"):
        run(s3_job(src, "s3://no-such-bucket/out", tiny_model_dir, s3_endpoint), log=no_log)
    with pytest.raises(JobConfigError, match=r"input.path: bucket 'gone'"):
        run(s3_job("s3://gone/p.jsonl", f"s3://{BUCKET}/o", tiny_model_dir, s3_endpoint), log=no_log)


def test_each_path_is_resolved_once_in_the_checks_before_ray(s3_endpoint, tiny_model_dir, task_rows):
    from pipeline.run import plan_job, prepare_output

    src = put_prompts(s3_endpoint, "in/once.jsonl", task_rows, 3)
    out = f"s3://{BUCKET}/once"
    storage._remote.cache_clear()
    storage._s3.cache_clear()
    plan = plan_job(s3_job(src, out, tiny_model_dir, s3_endpoint))
    prepare_output(plan)
    output.check_writable(out)
    output.remove_temp_files(out)
    output.done_ids(out)
    # the input and the output each resolved once, on one S3 client; every later ask reuses them
    assert storage._remote.cache_info().misses == 2 and storage._remote.cache_info().hits >= 7
    assert storage._s3.cache_info().currsize == 1
    assert storage.filesystem(out)[0] is storage.filesystem(src)[0]


def test_s3_parquet_inputs_get_the_local_checks_before_ray(s3_endpoint, tiny_model_dir):
    fs = storage.s3(s3_endpoint)
    pq.write_table(pa.table({"prompt": ["a", "b"], "k": ["1", "2"]}), f"{BUCKET}/pq/a.parquet", filesystem=fs)
    pq.write_table(pa.table({"prompt": ["c"], "k": ["1"]}), f"{BUCKET}/pq/b.parquet", filesystem=fs)
    with pytest.raises(JobConfigError, match=r"input.id_column: 1 ids of column 'k' appear more than once"):
        run(s3_job(f"s3://{BUCKET}/pq", f"s3://{BUCKET}/o", tiny_model_dir, s3_endpoint,
                   **{"input.id_column": "k"}), log=no_log)
    pq.write_table(pa.table({"prompt": [1]}), f"{BUCKET}/pq/c.parquet", filesystem=fs)
    with pytest.raises(JobConfigError, match=r"column 'prompt' is string in a.parquet but int64 in c.parquet"):
        run(s3_job(f"s3://{BUCKET}/pq", f"s3://{BUCKET}/o", tiny_model_dir, s3_endpoint), log=no_log)


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_killed_mid_run_on_s3_resumes_only_what_is_missing(ray_local, s3_endpoint, tiny_model_dir,
                                                                     task_rows):
    n = 300
    src = put_prompts(s3_endpoint, "in/kill.jsonl", task_rows, n)
    out = f"s3://{BUCKET}/runs/kill"
    args = [sys.executable, "jobs/generate.py", "--input", src, "--output", out, "--model", str(tiny_model_dir),
            "--s3-endpoint", s3_endpoint, "--engine", "torch", "--gen-length", "8", "--steps", "8", "--slots", "8",
            "--actors", "1", "--cpus-per-actor", "0.5", "--batch-size", "8", "--rows-per-file", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(lambda: len(output.part_files(out)) >= 3 or first.poll() is not None, 240, "rows to be written")
        assert first.poll() is None, "the first run ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    wait_for(lambda: not actor_pids(), 60, "the killed job's actor to stop")
    done_before = set(s3_ids(s3_endpoint, out))
    assert 0 < len(done_before) < n and output.read_manifest(out)["status"] == "running"

    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads([ln for ln in second.stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["skipped"], summary["rows"]) == (len(done_before), n - len(done_before))
    ids = s3_ids(s3_endpoint, out)
    assert len(ids) == n and set(ids) == {f"kill.jsonl:{i}" for i in range(n)}
    assert output.read_manifest(out)["status"] == "complete"


# ----------------------------------------------------------------------------- issue 17: lost objects, a lost bucket, the lock

def _when_parts(out: str, n: int, then) -> threading.Thread:
    """A thread that calls `then()` once `out` holds n parts (listing the prefix every 50 ms)."""
    def watch() -> None:
        wait_for(lambda: len(output.part_files(out)) >= n, 240, f"{n} parts")
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.ray
def test_parts_lost_from_s3_mid_run_make_the_run_incomplete_exit_1_and_the_rerun_redoes_them(
        ray_local, s3_endpoint, tiny_model_dir, task_rows, capsys):
    from tests.tiny_support import load_job

    n = 96
    src = put_prompts(s3_endpoint, "in/lose.jsonl", task_rows, n)
    out = f"s3://{BUCKET}/runs/lose"
    fs = storage.s3(s3_endpoint)
    lost: set[str] = set()

    def lose_first_part() -> None:
        first = output.part_files(out)[0]
        lost.update(pq.read_table(first, columns=["id"], filesystem=fs).column("id").to_pylist())
        fs.delete_file(first)

    argv = ["--input", src, "--output", out, "--model", str(tiny_model_dir), "--s3-endpoint", s3_endpoint,
            "--engine", "torch", "--gen-length", "8", "--steps", "8", "--slots", "8", "--actors", "1",
            "--cpus-per-actor", "0.5", "--batch-size", "8", "--rows-per-file", "8"]
    generate = load_job("generate")
    thread = _when_parts(out, 2, lose_first_part)
    assert generate.main(argv) == 1
    thread.join(timeout=5)
    captured = capsys.readouterr()
    summary = json.loads([ln for ln in captured.out.splitlines() if ln.startswith("{")][-1])
    assert len(lost) == 8 and summary["status"] == "incomplete"
    assert (summary["input_ids"], summary["output_ids"], summary["missing_ids"]) == (n, n - 8, 8)
    assert f"error: the output lacks 8 of the input's {n} ids" in captured.err and "rerun the same command" in captured.err
    assert output.read_manifest(out)["status"] == "incomplete"

    assert generate.main(argv) == 0
    again = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert (again["status"], again["rows"], again["missing_ids"]) == ("complete", 8, 0)
    ids = s3_ids(s3_endpoint, out)
    assert len(ids) == n and set(ids) == {f"lose.jsonl:{i}" for i in range(n)}


@pytest.mark.ray
def test_a_bucket_deleted_mid_run_stops_the_job_in_one_paragraph_that_says_nothing_is_kept(
        ray_local, s3_endpoint, tiny_model_dir, task_rows, monkeypatch):
    import logging

    import boto3

    gone = "prophet-gone"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=gone)
    n = 200
    src = put_prompts(s3_endpoint, "in/gone.jsonl", task_rows, n)
    out = f"s3://{gone}/runs/g"

    def delete_bucket() -> None:
        while True:  # a part may land between the listing and the delete: empty it again
            for obj in client.list_objects_v2(Bucket=gone).get("Contents", []):
                client.delete_object(Bucket=gone, Key=obj["Key"])
            try:
                client.delete_bucket(Bucket=gone)
                return
            except client.exceptions.ClientError:
                continue

    # what Ray Data's console handlers print (past their filters), whichever stream they print to
    printed: list[str] = []
    import ray.data  # noqa: F401  (its logging is configured on import)

    for handler in logging.getLogger("ray.data").handlers:
        if any(type(f).__name__ == "HiddenRecordFilter" for f in handler.filters):
            monkeypatch.setattr(handler, "emit", lambda record: printed.append(record.getMessage()))
    cfg = s3_job(src, out, tiny_model_dir, s3_endpoint)
    thread = _when_parts(out, 2, delete_bucket)
    with pytest.raises(PipelineError) as info:
        run(cfg, log=no_log)
    thread.join(timeout=5)
    message = str(info.value)
    assert message.startswith(f"output.dir: cannot write part-") and "The specified bucket does not exist" in message
    assert f"the bucket '{gone}' is gone, and with it every part written so far: nothing of this output is kept" \
        in message and "Recreate the bucket and rerun the same command" in message
    assert "are kept" not in message
    assert any("Starting execution of Dataset" in m for m in printed)  # Ray Data's console is seen here ...
    # ... and its report of the failure is not on it (its ~180 lines of traces go to its log file)
    for line in ("An exception was raised from a task of operator", "Full stack trace", "Exception occurred in"):
        assert not any(line in m for m in printed), line

    client.create_bucket(Bucket=gone)
    again = run(cfg, log=no_log)
    assert (again.status, again.rows, again.missing_ids) == ("complete", n, 0)


def test_the_s3_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(s3_endpoint, monkeypatch):
    import boto3

    from pipeline import lock

    out = f"s3://{BUCKET}/runs/locked"
    first = lock.OutputLock(out, "first", log=no_log)
    assert first._backend.conditional  # moto honours If-None-Match: the lock is a conditional PUT
    first.acquire()
    with pytest.raises(lock.OutputLocked, match=r"in use by run first \(host .*, pid \d+"):
        lock.OutputLock(out, "second", log=no_log).acquire()
    first._stop.set()  # the first run dies without releasing: no heartbeat any more
    monkeypatch.setattr(lock, "STALE_S", 0.0)
    monkeypatch.setattr(lock, "_process_start", lambda pid: 1.0 if pid == os.getpid() else None)
    logged: list[str] = []
    third = lock.OutputLock(out, "third", log=logged.append)
    third.acquire()
    assert "took over the lock of run first" in logged[0]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    held = json.loads(client.get_object(Bucket=BUCKET, Key="runs/locked/.lock.json")["Body"].read())
    assert held["run_id"] == "third"
    first.release()  # no longer its lock: the third run's stays
    assert json.loads(client.get_object(Bucket=BUCKET, Key="runs/locked/.lock.json")["Body"].read())["run_id"] == "third"
    third.release()
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/locked/")

    # a server that ignores If-None-Match: the job says so and falls back to a PUT read back a second later
    monkeypatch.undo()  # real staleness again
    monkeypatch.setattr(lock._S3Object, "_honours_conditions", lambda self: False)
    logged.clear()
    plain = lock.OutputLock(f"s3://{BUCKET}/runs/plain", "plain", log=logged.append)
    plain.acquire()
    assert "ignores conditional writes" in logged[0]
    with pytest.raises(lock.OutputLocked, match=r"in use by run plain"):
        lock.OutputLock(f"s3://{BUCKET}/runs/plain", "other", log=no_log).acquire()
    plain.release()
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/plain/")
