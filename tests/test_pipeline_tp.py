"""Replicas of N ranks through the real pipeline (execution.tensor_parallel, pipeline/replica.py).

tp 2 over gloo on the session's local Ray must give the tokens tp 1 gives: the reference is the same
job's GenerateActor at tp 1, run in this process on the same rows (the code a tp 1 pool runs). A
SIGKILLed rank 1 must restart its replica and lose or repeat no row. The refusals need no Ray.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_support import actor_processes

from pipeline import output
from pipeline.actor import GenerateActor
from pipeline.config import JobConfigError, load_job_config
from pipeline.replica import Replica, ReplicaLost, RestartCounter, check_tensor_parallel, settle
from pipeline.resources import Resources, check_replica_fits, resolve_resources
from pipeline.run import actor_spec, plan_job, run
from pipeline.stage import StageConfig, build_stage

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"


def write_prompts(path: Path, task_rows: list[dict], n: int) -> Path:
    """n rows cycling over the task prompts (ids are '<file>:<line>', so repeats are distinct rows)."""
    path.write_text("".join(json.dumps({"prompt": task_rows[i % len(task_rows)]["prompt"]}) + "\n" for i in range(n)))
    return path


def job(src: Path, out: Path, model: str, tp: int, **over):
    """One replica of tp ranks, each on a quarter CPU of the session's 4, small batches and parts."""
    base = {"input.path": str(src), "output.dir": str(out), "model.dir": str(CKPT / model),
            "decoding.gen_length": 16, "decoding.steps": 16, "decoding.batch_size": 4, "execution.actors": 1,
            "execution.tensor_parallel": tp, "execution.cpus_per_actor": 0.25, "execution.batch_size": 4,
            "execution.rows_per_file": 4}
    return load_job_config(None, {**base, **over})


def rank_actors() -> set[str]:
    """Ids of the session's RankActor actors ever created (the GCS table, dead ones too)."""
    from ray._private.state import actors

    return {aid for aid, a in actors().items() if "RankActor" in a.get("ActorClassName", "")}


def tokens_by_id(out: Path) -> dict[str, list[int]]:
    table = pa.concat_tables([pq.read_table(p) for p in output.part_files(str(out))])
    assert set(table.column("status").to_pylist()) == {"ok"}
    return dict(zip(table.column("id").to_pylist(), table.column("completion_ids").to_pylist()))


def tp1_tokens(cfg, src: Path) -> dict[str, list[int]]:
    """What a tp 1 pool writes for the job's rows: its GenerateActor on every row, in this process."""
    plan = plan_job(cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"tensor_parallel": 1})}))
    actor = GenerateActor(actor_spec(plan, Resources(cpus=1, gpus=0, threads=1)))
    lines = src.read_text().splitlines()
    batch = pa.table({"prompt": [json.loads(line)["prompt"] for line in lines],
                      "id": [f"{src.name}:{i}" for i in range(len(lines))]})
    out = actor(batch)
    return dict(zip(out.column("id").to_pylist(), out.column("completion_ids").to_pylist()))


def assert_tp2_matches_tp1(tmp_path: Path, task_rows: list[dict], model: str, n: int = 8, actors: int = 1,
                           **decoding) -> None:
    src = write_prompts(tmp_path / f"{model}.jsonl", task_rows, n)
    cfg = job(src, tmp_path / f"out-{model}", model, 2, **{"execution.actors": actors},
              **{f"decoding.{k}": v for k, v in decoding.items()})
    before = rank_actors()
    s = run(cfg, log=lambda _: None)
    assert (s.status, s.ok, s.extra["replica_restarts"]["restarts"]) == ("complete", n, 0)
    assert len(rank_actors() - before) == actors  # each replica's rank 1 was a Ray actor of its own
    got = tokens_by_id(tmp_path / f"out-{model}")
    assert got == tp1_tokens(cfg, src)
    assert len({tuple(t) for t in got.values()}) > 1  # rows decoded to different things: a real comparison


# ----------------------------------------------------------------------------- tp 2 == tp 1 on Ray

@pytest.mark.ray
def test_tp2_llada_dual_cache_prophet_sampled_gives_the_tokens_of_tp1(ray_local, tmp_path, task_rows):
    assert_tp2_matches_tp1(tmp_path, task_rows, "tiny-llada", cache="dual", rule="prophet", temperature=0.7,
                           block_length=8)


