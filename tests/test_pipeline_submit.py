"""`ray job submit` of jobs/generate.py against a `ray start --head` cluster started by the test.

The head runs in its own process group on free ports (token auth disabled, as for any local
cluster), so the test stops exactly the processes it started, never another Ray on the machine.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the Ray head's dashboard did not come up")


def _stop_group(head: subprocess.Popen) -> None:
    """Stop the head and everything it spawned (its process group), then reap it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            time.sleep(1)  # let the group's other members go too
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_ray_job_submit_runs_the_embedded_default_on_a_running_cluster(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    if not (ROOT / "checkpoints" / "tiny-llada" / "calibration.json").is_file():
        pytest.skip("the embedded default needs the shipped checkpoints/tiny-llada")
    out = tmp_path / "out"
    # every port free and explicit: the defaults (e.g. the dashboard agent's 52365) collide with any
    # other Ray on the machine, the test session's own included, and the job would find no agent
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port")}
    dash = ports["dashboard-port"]
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_dashboard(dash, head)
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(ROOT), "--", "python", "jobs/generate.py",  # the embedded default job,
                  "--output", str(out), "--limit", "10", "--actors", "1"]      # cut to 10 rows and one actor
        deadline = time.time() + 90
        while True:  # the dashboard answers before the node's job agent is up: retry that refusal only
            p = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
            if "No available agent" not in p.stderr + p.stdout or time.time() > deadline:
                break
            time.sleep(2)
    finally:
        _stop_group(head)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{") and '"output"' in ln]
    summary = json.loads(lines[-1])
    assert (summary["rows"], summary["ok"], summary["errors"], summary["output"]) == (10, 10, 0, str(out))
    assert "Started a local Ray instance" not in p.stdout and "Ray joined" in p.stdout  # it joined the cluster
    table = pq.read_table(sorted(out.glob("*.parquet")))
    prompts = [json.loads(line) for line in (ROOT / "pipeline/data/default_prompts.jsonl").read_text().splitlines()]
    assert set(table.column("id").to_pylist()) <= {r["id"] for r in prompts} and table.num_rows == 10
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["model"]["engine"] == "deepspeed" and manifest["decode"]["rule"] == "prophet"
