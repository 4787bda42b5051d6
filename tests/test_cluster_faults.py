"""Cluster faults without a cluster: naming a lost node (pipeline.nodes), ending what a SIGKILLed
driver's local Ray left running (pipeline.leftovers).

Fast: Ray's own exception classes and `ray.nodes()`-shaped lists; real processes that look like
Ray's agents to the detection, holding files of a fake session tree. The real node loss is
tests/test_nodes.py (slow).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import leftovers, nodes

HEAD = {"NodeID": "aa" * 28, "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 40001,
        "Resources": {"CPU": 3.0, "head_node": 1.0, "node:10.0.0.1": 1.0, "memory": 1e9}}
WORKER = {"NodeID": "bb" * 28, "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 40002,
          "Resources": {"CPU": 2.0, "worker_a": 1.0, "node:10.0.0.2": 1.0, "object_store_memory": 1e8}}


def _dead(node: dict) -> dict:
    return {**node, "Alive": False}


def _unavailable(ip: str = "10.0.0.2"):
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError(f"RpcError: failed to connect to all addresses; ipv4:{ip}:12068: Connection "
                                 "refused", b"\x9d" * 16)


def test_the_ray_error_of_a_lost_node_is_found_behind_ray_datas_wrapping():
    from ray.data.exceptions import SystemException

    err = _unavailable()
    try:  # what Ray Data's handle_trace does: the same error re-raised from a SystemException
        raise err from SystemException()
    except Exception as e:
        wrapped = RuntimeError("outer")
        wrapped.__cause__ = e
    assert nodes.node_loss_error(wrapped) is err
    assert nodes.node_loss_error(ValueError("a bug")) is None


def test_the_lost_node_is_named_with_its_id_address_and_resources_and_the_rerun_advice():
    alive = nodes.alive_nodes([HEAD, WORKER])
    gone = {**_dead(WORKER), "Resources": {}}  # what ray.nodes() says of a dead node
    msg = nodes.explain_node_loss(_unavailable(), alive, lambda: [HEAD, gone], wait_s=0)
    assert msg.startswith(f"lost node {WORKER['NodeID']} at 10.0.0.2:40002 (CPU 2, worker_a 1) mid-job")
    assert nodes.RERUN in msg and "ActorUnavailableError" in msg and "\n" not in msg
    assert "node:10.0.0.2" not in msg and "memory" not in msg
    assert len(msg.split("(Ray:")[0]) < 500  # what the manifest keeps of a failure holds the advice


def test_a_node_already_dead_before_the_run_is_not_blamed_and_the_address_in_the_error_orders_several():
    old_dead = {**_dead(HEAD), "NodeID": "cc" * 28}
    alive = nodes.alive_nodes([HEAD, WORKER, old_dead])
    assert set(alive) == {HEAD["NodeID"], WORKER["NodeID"]}
    both = nodes.lost_nodes(alive, [_dead(HEAD), _dead(WORKER), old_dead], "ipv4:10.0.0.2:12068")
    assert [n["NodeID"] for n in both] == [WORKER["NodeID"], HEAD["NodeID"]]
    msg = nodes.lost_node_message(_unavailable(), both)
    assert msg.startswith("lost 2 nodes: node " + WORKER["NodeID"])


def test_it_waits_for_the_gcs_to_mark_the_node_dead_and_gives_up_when_no_node_died():
    calls = []

    def listing():
        calls.append(1)
        return [HEAD, WORKER] if len(calls) < 3 else [HEAD, _dead(WORKER)]

    alive = nodes.alive_nodes([HEAD, WORKER])
    dead = nodes.wait_for_lost_nodes(alive, "", listing, wait_s=10, poll_s=0.01)
    assert [n["NodeID"] for n in dead] == [WORKER["NodeID"]] and len(calls) == 3
    # an actor that died on a live node (its restarts used up) is Ray's own error, unchanged
    assert nodes.explain_node_loss(_unavailable(), alive, lambda: [HEAD, WORKER], wait_s=0.05) is None
    assert nodes.explain_node_loss(ValueError("x"), alive, lambda: [HEAD, _dead(WORKER)], wait_s=0) is None


def test_ray_datas_console_report_of_a_lost_nodes_error_is_left_out_and_other_errors_are_not():
    import io
    import logging

    import ray.data  # noqa: F401  (configures Ray Data's logging, as in the driver)

    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    consoles = [h for h in logging.getLogger("ray.data").handlers  # Ray Data's console: the one that hides
                if any(type(f).__name__ == "HiddenRecordFilter" for f in h.filters)]
    assert consoles
    shown = io.StringIO()
    streams = [h.setStream(shown) for h in consoles]  # what Ray Data's console shows, to read back
    try:
        with nodes.quiet_node_loss_traces():
            for err in (_unavailable(), ValueError("a bug in a UDF")):
                try:
                    raise err
                except Exception:
                    logger.error(f"an exception was raised from a task ({type(err).__name__})")
                    logger.exception(f"full stack trace ({type(err).__name__})")
        logger.error("after the block", exc_info=_unavailable())
    finally:
        for h, stream in zip(consoles, streams):
            h.setStream(stream)
    text = shown.getvalue()
    assert "(ActorUnavailableError)" not in text  # neither line, nor its traceback
    assert "task (ValueError)" in text and "trace (ValueError)" in text and "after the block" in text


@pytest.mark.parametrize("broken", [ConnectionError("GCS gone"), TimeoutError("GCS")])
def test_a_gcs_that_cannot_answer_names_nothing(broken):
    def listing():
        raise broken

    assert nodes.explain_node_loss(_unavailable(), {HEAD["NodeID"]: HEAD}, listing, wait_s=0) is None


# ----------------------------------------------------------------------------- leftovers of a killed local Ray

def _spawn(title: str, *extra: str, hold: Path | None = None) -> subprocess.Popen:
    """A real process whose command line starts with `title` (as Ray's workers retitle themselves), holding
    `hold` open for a minute."""
    code = "import sys, time; f = [open(a) for a in sys.argv[1:2] if a]; time.sleep(60)"
    return subprocess.Popen([title, "-c", code, str(hold or ""), *extra], executable=sys.executable)


def _session(root: Path, name: str) -> Path:
    d = root / "ray" / name
    (d / "logs").mkdir(parents=True)
    for f in ("dashboard_agent.log", "runtime_env_agent.log"):
        (d / "logs" / f).write_text("")
    return d


def _wait_open(procs: list[subprocess.Popen], paths: list[Path]) -> None:
    import psutil

    deadline = time.time() + 20
    while time.time() < deadline:
        held = {f.path for p in procs for f in psutil.Process(p.pid).open_files()}
        if all(str(p) in held for p in paths):
            return
        time.sleep(0.1)
    raise AssertionError("the fake agents did not open their logs")


def test_the_agents_of_a_dead_ray_session_are_ended_and_a_live_sessions_are_left(tmp_path):
    dead = _session(tmp_path, "session_2026-12-03_08-37-58_839758_2824")   # its driver was SIGKILLed
    live = _session(tmp_path, "session_2026-12-03_09-00-00_000001_3000")   # its raylet runs
    procs = [
        _spawn("ray::DashboardAgent", hold=dead / "logs" / "dashboard_agent.log"),
        _spawn("ray::RuntimeEnvAgent", hold=dead / "logs" / "runtime_env_agent.log"),
        _spawn("ray::DashboardAgent", hold=live / "logs" / "dashboard_agent.log"),
        _spawn("raylet", f"--raylet_socket_name={live}/sockets/raylet", f"--session_dir={live}"),
        _spawn("ray::IDLE"),                                                # in no session we can tell
        _spawn("python", hold=dead / "logs" / "dashboard_agent.log"),      # not Ray's: never touched
    ]
    try:
        _wait_open(procs[:3], [dead / "logs" / "dashboard_agent.log", dead / "logs" / "runtime_env_agent.log",
                               live / "logs" / "dashboard_agent.log"])
        ours = {p.pid for p in procs}
        mine = [p for p in leftovers.scan() if p.pid in ours]  # never another process of the machine
        assert {p.pid for p in mine} == ours
        lines: list[str] = []
        ended = leftovers.end_leftovers(lines.append, procs=mine)
        assert sorted(p.pid for p in ended) == sorted([procs[0].pid, procs[1].pid])
        for p in procs[:2]:
            assert p.wait(timeout=10) is not None
        assert all(p.poll() is None for p in procs[2:])
        assert len(lines) == 1 and str(dead) in lines[0] and f"{procs[0].pid} ray::DashboardAgent" in lines[0]
        assert leftovers.end_leftovers(lines.append, procs=[p for p in leftovers.scan() if p.pid in ours]) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_session_directories_are_read_from_paths_and_arguments():
    s = "/tmp/ray/session_2026-12-03_11-58-07_255619_6451"
    assert leftovers.session_of([f"{s}/logs/raylet.out"]) == s
    assert leftovers.session_of([f"--raylet_socket_name={s}/sockets/raylet"]) == s
    assert leftovers.session_of(["/tmp/ray/session_latest/logs/x", "/home/u/notes.txt"]) is None
    gcs = leftovers.Proc(1, ("/venv/ray/core/src/ray/gcs/gcs_server", f"--log_dir={s}/logs"))
    agent = leftovers.Proc(2, ("ray::RuntimeEnvAgent",), (f"{s}/logs/runtime_env_agent.log",))
    assert leftovers.stale([gcs, agent]) == {} and leftovers.stale([agent]) == {s: [agent]}
