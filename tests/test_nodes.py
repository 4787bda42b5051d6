"""A worker node lost mid-job on a real multi-node local Ray (head + one worker, `ray start`).

The head and the worker each run in their own process group on free ports (token auth off, as
for any local cluster); the test kills the worker's group with SIGKILL (its raylet and its
workers, as a preempted node) and stops both groups at the end, never another Ray on the machine.
Slow (about 2-3 min on 2 cores): marked ray and slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import output
from test_pipeline_submit import _stop_group, free_port
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
    """`ray start --block ...` in a process group of its own, every port free and explicit."""
    ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                             "object-manager-port")}
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args,
                             *(f"--{k}={v}" for k, v in ports.items())],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def alive_nodes(address: str, env: dict) -> int:
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0


@pytest.fixture
def two_nodes():
    """A head with 3 CPUs and a worker node with 2 CPUs and resource worker_a; yields (address, head, worker)."""
    env = _env()
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node(["--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
                       f"--ray-client-server-port={free_port()}", '--resources={"head_node": 1}'], env)
    worker = None
    try:
        wait_for(lambda: alive_nodes(address, env) >= 1, 120, "the head")
        worker = start_node([f"--address={address}", "--num-cpus=2", '--resources={"worker_a": 1}'], env)
        wait_for(lambda: alive_nodes(address, env) >= 2, 120, "the worker node to join")
        yield address, head, worker
    finally:
        for group in (worker, head):
            if group is not None:
                _stop_group(group)


def test_a_worker_node_killed_mid_job_loses_no_row_and_the_rerun_completes(two_nodes, tmp_path, task_rows,
                                                                          tiny_model_dir):
    address, _, worker = two_nodes
    env = {**_env(), "RAY_ADDRESS": address}
    n = 400
    src = write_prompts(tmp_path / "p.jsonl", task_rows, n)
    out = tmp_path / "out"
    args = [*_job_args(src, out, tiny_model_dir)]
    args[args.index("--actors") + 1] = "2"  # 2 x 1 CPU: the head alone still runs both (rerun)
    args[args.index("--cpus-per-actor") + 1] = "1"
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
    if first.returncode != 0:  # it stopped: the error must say so, and the same command completes the rest
        assert read_ids(out), stderr[-2000:]
        Path(os.environ.get("NODE_TEST_LOG", os.devnull)).write_text(stderr[-4000:])
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stderr[-2000:]
        stdout = second.stdout
    summary = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["total_rows"], summary["unique_ids"]) == (n, n)
    assert_every_id_once(out, n, src.name)
