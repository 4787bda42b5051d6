"""The generation job: validate, connect to Ray, resume, read -> decode on actors -> Parquet, manifest.

    from pipeline.config import load_job_config
    from pipeline.run import run
    summary = run(load_job_config("my_job.yaml"))

Everything that can be wrong with the configuration, the input's columns or the output directory
is checked before Ray starts. Resume: the ids in the output directory's visible Parquet parts are
skipped (parts appear atomically, see `pipeline.output`), so rerunning a job processes only what
is missing and a completed rerun writes nothing. A run holds the output's lock (`pipeline.lock`)
from before it reads the output to the end, and says `complete` only where the parts hold every
input id (`pipeline.completeness`); the manifest alone is never trusted for that.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from pipeline import io as pio
from pipeline import completeness, console, leftovers, nodes, output, storage
from pipeline.lock import OutputLock
from pipeline.actor import ActorSpec
from pipeline.replica import rank_bundle
from pipeline.resources import Resources, check_replica_fits, resolve_resources  # noqa: F401 (tests import them from here)
from pipeline.config import JobConfig, JobConfigError
from pipeline.stage import (NOT_IN_SETTINGS, DecodeStage, StageConfig, StagePlan, check_chat_template,  # noqa: F401
                            plan_stage)
from prophet.config import CalibrationWarning

VERSIONED = ("prophet-dlm", "torch", "ray", "deepspeed", "pyarrow", "datasets", "pydantic", "tokenizers",
             "safetensors", "transformers")


class PipelineError(RuntimeError):
    """The job could not run to the end; the message says why and what to change."""


class Interrupted(BaseException):
    """SIGTERM reached the driver (a scheduler's warning before it kills): stop, keep what is written.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; the parts written so far are kept, "
                         "parts in flight are discarded; rerun the same command to resume")
        self.signum = signum


@contextmanager
def _sigterm_interrupts():
    """Within the block, SIGTERM raises Interrupted in the main thread (elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Plan:
    """What the driver decided before Ray starts."""

    cfg: JobConfig
    fmt: str
    decode: dict                  # DecodeConfig.to_dict() with the resolved host and anchor ids
    settings: dict                # what decides a row's output (hashed into settings_hash)
    settings_hash: str
    fingerprint: str | None       # of the input files (None where not local)
    input_schema: Any = None      # pa.Schema: union of the Parquet inputs' schemas (None for other formats)
    chat_template: bool = False   # plain prompts go through the model's chat template (input.chat_template)
    token_ids: dict = field(default_factory=dict)  # mask/pad/eos/eot ids decoding uses (config.json's)


@dataclass
class Summary:
    """The outcome of one run of a job."""

    output: str
    rows: int                     # rows written by this run
    ok: int
    errors: int
    skipped: int                  # ids already in the output before this run
    total_rows: int               # rows in the output directory now
    unique_ids: int
    wall_s: float
    status: str                   # "complete", "partial" (a limit was set), "incomplete" (input ids
                                  # missing from the output: rerun) or "nothing to do"
    settings_hash: str
    run_id: str
    extra: dict = field(default_factory=dict)
    input_ids: int | None = None  # ids the input gives (rows x num_samples)
    output_ids: int | None = None  # of those, how many the output's parts hold (ok or error rows)
    missing_ids: int | None = None
    duplicate_rows: int | None = None  # rows whose id another row of the output already has
    missing_examples: list = field(default_factory=list)
    problem: str | None = None    # why the output is not complete and what to do (status "incomplete")

    @property
    def rows_per_s(self) -> float:
        """Rows written per wall second of this run."""
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        """JSON-able dict for the last stdout line."""
        return {**{k: v for k, v in asdict(self).items() if k != "extra"}, "rows_per_s": round(self.rows_per_s, 3),
                **self.extra}

    def text(self) -> str:
        """A few lines for people."""
        return (f"{self.status}: {self.rows} rows written ({self.ok} ok, {self.errors} errors), {self.skipped} "
                f"already done; {self.output} holds {self.total_rows} rows, {self.unique_ids} distinct ids"
                f"{self._ids_text()}\n"
                f"wall {self.wall_s:.1f}s, {self.rows_per_s:.2f} rows/s, settings {self.settings_hash}"
                + self._fallback_text() + self._restart_text() + (f"\n{self.problem}" if self.problem else ""))

    def with_ids(self, found: completeness.Completeness) -> "Summary":
        """This summary with the output's input-id counts (see pipeline.completeness)."""
        self.input_ids, self.output_ids = found.input_ids, found.output_ids
        self.missing_ids, self.duplicate_rows = found.missing_ids, found.duplicate_rows
        self.missing_examples = found.missing_examples
        return self

    def _ids_text(self) -> str:
        if self.input_ids is None:
            return ""
        line = f": {self.output_ids} of the input's {self.input_ids} ids"
        if self.missing_ids:
            more = ", ..." if self.missing_ids > len(self.missing_examples) else ""
            line += f", {self.missing_ids} missing ({', '.join(self.missing_examples)}{more})"
        if self.duplicate_rows:
            line += f", {self.duplicate_rows} rows repeating an id"
        return line

    def _fallback_text(self) -> str:
        """A line on batches decoded row by row (a slow path that must not stay silent), or nothing."""
        fb = self.extra.get("batch_fallbacks") or {}
        if not fb.get("batches"):
            return ""
        return (f"\n{fb['batches']} batches ({fb['rows']} rows) fell back to row-by-row decoding; "
                f"first error: {fb['first_error']}")

    def _restart_text(self) -> str:
        """A line on replicas that lost a rank and restarted (execution.tensor_parallel > 1), or nothing."""
        rs = self.extra.get("replica_restarts") or {}
        if not rs.get("restarts"):
            return ""
        return (f"\n{rs['restarts']} replica restart(s): a rank was lost, the replica restarted and its batch "
                f"was retried; first: {rs['first_reason']}")