@pytest.mark.ray
def test_tp2_dream_prefix_cache_full_argmax_on_two_replicas_gives_the_tokens_of_tp1(ray_local, tmp_path, task_rows):
    # two replicas: each actor gets a placement group of its own
    assert_tp2_matches_tp1(tmp_path, task_rows, "tiny-dream", actors=2, cache="prefix", rule="full",
                           temperature=0.0, block_length=8)


@pytest.mark.ray
def test_tp2_llada2_block_host_gives_the_tokens_of_tp1(ray_local, tmp_path, task_rows):
    assert_tp2_matches_tp1(tmp_path, task_rows, "tiny-llada2")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("rule", ["prophet", "full"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_tp2_gives_the_tokens_of_tp1_across_caches_rules_and_temperatures(ray_local, tmp_path, task_rows, model,
                                                                          cache, rule, temperature):
    assert_tp2_matches_tp1(tmp_path, task_rows, model, cache=cache, rule=rule, temperature=temperature,
                           block_length=8)


# ----------------------------------------------------------------------------- a lost rank

def run_signalling_rank1(cfg, sig: int):
    """Run the job, sending `sig` to rank 1 once two parts are written (rank 1 is then inside a batch: rank 0
    keeps it busy while rows remain); (summary, the signalled pids)."""
    sent: list[int] = []

    def signaller() -> None:
        deadline = time.time() + 240
        while not sent and time.time() < deadline:
            pids = actor_processes("RankActor")
            if pids and len(output.part_files(cfg.output.dir)) >= 2:
                os.kill(pids[0], sig)
                sent.append(pids[0])
            time.sleep(0.02)

    thread = threading.Thread(target=signaller, daemon=True)
    thread.start()
    s = run(cfg, log=lambda _: None)
    thread.join(timeout=5)
    assert sent, f"rank 1 never got {signal.Signals(sig).name}"
    return s, sent


@pytest.mark.ray
def test_rank1_killed_mid_job_restarts_the_replica_and_writes_every_id_once(ray_local, tmp_path, task_rows):
    n = 48
    src = write_prompts(tmp_path / "many.jsonl", task_rows, n)
    cfg = job(src, tmp_path / "out", "tiny-llada", 2)
    s, _ = run_signalling_rank1(cfg, signal.SIGKILL)
    ids = [i for p in output.part_files(cfg.output.dir) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"{src.name}:{i}" for i in range(n))  # every id, exactly once
    assert (s.status, s.ok, s.errors, s.duplicate_rows) == ("complete", n, 0, 0)
    restarts = s.extra["replica_restarts"]
    assert restarts["restarts"] >= 1 and restarts["first_reason"].startswith("rank 1 died"), restarts
    assert "replica restart(s): a rank was lost" in s.text()
    manifest = output.read_manifest(cfg.output.dir)
    assert manifest["replica_restarts"] == restarts and manifest["runs"][-1]["replica_restarts"] == restarts
    assert not pending_groups(ray_local)  # the run gave its replicas' placement groups back


@pytest.mark.ray
@pytest.mark.slow
def test_rank1_that_hangs_is_lost_after_rank_timeout_s_and_the_replica_restarts(ray_local, tmp_path, task_rows):
    n = 24
    src = write_prompts(tmp_path / "hang.jsonl", task_rows, n)
    cfg = job(src, tmp_path / "out", "tiny-llada", 2, **{"execution.rank_timeout_s": 5})
    s, _ = run_signalling_rank1(cfg, signal.SIGSTOP)  # alive to the OS and to Ray, silent to its peers
    assert (s.status, s.ok, s.duplicate_rows) == ("complete", n, 0)
    restarts = s.extra["replica_restarts"]
    assert restarts["restarts"] >= 1 and "rank 1 did not decode within 5s" in restarts["first_reason"], restarts


def pending_groups(ray_local) -> list[dict]:
    return [g for g in ray_local.util.placement_group_table().values() if g["state"] != "REMOVED"]


# ----------------------------------------------------------------------------- lockstep, no Ray

def result(tokens: list[list[int]]) -> SimpleNamespace:
    """A DecodeResult stand-in: settle() reads tokens and num_generated."""
    return SimpleNamespace(tokens=torch.tensor(tokens), num_generated=torch.tensor([len(t) for t in tokens]))


def test_settle_returns_rank0s_result_when_every_rank_agrees_and_refuses_tokens_that_differ():
    mine = result([[5, 6], [7, 8]])
    assert settle(mine, [([[5, 6], [7, 8]], [2, 2])] * 3) is mine
    with pytest.raises(RuntimeError, match="rank 2's tokens differ"):
        settle(mine, [([[5, 6], [7, 8]], [2, 2]), ([[5, 6], [7, 9]], [2, 2])])


def test_settle_leaves_an_error_every_rank_raised_to_the_rows_and_ends_a_replica_out_of_step():
    with pytest.raises(ValueError, match="bad row"):  # the caller isolates the row, in lockstep
        settle(ValueError("bad row"), [ValueError("bad row")])
    with pytest.raises(ReplicaLost, match=r"rank 0 raised RuntimeError: Connection closed by peer"):
        settle(RuntimeError("Connection closed by peer"), [([[5]], [1])])
    with pytest.raises(ReplicaLost, match="rank 1 raised"):
        settle(result([[5]]), [RuntimeError("gloo timeout")])
    # every rank raised, but apart: rank 1 failed mid-forward and rank 0's all-reduce then lost its peer
    with pytest.raises(ReplicaLost, match=r"ranks failed apart: rank 0 raised RuntimeError: \[gloo"):
        settle(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"), [MemoryError("out")])
    with pytest.raises(ReplicaLost, match=r"ranks failed apart: rank 1 raised ValueError: other"):
        settle(ValueError("bad row"), [ValueError("other")])


def test_a_lost_rank_reaches_the_loss_handler_and_never_becomes_row_errors(monkeypatch):
    from pipeline.actor import ActorSpec
    from pipeline.replica import ReplicaSpec
    from prophet.config import DecodeConfig

    spec = ActorSpec(model_dir=str(CKPT / "tiny-llada"), dtype="fp32", engine="torch", device="cpu",
                     decode=DecodeConfig(gen_length=8, steps=8).to_dict(), seed=0, settings_hash="h",
                     prompt_column="prompt", replica=ReplicaSpec(size=2, cpus=1, gpus=0, start_timeout_s=5))
    lost: list[str] = []

    def start(self, dtype):  # rank 0 without its Ray ranks: this test is about what a loss does
        self.on_loss = lost.append
        return [], []

    def lose(self, prompts, seeds):
        raise ReplicaLost("rank 1 died during decode: ActorDiedError: killed")

    monkeypatch.setattr(Replica, "_start", start)
    monkeypatch.setattr(Replica, "_decode", lose)
    actor = GenerateActor(spec)
    batch = pa.table({"prompt": ["a b", "c d"], "id": ["x", "y"]})
    with pytest.raises(ReplicaLost):  # in a real actor on_loss exits the process: Ray restarts it
        actor(batch)
    assert lost == ["rank 1 died during decode: ActorDiedError: killed"]
    assert actor.fallbacks.report()["batches"] == 0  # no row-by-row retry, no per-row "decode failed"


def test_restart_counter_counts_and_keeps_the_first_reason():
    c = RestartCounter()
    c.record("rank 1 died")
    c.record("rank 1 did not decode within 300s")
    assert c.report() == {"restarts": 2, "first_reason": "rank 1 died"}
    c.record_restarted(), c.record_restarted()  # the two restarts those losses caused: not counted twice
    assert c.report() == {"restarts": 2, "first_reason": "rank 1 died"}
    silent = RestartCounter()  # rank 0 ended without a word (NCCL's watchdog, a kill), then came back
    silent.record_restarted()
    assert silent.report()["restarts"] == 1 and "without a reason" in silent.report()["first_reason"]
    assert RestartCounter().report() == {"restarts": 0, "first_reason": None}


# ----------------------------------------------------------------------------- refused up front, no Ray

def stage(model: Path | str, tp: int, **over) -> StageConfig:
    model_dir = model if isinstance(model, Path) else CKPT / model
    tree = {"model": {"dir": str(model_dir)}, "execution": {"tensor_parallel": tp}}
    for dotted, value in over.items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    return StageConfig.model_validate(tree)


@pytest.mark.parametrize("model,tp,fix", [("tiny-llada", 3, r"set it to one of \[2, 4\]"),
                                          ("tiny-dream", 4, r"set it to one of \[2\]"),
                                          ("tiny-llada2", 3, r"set it to one of \[2\]")])
def test_a_size_that_does_not_divide_the_heads_is_refused_naming_the_field(model, tp, fix):
    with pytest.raises(JobConfigError, match=rf"execution.tensor_parallel: {tp} does not divide the model's .*{fix}"):
        build_stage(stage(model, tp).model_dump())


def test_sizes_that_divide_the_heads_pass_and_tp1_is_never_checked():
    for model in ("tiny-llada", "tiny-dream", "tiny-llada2"):
        check_tensor_parallel(stage(model, 2))
    check_tensor_parallel(stage("tiny-llada", 1, **{"model.engine": "torch"}))


def test_tp_with_the_torch_engine_is_refused():
    with pytest.raises(JobConfigError, match=r"model.engine: 'torch' with execution.tensor_parallel 2: .*deepspeed"):
        check_tensor_parallel(stage("tiny-llada", 2, **{"model.engine": "torch"}))


def test_tp_with_a_masked_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                      "num_attention_heads": 4}))
    with pytest.raises(JobConfigError, match=r"execution.tensor_parallel: 2, but .* is a transformers masked LM"):
        check_tensor_parallel(stage(tmp_path, 2))


