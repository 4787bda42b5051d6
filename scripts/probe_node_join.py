"""Probe (RELIABILITY.md F15): does Ray Data's autoscaling actor pool (min 1, max 2) put an actor on a node
that joins mid-job?

    RAY_AUTH_MODE=disabled .venv/bin/python scripts/probe_node_join.py

A head (3 CPUs, one `slot`) on free ports; a trivial UDF (0.25 s per batch of 10 rows) that needs a
`slot`, so a second actor fits only once a worker node (2 CPUs, one `slot`) joins, which it starts
doing after 300 of the 2,400 rows. Prints the rows each node's actor produced and when the worker's
first row came. Uses the node helpers of tests/test_nodes.py; stops both nodes by process group.
"""
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from test_nodes import _came_up, _env, alive_nodes, free_port, start_node  # noqa: E402
from test_pipeline_submit import _stop_group  # noqa: E402

env = _env(); port = free_port(); address = f"127.0.0.1:{port}"
head = start_node(["--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
                   f"--ray-client-server-port={free_port()}", '--resources={"slot": 1}'], env)
worker = None
try:
    _came_up(head, "head", lambda: alive_nodes(address, env) >= 1)
    os.environ.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    import ray
    ray.init(address=address, log_to_driver=False)

    class Slow:
        def __call__(self, batch):
            time.sleep(0.25)
            batch["node"] = [ray.get_runtime_context().get_node_id()] * len(batch["id"])
            batch["t"] = [time.time()] * len(batch["id"])
            return batch

    ds = ray.data.range(2400, override_num_blocks=240).map_batches(
        Slow, batch_size=10, num_cpus=0.5, resources={"slot": 1},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
    it = ds.iter_rows()
    rows = []
    t0 = time.time()
    for r in it:
        rows.append(r)
        if len(rows) == 300 and worker is None:
            tj = time.time()
            worker = start_node([f"--address={address}", "--num-cpus=2", '--resources={"slot": 1}'], env)
            print(f"worker started joining at {tj - t0:.1f}s", flush=True)
    nodes = {n["NodeID"]: ("head" if n["Resources"].get("node:__internal_head__") else "worker") for n in ray.nodes()}
    by = collections.Counter(nodes.get(r["node"], r["node"]) for r in rows)
    first_worker = min((r["t"] for r in rows if nodes.get(r["node"]) == "worker"), default=None)
    print("rows", len(rows), "by node", dict(by), f"wall {time.time() - t0:.1f}s",
          "first worker row at", None if first_worker is None else f"{first_worker - t0:.1f}s", flush=True)
finally:
    for g in (worker, head):
        if g is not None:
            _stop_group(g); os.unlink(g.log)