# ----------------------------------------------------------------------------- before Ray

def plan_job(cfg: JobConfig) -> Plan:
    """Validate everything that can be checked without Ray; raise JobConfigError naming the field."""
    storage.use_endpoint(cfg.storage.s3_endpoint)
    storage.check_bucket(cfg.input.path, "input.path")
    storage.check_bucket(cfg.output.dir, "output.dir")
    _check_paths(cfg)
    fmt = pio.detect_format(cfg.input)
    schema = None
    if fmt == "parquet":
        schema = pio.check_parquet_files(cfg.input)
    rows = pio.peek_rows(cfg.input, fmt)
    pio.check_columns(cfg.input, rows.schema)
    pio.check_unique_ids(cfg.input, fmt)
    sp = plan_stage(cfg)
    check_chat_template(StageConfig.from_job(cfg), sp.chat_template, rows)
    return Plan(cfg, fmt, sp.decode, sp.settings, sp.settings_hash, _input_fingerprint(cfg.input.path), schema,
                sp.chat_template, sp.token_ids)


def _check_paths(cfg: JobConfig) -> None:
    """The output may not be the input, inside it, or hold it (nothing in the input is ever touched)."""
    if "://" in cfg.output.dir or "://" in cfg.input.path:
        if cfg.output.dir.rstrip("/") == cfg.input.path.rstrip("/"):
            raise JobConfigError(f"output.dir: {cfg.output.dir} is the input; choose another prefix")
        return
    out, inp = Path(cfg.output.dir).resolve(), Path(cfg.input.path).resolve()
    if out == inp or inp in out.parents:
        raise JobConfigError(f"output.dir: {cfg.output.dir} is the input or inside it; choose another directory")
    if out in inp.parents:
        raise JobConfigError(f"output.dir: {cfg.output.dir} holds the input {cfg.input.path}; choose another directory")


