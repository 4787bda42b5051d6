"""A worker node lost mid-job on a real multi-node local Ray (head + one worker, `ray start`).

The head and the worker each run in their own process group on free ports (token auth off, as
for any local cluster); each test kills its worker's group with SIGKILL (its raylet and its
workers, as a preempted node) and stops the groups at the end, never another Ray on the machine.
The head (with its dashboard, for `ray job submit`) is shared by the module's tests; each test
joins a fresh worker node. Slow (both together 3 min on 2 cores, each alone about 2 min): marked ray and slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import output
from test_pipeline_submit import _stop_group, _wait_for_dashboard, free_port
from test_reliability import _job_args, assert_every_id_once, read_ids, wait_for, write_prompts

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


def start_node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block ...` in a process group of its own, every port free and explicit; its output goes
    to a temporary file (`.log`), shown if the node does not come up."""
    ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                             "object-manager-port")}
    log = tempfile.NamedTemporaryFile("w+", prefix="ray-start-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args,
                             *(f"--{k}={v}" for k, v in ports.items())],
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log.name
    return proc


def _came_up(proc: subprocess.Popen, what: str, ready) -> None:
    """Wait for `ready()`; a node whose `ray start` fails is reported with the end of its output."""
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 120, what)
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
    except AssertionError as e:
        raise AssertionError(f"{e}; ray start said: {Path(proc.log).read_text()[-3000:]}") from None


def cluster_nodes(address: str, env: dict) -> list[dict]:
    """`ray.nodes()` of the cluster at `address`, from a short-lived driver ([] while it cannot connect)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps(ray.nodes()))" % address)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else []


def alive_nodes(address: str, env: dict) -> int:
    return sum(n["Alive"] for n in cluster_nodes(address, env))


@dataclass
class Cluster:
    address: str          # the GCS, for drivers that join (RAY_ADDRESS)
    dashboard: str        # http://127.0.0.1:<port>, for `ray job submit`
    head: subprocess.Popen


@pytest.fixture(scope="module")
def head():
    """A head (3 CPUs, resource head_node, the dashboard on a free localhost port), shared by the module's tests."""
    env = _env()
    port, dash = free_port(), free_port()
    proc = start_node(["--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                       f"--ray-client-server-port={free_port()}", '--resources={"head_node": 1}'], env)
    try:
        cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", proc)
        _came_up(proc, "the head", lambda: alive_nodes(cluster.address, env) >= 1)
        _wait_for_dashboard(dash, proc)
        yield cluster
    finally:
        _stop_group(proc)
        Path(proc.log).unlink(missing_ok=True)


@pytest.fixture
def two_nodes(head):
    """The shared head plus a fresh worker node (2 CPUs, resource worker_a); yields (cluster, worker, its node id).

    Each test starts its own worker, since each test kills it.
    """
    env = _env()
    before = {n["NodeID"] for n in cluster_nodes(head.address, env)}
    worker = start_node([f"--address={head.address}", "--num-cpus=2", '--resources={"worker_a": 1}'], env)
    try:
        joined: list[dict] = []
        _came_up(worker, "the worker node to join", lambda: joined.extend(
            n for n in cluster_nodes(head.address, env) if n["Alive"] and n["NodeID"] not in before) or joined)
        yield head, worker, joined[0]["NodeID"]
    finally:
        _stop_group(worker)
        Path(worker.log).unlink(missing_ok=True)


def _pool_of_two(args: list[str]) -> list[str]:
    args = list(args)
    args[args.index("--actors") + 1] = "2"  # 2 x 1 CPU: the head alone still runs both (rerun)
    args[args.index("--cpus-per-actor") + 1] = "1"
    return args


def assert_names_the_lost_node(text: str, node_id: str, out: Path) -> None:
    """The run's error and the manifest name the worker node and say to rerun."""
    assert f"lost node {node_id} at " in text and "worker_a 1" in text, text[-3000:]
    assert "rerun the same command to finish the remaining rows (resume skips the finished parts)" in text
    assert "Traceback" not in text, text[-3000:]  # one paragraph, not Ray's traceback
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["runs"][-1]["status"] == "failed"
    assert manifest["runs"][-1]["error"].startswith(f"lost node {node_id}")


def test_a_worker_node_killed_mid_job_loses_no_row_and_the_rerun_completes(two_nodes, tmp_path, task_rows,
                                                                          tiny_model_dir):
    cluster, worker, worker_id = two_nodes
    env = {**_env(), "RAY_ADDRESS": cluster.address}
    n = 400
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    args = _pool_of_two(_job_args(src, out, tiny_model_dir))
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for(lambda: len(output.part_files(str(out))) >= 2 or first.poll() is not None, 240, "rows to be written")
        assert first.poll() is None, "the job ended before the node could be killed"
        os.killpg(worker.pid, signal.SIGKILL)  # the node is gone: raylet, its workers, the actors on it
        stdout, stderr = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    if first.returncode != 0:  # it stopped: the error must name the node, and the same command completes the rest
        assert read_ids(out), stderr[-2000:]
        Path(os.environ.get("NODE_TEST_LOG", os.devnull)).write_text(stderr[-4000:])
        assert first.returncode == 1
        assert_names_the_lost_node(stderr, worker_id, out)
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stderr[-2000:]
        stdout = second.stdout
    summary = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["total_rows"], summary["unique_ids"]) == (n, n)
    assert_every_id_once(out, n, src.name)


# ----------------------------------------------------------------------------- under `ray job submit`

def _job_status(cluster: Cluster, job_id: str) -> str:
    with urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())["status"]