@pytest.mark.parametrize("gpus", [0.5, 2])
def test_anything_but_one_gpu_per_rank_is_refused(gpus):
    with pytest.raises(JobConfigError, match=rf"execution.gpus_per_actor: {gpus:g} with execution.tensor_parallel 2"):
        check_tensor_parallel(stage("tiny-llada", 2, **{"execution.gpus_per_actor": gpus}))


def test_a_llada_mlp_width_the_ranks_cannot_split_alike_is_refused(tmp_path):
    # AutoTP cuts LLaDA's ff_proj by heads and up_proj in head_dim grains: unequal shares unless
    # tensor_parallel x head_dim divides the width (352 = 11 heads' widths of 32: 2 ranks cannot share it)
    raw = json.loads((CKPT / "tiny-llada" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "mlp_hidden_size": 352}))
    with pytest.raises(JobConfigError, match=r"tensor_parallel: 2 x the model's head_dim 32 does not divide its "
                                             r"mlp_hidden_size 352"):
        check_tensor_parallel(stage(tmp_path, 2))


def node(cpus: float, gpus: float = 0.0) -> dict:
    return {"NodeID": f"n{cpus}-{gpus}", "Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_a_replica_no_node_can_hold_is_refused_naming_what_to_lower():
    alive = {"a": node(16, 2), "b": node(16, 2)}  # 4 GPUs in the cluster, 2 per node
    four = stage("tiny-llada", 4, **{"execution.gpus_per_actor": 1})
    with pytest.raises(JobConfigError, match=r"replica of 4 ranks x 1 GPU\(s\).* needs 4 GPU\(s\).*at most 2 "
                                             r"GPU\(s\), 16 CPU\(s\).*execution.gpus_per_actor"):
        check_replica_fits(four, Resources(cpus=1, gpus=1, threads=1), alive)
    # a cluster the run joined may grow (cluster.yaml's GPU nodes come on demand): said, and left to the wait
    said = check_replica_fits(four, Resources(cpus=1, gpus=1, threads=1), alive, can_grow=True)
    assert said and "needs 4 GPU(s)" in said and "waiting up to execution.actor_start_timeout_s" in said
    assert check_replica_fits(stage("tiny-llada", 2, **{"execution.gpus_per_actor": 1}), Resources(1, 1, 1), alive) is None
    with pytest.raises(JobConfigError, match=r"needs 0 GPU\(s\) and 12 CPU\(s\).*execution.cpus_per_actor"):
        check_replica_fits(stage("tiny-llada", 4), Resources(cpus=3, gpus=0, threads=3), {"c": node(8)})


def test_cpu_sizing_counts_every_rank_of_every_replica():
    cluster = {"CPU": 4.0}
    res = resolve_resources(stage("tiny-llada", 2, **{"execution.actors": 1}), cluster, node_cpus=4)
    assert res.cpus == 1.5  # 3 CPUs (one left for read/write) over 2 ranks
    with pytest.raises(JobConfigError, match=r"1 actors x 4 ranks x 1.0 CPUs leave no CPU"):
        resolve_resources(stage("tiny-llada", 4, **{"execution.actors": 1, "execution.cpus_per_actor": 1}), cluster)
    assert resolve_resources(stage("tiny-llada", 2, **{"execution.actors": 2, "execution.cpus_per_actor": 0.5}),
                             cluster).cpus == 0.5