def _input_fingerprint(path: str) -> str | None:
    """Hash of the input files' names, sizes and modification times (local or object storage)."""
    if storage.is_remote(path):
        fs, base = storage.filesystem(path)
        infos = fs.get_file_info(storage.list_files(path))
        items = [(i.path[len(base):].lstrip("/") or i.base_name, i.size, i.mtime_ns) for i in infos]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    root = Path(path)
    files = pio.input_files_any(root)
    items = [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def prepare_output(plan: Plan) -> tuple[dict | None, bool]:
    """Overwrite or check that a resumed output belongs to this job; returns (old manifest, complete)."""
    cfg, out = plan.cfg, plan.cfg.output.dir
    if cfg.output.overwrite:
        foreign = output.foreign_parquet(out)
        if foreign:
            raise JobConfigError(f"output.dir: {out} holds Parquet files this pipeline did not write "
                                 f"({', '.join(Path(f).name for f in foreign[:3])}); --overwrite deletes only its "
                                 "own parts, so choose another directory")
        output.clear(out)
        return None, False
    old = output.read_manifest(out)
    if old is None:
        if output.part_files(out):
            fix = "choose another directory" + ("" if output.foreign_parquet(out) else " or pass --overwrite")
            raise JobConfigError(f"output.dir: {out} holds Parquet files but no .manifest.json; it is not this "
                                 f"pipeline's output: {fix}")
        return None, False
    if old.get("settings_hash") != plan.settings_hash:
        diff = _diff(old.get("settings", {}).get(old.get("settings_hash"), {}), plan.settings)
        raise JobConfigError(f"output.dir: {out} holds rows decoded with other settings (hash "
                             f"{old.get('settings_hash')} vs {plan.settings_hash}; {diff}): use another "
                             "--output, or --overwrite to start over")
    if old.get("input", {}).get("path") not in (None, str(cfg.input.path)):
        raise JobConfigError(f"output.dir: {out} holds results of input {old['input']['path']}, not "
                             f"{cfg.input.path}: use another --output, or --overwrite")
    complete = (old.get("status") == "complete" and plan.fingerprint is not None
                and old.get("input", {}).get("fingerprint") == plan.fingerprint)
    return old, complete


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    keys = sorted(set(old) | set(new))
    parts = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{k}.")
            parts += [sub] if sub else []
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- Ray

def connect_ray(cfg: JobConfig, log: Callable[[str], None] = print) -> bool:
    """Connect to the job's Ray, or start a local one; returns True when this call started it.

    Before a local one starts, the agents a SIGKILLed earlier job's local Ray left running are ended
    (`pipeline.leftovers`): they hold memory and the dashboard agent's port for minutes."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.execution.ray_address
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()  # inside `ray job submit`: the cluster's own resources, none passed
    else:
        # A private single-machine Ray for this job: bound to localhost and gone when the job ends,
        # so token auth (on by default in Ray 2.60) would only get in the way of `ray` CLI tools.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        cpus = cfg.execution.local_cpus or (os.cpu_count() or 1) + 1
        leftovers.end_leftovers(log)
        # "local": a new instance even where `ray start` left a cluster (or its address file) behind
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        return True
    return False


def decode_stage(plan: Plan, res: Resources, run_id: str | None = None) -> DecodeStage:
    """The job's decode stage: the one users put in their own Ray Data pipelines (pipeline.stage),
    given this job's plan and resources; the job's reader has already assigned the ids. With a run_id,
    its actors report to the run's named counters (start_counters)."""
    return DecodeStage(StageConfig.from_job(plan.cfg), StagePlan(plan.decode, plan.settings, plan.settings_hash,
                                                                     plan.chat_template, plan.token_ids),
                       assign_ids=False, resources=res, fallback_counter=run_id and FALLBACKS.format(run_id),
                       replica_counter=run_id and RESTARTS.format(run_id))


def actor_spec(plan: Plan, res: Resources) -> ActorSpec:
    """The actor's instructions."""
    return decode_stage(plan, res).actor_spec()


def build_dataset(plan: Plan, stage: DecodeStage, done: Any, run_id: str):
    """read -> ids, drop done prompts -> (limit) -> samples -> the decode stage -> (dataset, sink); nothing
    runs yet. The limit counts prompts, so --limit 20 --num-samples 3 writes 60 rows."""
    from pipeline.datasources import PartSink, read_dataset

    cfg = plan.cfg
    n = cfg.decoding.num_samples
    ds = read_dataset(cfg.input, plan.fmt)
    ds = ds.map_batches(pio.prompts_not_done, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"id_column": cfg.input.id_column, "done": done, "schema": plan.input_schema,
                                   "num_samples": n})
    if cfg.input.limit:
        ds = ds.limit(cfg.input.limit)
    if n > 1:
        ds = ds.map_batches(pio.samples_not_done, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"done": done, "num_samples": n})
    return stage(ds), PartSink(cfg.output.dir, run_id, cfg.execution.rows_per_file)