def _submit(cluster: Cluster, job_id: str, job: list[str], env: dict) -> None:
    """`ray job submit --no-wait` of `python jobs/generate.py ...`; retries while the job agent is not up yet."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
           "--no-wait", "--working-dir", str(ROOT), "--", "python", *job]
    deadline = time.time() + 90
    while True:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        if p.returncode == 0:
            return
        assert "No available agent" in p.stderr + p.stdout and time.time() < deadline, p.stdout + p.stderr
        time.sleep(2)


def _wait_until_done(cluster: Cluster, job_id: str, timeout: float = 400) -> str:
    final = ("SUCCEEDED", "FAILED", "STOPPED")
    status: list[str] = []
    wait_for(lambda: status.append(_job_status(cluster, job_id)) or status[-1] in final, timeout,
             f"job {job_id} to end")
    return status[-1]


def test_a_worker_node_lost_under_ray_job_submit_fails_the_job_naming_it_and_the_resubmission_completes(
        two_nodes, tmp_path, task_rows, tiny_model_dir):
    cluster, worker, worker_id = two_nodes
    env = _env()
    n = 400
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    job = _pool_of_two(_job_args(src, out, tiny_model_dir))[1:]  # the entrypoint's `python` runs it on the head
    _submit(cluster, "nodes-first", job, env)
    wait_for(lambda: len(output.part_files(str(out))) >= 2
             or _job_status(cluster, "nodes-first") not in ("PENDING", "RUNNING"), 240, "rows to be written")
    assert _job_status(cluster, "nodes-first") == "RUNNING", "the job ended before the node could be killed"
    os.killpg(worker.pid, signal.SIGKILL)
    status = _wait_until_done(cluster, "nodes-first")
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, "nodes-first"],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    if os.environ.get("NODE_TEST_LOG"):
        Path(os.environ["NODE_TEST_LOG"] + ".submit").write_text(logs[-4000:])
    if status == "FAILED":  # it stopped: the job's log names the node; the resubmission completes the rest
        assert read_ids(out)
        assert_names_the_lost_node(logs, worker_id, out)
        _submit(cluster, "nodes-second", job, env)
        assert _wait_until_done(cluster, "nodes-second") == "SUCCEEDED"
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, "nodes-second"],
                              env=env, capture_output=True, text=True, timeout=60).stdout
        assert "resuming:" in logs, logs[-3000:]
    assert status in ("FAILED", "SUCCEEDED"), logs[-3000:]
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert (summary["total_rows"], summary["unique_ids"]) == (n, n)
    assert_every_id_once(out, n, src.name)