def configure_data_context(cfg: JobConfig) -> None:
    """Ray Data settings of this job; a dataset copies the context when it is built, so call this first."""
    from ray.data import DataContext

    # bounded wait for the actor pool, behind reserve_pool's (resources taken in between end here too)
    DataContext.get_current().wait_for_min_actors_s = cfg.execution.actor_start_timeout_s


def reserve_pool(cfg: JobConfig, cluster: dict, res: Resources, stage: DecodeStage | None = None) -> None:
    """Wait until the cluster can hold the whole actor pool; past actor_start_timeout_s fail, leaving nothing behind.

    The pool's resources are asked for as one placement group, which an autoscaler sees and serves, and
    which is removed whatever happens. Ray Data's own wait, on a timeout, leaves its actors pending and
    their demand in the cluster for as long as the driver lives (Ray 2.60, measured here).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    ex = cfg.execution
    groups = stage.replica_groups() if stage is not None else None
    if groups is not None:  # replicas of N ranks: their own groups, reserved now and kept for the actors
        if not groups.reserve(ex.actors, ex.actor_start_timeout_s):
            raise _pool_did_not_start(cfg, cluster, res)
        return
    pg = placement_group([rank_bundle(res.cpus, res.gpus)] * ex.actors, strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=ex.actor_start_timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        raise _pool_did_not_start(cfg, cluster, res)


def _pool_did_not_start(cfg: JobConfig, cluster: dict, res: Resources) -> PipelineError:
    ex = cfg.execution
    each = f"each of {ex.actors} actors" + (f" (a replica of {ex.tensor_parallel} ranks on one node, each rank)"
                                            if ex.tensor_parallel > 1 else "")
    return PipelineError(
        f"no actor started within execution.actor_start_timeout_s={ex.actor_start_timeout_s}s: {each} asks for "
        f"{res.gpus:g} GPU(s) and {res.cpus:g} CPU(s); the cluster has "
        f"{cluster.get('GPU', 0):g} GPU(s) and {cluster.get('CPU', 0):g} CPU(s). Use a cluster with the GPUs "
        "(or let its autoscaler add them), lower execution.gpus_per_actor, cpus_per_actor or actors, or set "
        "gpus_per_actor: 0 to run on CPU")


def execute(ds: Any, sink: Any, cfg: JobConfig, cluster: dict, res: Resources,
            alive_at_start: dict[str, dict] | None = None) -> None:
    """Run the pipeline; a pool that cannot start (no GPU, say) fails within the configured wait, and
    a node of `alive_at_start` (`pipeline.nodes.alive_nodes`) lost mid-job stops it with an error naming the node.
    Ray's error-level line about the pool's restart arguments stays out of the console (pipeline.console: it
    does not apply here)."""
    explained = lambda e: nodes.node_loss_error(e) is not None or _write_failure(e) is not None  # noqa: E731
    try:
        with nodes.quiet_ray_data_traces(explained), console.stderr_without(console.RESTART_ARGS_WARNING):
            ds.write_datasink(sink)
    except Exception as e:
        lost = nodes.explain_node_loss(e, alive_at_start or {}, nodes.nodes_now)
        if lost is not None:
            raise PipelineError(lost) from None
        failed_write = _write_failure(e)
        if failed_write is not None:
            first_line = str(failed_write).splitlines()[0]  # Ray appends its retry advice below
            raise PipelineError(f"{first_line}. The job stopped; {output.what_is_kept(cfg.output.dir)}."
                                f"{_ray_data_log()}") from None
        if "Timed out while starting actors" not in f"{e!r} {e.__cause__!r}":
            raise
        raise _pool_did_not_start(cfg, cluster, res) from None


def _ray_data_log() -> str:
    """' Ray's own trace: <its log folder>' where Ray says where its session logs are, else ''."""
    try:
        from ray._private.worker import global_worker  # no public API names the session's log folder

        return f" Ray's own trace: {global_worker.node.get_logs_dir_path()}/ray-data/"
    except Exception:  # a private attribute that moved: the message is complete without it
        return ""


def _write_failure(e: BaseException | None) -> output.OutputWriteError | None:
    """The OutputWriteError behind an error Ray raised (task errors keep the original as `.cause`)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, output.OutputWriteError):
            return cause
        if isinstance(e, output.OutputWriteError):
            return e
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


# ----------------------------------------------------------------------------- the job

def run(cfg: JobConfig, log: Callable[[str], None] = print) -> Summary:
    """Run a generation job to the end (or resume it); returns what this run did."""
    t0 = time.time()
    plan = _plan_logging_calibration_warnings(cfg, log)
    if cfg.decoding.num_samples > 1 and samples_identical(plan.decode):
        log(f"warning: decoding.num_samples={cfg.decoding.num_samples} with temperature 0, alg_temp 0 and "
            "low-confidence remasking: every sample of a row will be identical; set --temperature > 0 "
            "(or --remasking random) to draw different ones")
    output.check_writable(cfg.output.dir)  # before Ray starts: an unwritable directory fails in seconds, not after a load
    run_id = output.new_run_id()
    # one run at a time per output, before the output is read: two would both write the same missing rows
    with OutputLock(cfg.output.dir, run_id, log) as lock:
        lock.acquire(break_lock=cfg.output.break_lock)
        return _run_locked(plan, run_id, lock, t0, log)


def _run_locked(plan: Plan, run_id: str, lock: OutputLock, t0: float, log: Callable[[str], None]) -> Summary:
    """The run, holding the output's lock: resume, decode on Ray, check the output holds every input id."""
    cfg, out = plan.cfg, plan.cfg.output.dir
    old, complete = prepare_output(plan)
    expected = completeness.input_ids(cfg.input, plan.fmt, cfg.decoding.num_samples)
    if complete:
        found = completeness.check(expected, out)
        if found.complete:
            counts = output.count_rows(out)
            log(f"{out}: already complete for this input and settings; nothing to do")
            return Summary(out, 0, 0, 0, counts["rows"], counts["rows"], counts["unique_ids"], time.time() - t0,
                           "nothing to do", plan.settings_hash, run_id).with_ids(found)
        log(f"{out}: the manifest says complete, but the parts hold {found.output_ids} of the input's "
            f"{found.input_ids} ids (a part file deleted or lost?): decoding the {found.missing_ids} missing ones")
    removed = output.remove_temp_files(out)
    done = output.done_ids(out)
    if removed or len(done):
        log(f"{out}: resuming: {len(done)} ids already written are skipped"
            + (f", {removed} partial parts of a killed run removed" if removed else ""))
    log(f"job checked in {time.time() - t0:.1f}s: {plan.fmt} input {cfg.input.path}, model {cfg.model.dir}, "
        f"settings {plan.settings_hash}")
    manifest, reports = _run_on_ray(plan, done, run_id, t0, old, log)
    try:
        if rewritten := output.harmonize_parts(out):
            log(f"{out}: {rewritten} parts given the columns other parts have (inputs differ in their keys)")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # the rows are complete; only one-schema readers mind
        log(f"{out}: parts differ in column types and were left as they are ({e})")
    counts = output.count_rows(out, run_id=run_id)
    found = completeness.check(expected, out)
    summary = Summary(out, counts["run_rows"], counts["run_ok"], counts["run_rows"] - counts["run_ok"], len(done),
                      counts["rows"], counts["unique_ids"], time.time() - t0, "complete", plan.settings_hash, run_id,
                      extra=reports).with_ids(found)
    summary.status, summary.problem = _verdict(cfg, found, lock.lost)
    _finish_manifest(manifest, summary, {**counts, **found.to_dict()})
    output.write_manifest(out, manifest)
    return summary


def _verdict(cfg: JobConfig, found: completeness.Completeness, lock_lost: str | None) -> tuple[str, str | None]:
    """(status, problem) of a finished run: complete only where the parts hold every input id."""
    if lock_lost is not None:
        return "incomplete", (f"{lock_lost} mid-run, so rows may have been written twice; let that run end, "
                              "then rerun this command: it checks the output and decodes what is missing")
    if cfg.input.limit:
        return "partial", None
    if not found.complete:
        return "incomplete", (f"the output lacks {found.missing_ids} of the input's {found.input_ids} ids (parts "
                              "deleted or lost while the job ran?): rerun the same command to decode them")
    return "complete", None


def _plan_logging_calibration_warnings(cfg: JobConfig, log: Callable[[str], None]) -> Plan:
    """plan_job, with a calibration's path warning (prophet.config.CalibrationWarning) said once in the
    job's log, where the user reads the rest; other warnings go on as they came."""
    with warnings.catch_warnings(record=True) as caught:  # the other filters stay as the caller set them
        warnings.simplefilter("always", CalibrationWarning)
        plan = plan_job(cfg)
    for w in caught:
        if issubclass(w.category, CalibrationWarning):
            log(f"warning: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return plan


def _run_on_ray(plan: Plan, done: Any, run_id: str, t0: float, old: dict | None,
                log: Callable[[str], None]) -> tuple[dict, dict]:
    """Connect to Ray, then decode with SIGTERM turned into Interrupted; (manifest, the counters' reports)."""
    started = connect_ray(plan.cfg, log)
    # after ray.init, which installs its own SIGTERM handler (it aborts the driver without a word)
    with _sigterm_interrupts():
        return _decode_all(plan, done, run_id, t0, old, log, started)


def _decode_all(plan: Plan, done: Any, run_id: str, t0: float, old: dict | None, log: Callable[[str], None],
                started: bool) -> tuple[dict, dict]:
    """Write the running manifest, decode everything, stop a Ray this run started; (manifest, the reports of
    the run's counters by summary key: batch_fallbacks, and replica_restarts for replicas of ranks)."""
    import ray

    cfg, out = plan.cfg, plan.cfg.output.dir
    try:
        cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
        alive_at_start = nodes.alive_nodes(ray.nodes())  # to size actors, and to name a node lost mid-job
        res = resolve_resources(cfg, cluster, nodes.largest_cpus(alive_at_start))
        waiting = check_replica_fits(cfg, res, alive_at_start, can_grow=not started)
        log(f"Ray {'started' if started else 'joined'} at {time.time() - t0:.1f}s: {cluster.get('CPU', 0):g} CPUs, "
            f"{cluster.get('GPU', 0):g} GPUs; {cfg.execution.actors} actors x "
            + (f"{cfg.execution.tensor_parallel} ranks x " if cfg.execution.tensor_parallel > 1 else "")
            + f"{res.cpus:g} CPU, {res.gpus:g} GPU")
        if waiting:
            log(waiting)
        manifest = _manifest(plan, old, run_id, t0, cluster, res)
        output.write_manifest(out, manifest)
        configure_data_context(cfg)
        stage = decode_stage(plan, res, run_id)
        try:
            reserve_pool(cfg, cluster, res, stage)
            counters = start_counters(run_id, cfg.execution.tensor_parallel > 1)
            ds, sink = build_dataset(plan, stage, done, run_id)
            execute(ds, sink, cfg, cluster, res, alive_at_start)
            reports = {key: ray.get(c.report.remote()) for key, c in counters.items()}
        except BaseException as e:
            _mark_failed(out, manifest, e)
            raise
        finally:
            stage.release()
    finally:
        if started:
            ray.shutdown()
    return manifest, reports


FALLBACKS = "prophet-fallbacks-{}"  # the run's named counters, by run id
RESTARTS = "prophet-replica-restarts-{}"


def start_counters(run_id: str, replicas: bool) -> dict[str, Any]:
    """The run's named counter actors (no CPU, so they never take a decode actor's place), by summary key:
    batch_fallbacks (FallbackCounter), and replica_restarts (RestartCounter) where replicas have ranks."""
    import ray

    from pipeline.actor import FallbackCounter
    from pipeline.replica import RestartCounter

    kinds = {"batch_fallbacks": (FallbackCounter, FALLBACKS)}
    if replicas:
        kinds["replica_restarts"] = (RestartCounter, RESTARTS)
    return {key: ray.remote(cls).options(name=name.format(run_id), num_cpus=0).remote()
            for key, (cls, name) in kinds.items()}


def samples_identical(decode: dict) -> bool:
    """Whether a decode ignores its seed (argmax tokens, confidence-ordered unmasking): then several
    samples per row are copies of one."""
    return (float(decode.get("temperature", 0)) == 0 and float(decode.get("alg_temp", 0)) == 0
            and decode.get("remasking", "low_confidence") != "random")


def _manifest(plan: Plan, old: dict | None, run_id: str, t0: float, cluster: dict, res: Resources) -> dict:
    cfg = plan.cfg
    manifest = dict(old or {})
    settings = dict(manifest.get("settings", {}))
    settings[plan.settings_hash] = plan.settings
    manifest.update({
        "format": "prophet-dlm generate v1",
        "status": "running",
        "settings_hash": plan.settings_hash,
        "settings": settings,
        "job": cfg.model_dump(mode="json"),
        "decode": plan.decode,
        "input": {"path": str(cfg.input.path), "format": plan.fmt, "fingerprint": plan.fingerprint},
        "model": {"dir": cfg.model.dir, "name": plan.settings["model"], "dtype": cfg.dtype,
                  "engine": cfg.model.engine, "token_ids": plan.token_ids, "chat_template": plan.chat_template},
        "resources": asdict(res),
        "versions": versions(),
        "host": host_info(cluster),
        "started_at": t0,
        "started_at_iso": _iso(t0),
    })
    manifest.setdefault("first_started_at", t0)
    manifest["runs"] = [*manifest.get("runs", []), {"run_id": run_id, "started_at": t0, "status": "running"}]
    return manifest


def _finish_manifest(manifest: dict, s: Summary, counts: dict) -> None:
    end = time.time()
    manifest["runs"][-1].update({"ended_at": end, "wall_s": round(s.wall_s, 3), "rows": s.rows, "ok": s.ok,
                                 "errors": s.errors, "skipped": s.skipped, "status": s.status, "problem": s.problem,
                                 **s.extra})
    manifest.update({"status": s.status, "ended_at": end, "ended_at_iso": _iso(end), "wall_s": round(s.wall_s, 3),
                     "rows": {k: counts[k] for k in ("rows", "ok", "errors", "unique_ids", "files", "input_ids",
                                                     "output_ids", "missing_ids", "duplicate_rows")},
                     **s.extra})


def _mark_failed(out: str, manifest: dict, e: BaseException) -> None:
    """Record a failed run in the manifest where the directory still takes it (a resume ignores the status)."""
    reason = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
    status = "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed"
    manifest["runs"][-1].update({"ended_at": time.time(), "status": status, "error": reason})
    manifest["status"] = status
    try:
        output.write_manifest(out, manifest)
    except OSError:
        pass  # the output directory is what failed; the error itself reaches the user


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages that decide the output."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def host_info(cluster: dict) -> dict:
    """The driver's host and the cluster's resources (GPU kinds from Ray's accelerator labels)."""
    return {"driver": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cluster_cpus": cluster.get("CPU", 0), "cluster_gpus": cluster.get("GPU", 0),
            "accelerators": sorted(k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:")),
            "argv": sys.argv}
