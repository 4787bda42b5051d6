"""The generation job: validate, connect to Ray, resume, read -> decode on actors -> Parquet, manifest.

    from pipeline.config import load_job_config
    from pipeline.run import run
    summary = run(load_job_config("my_job.yaml"))

Everything that can be wrong with the configuration, the input's columns or the output directory
is checked before Ray starts. Resume: the ids in the output directory's visible Parquet parts are
skipped (parts appear atomically, see `pipeline.output`), so rerunning a job processes only what
is missing and a completed rerun writes nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from pipeline import io as pio
from pipeline import output
from pipeline.actor import ActorSpec
from pipeline.config import JobConfig, JobConfigError, settings_hash

# DecodeConfig fields that change how fast rows decode, never what they decode to (the core
# guarantees batch-independence), so a resumed job may change them.
NOT_IN_SETTINGS = ("batch_size", "continuous")
VERSIONED = ("prophet-dlm", "torch", "ray", "deepspeed", "pyarrow", "datasets", "pydantic", "tokenizers",
             "safetensors", "transformers")


class PipelineError(RuntimeError):
    """The job could not run to the end; the message says why and what to change."""


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
    status: str                   # "complete", "partial" (a limit was set) or "nothing to do"
    settings_hash: str
    run_id: str
    extra: dict = field(default_factory=dict)

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
                f"already done; {self.output} holds {self.total_rows} rows, {self.unique_ids} distinct ids\n"
                f"wall {self.wall_s:.1f}s, {self.rows_per_s:.2f} rows/s, settings {self.settings_hash}")


# ----------------------------------------------------------------------------- before Ray

def plan_job(cfg: JobConfig) -> Plan:
    """Validate everything that can be checked without Ray; raise JobConfigError naming the field."""
    _check_paths(cfg)
    fmt = pio.detect_format(cfg.input)
    schema = None
    if fmt == "parquet" and "://" not in cfg.input.path:
        schema = pio.check_parquet_files(cfg.input)
    pio.check_columns(cfg.input, pio.peek(cfg.input, fmt))
    if "://" not in cfg.input.path:
        pio.check_unique_ids(cfg.input, fmt)
    host, anchor_ids = _model_facts(cfg)
    decode = cfg.decode_config(host, anchor_ids).to_dict()
    settings = {"decode": {k: v for k, v in decode.items() if k not in NOT_IN_SETTINGS},
                "model": Path(cfg.model.dir).resolve().name, "model_files": _model_fingerprint(cfg.model.dir),
                "dtype": cfg.dtype, "seed": cfg.execution.seed,
                "prompt": cfg.input.messages_column and f"messages:{cfg.input.messages_column}"
                or f"prompt:{cfg.input.prompt_column}"}
    if cfg.decoding.num_samples != 1:  # a rerun with another num_samples is a settings change (refused)
        settings["num_samples"] = cfg.decoding.num_samples
    return Plan(cfg, fmt, decode, settings, settings_hash(settings), _input_fingerprint(cfg.input.path), schema)


def _check_paths(cfg: JobConfig) -> None:
    """The output may not be the input, inside it, or hold it (nothing in the input is ever touched)."""
    if "://" in cfg.output.dir or "://" in cfg.input.path:
        return
    out, inp = Path(cfg.output.dir).resolve(), Path(cfg.input.path).resolve()
    if out == inp or inp in out.parents:
        raise JobConfigError(f"output.dir: {cfg.output.dir} is the input or inside it; choose another directory")
    if out in inp.parents:
        raise JobConfigError(f"output.dir: {cfg.output.dir} holds the input {cfg.input.path}; choose another directory")
    if not Path(cfg.model.dir).is_dir():
        raise JobConfigError(f"model.dir: no such directory {cfg.model.dir}")


def _model_facts(cfg: JobConfig) -> tuple[str, tuple[int, ...]]:
    """(the family's default host, the anchor's token ids); the whole directory is checked, weights unread."""
    from prophet.models import ModelLoadError, Tokenizer
    from prophet.models.hf import check_remote_code
    from prophet.models.loading import check_model_dir, native_family, read_config

    m = cfg.model
    try:
        check_remote_code(m.trust_remote_code, m.revision)
    except ModelLoadError as e:
        raise JobConfigError(f"model.revision: {e}") from None
    try:
        check_model_dir(m.dir, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code, revision=m.revision)
        family = native_family(read_config(Path(cfg.model.dir)))
        host = family[0].default_host if family else "llada"
        anchor = cfg.decoding.anchor
        ids = tuple(Tokenizer.from_dir(cfg.model.dir).encode(anchor)) if anchor is not None else ()
    except ModelLoadError as e:
        raise JobConfigError(f"model.dir: {e}") from None
    if anchor is not None and not ids:
        raise JobConfigError(f"decoding.anchor: {anchor!r} has no tokens in this model's tokenizer")
    return host, ids


def _model_fingerprint(model_dir: str, sample: int = 1 << 20) -> str:
    """Hash of the model directory's files: names, sizes, and the first and last MiB of each.

    Retrained weights keep their sizes but change everywhere, so the samples tell them apart;
    reading all of an 8B model's 16 GB would cost more than the check is worth.
    """
    digest = hashlib.sha256()
    for p in sorted(q for q in Path(model_dir).iterdir() if q.is_file()):
        size = p.stat().st_size
        digest.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            digest.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]


def _input_fingerprint(path: str) -> str | None:
    """Hash of the input files' names, sizes and modification times; None for remote inputs."""
    if "://" in path:
        return None
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

def connect_ray(cfg: JobConfig) -> bool:
    """Connect to the job's Ray, or start a local one; returns True when this call started it."""
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
        # "local": a new instance even where `ray start` left a cluster (or its address file) behind
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        return True
    return False


def _largest_node_cpus() -> float | None:
    """CPUs of the biggest alive node (an actor must fit on one)."""
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(cpus) if cpus else None


@dataclass(frozen=True)
class Resources:
    """Per-actor resources decided from the config and the cluster."""

    cpus: float
    gpus: float
    threads: int


def resolve_resources(cfg: JobConfig, cluster: dict, node_cpus: float | None = None) -> Resources:
    """Per-actor CPUs/GPUs; on CPU, refuse a pool that would leave no CPU for read/write tasks.

    `node_cpus` (the largest node's CPUs) caps the default share, so an actor fits on one node.
    """
    ex = cfg.execution
    total = float(cluster.get("CPU", 0))
    if ex.gpus_per_actor > 0:
        cpus = ex.cpus_per_actor or 1.0
    else:
        # the deadlock trap: actors holding every logical CPU starve the read and write tasks
        share = max(total - 1, total / 2) / ex.actors
        cpus = ex.cpus_per_actor or math.floor(100 * min(share, node_cpus or share)) / 100
        if cpus <= 0 or ex.actors * cpus > total - 0.25:
            raise JobConfigError(f"execution: {ex.actors} actors x {cpus} CPUs leave no CPU of the cluster's "
                                 f"{total:g} for read/write tasks (the job would hang): lower "
                                 "execution.cpus_per_actor (fractions allowed) or execution.actors")
    return Resources(cpus=cpus, gpus=ex.gpus_per_actor, threads=max(1, round(cpus)))


def actor_spec(plan: Plan, res: Resources) -> ActorSpec:
    """The actor's instructions."""
    cfg = plan.cfg
    return ActorSpec(model_dir=str(Path(cfg.model.dir).resolve()) if "://" not in cfg.model.dir else cfg.model.dir,
                     dtype=cfg.dtype, engine=cfg.model.engine, device="cuda" if res.gpus > 0 else "cpu",
                     decode=plan.decode, seed=cfg.execution.seed, settings_hash=plan.settings_hash,
                     prompt_column=cfg.input.prompt_column, messages_column=cfg.input.messages_column,
                     id_column=cfg.input.id_column, threads=res.threads, allow_pickle=cfg.model.allow_pickle,
                     trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                     drop_columns=(pio.ROW_KEY,))


def build_dataset(plan: Plan, spec: ActorSpec, res: Resources, done: Any, run_id: str):
    """read -> ids, drop done -> (limit) -> blocks -> actors -> (dataset, sink); nothing runs yet."""
    import ray.data

    from pipeline.actor import GenerateActor
    from pipeline.datasources import PartSink, read_dataset

    cfg = plan.cfg
    ds = read_dataset(cfg.input, plan.fmt)
    ds = ds.map_batches(pio.ids_not_done, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"id_column": cfg.input.id_column, "done": done, "schema": plan.input_schema,
                                   "num_samples": cfg.decoding.num_samples})
    if cfg.input.limit:
        ds = ds.limit(cfg.input.limit)
    ds = ds.repartition(target_num_rows_per_block=cfg.rows_per_block)
    ex = cfg.execution
    remote: dict[str, Any] = {"num_cpus": res.cpus, "max_restarts": ex.max_restarts,
                              "max_task_retries": ex.max_task_retries}
    if res.gpus:
        remote["num_gpus"] = res.gpus
    with warnings.catch_warnings():
        # max_restarts/max_task_retries have no named parameter in Ray 2.60 (only ray_remote_args)
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ds.map_batches(GenerateActor, fn_constructor_kwargs={"spec": spec}, batch_size=ex.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=ex.actors), **remote)
    return ds, PartSink(cfg.output.dir, run_id, ex.rows_per_file)


def configure_data_context(cfg: JobConfig) -> None:
    """Ray Data settings of this job; a dataset copies the context when it is built, so call this first."""
    from ray.data import DataContext

    # bounded wait for the actor pool, behind reserve_pool's (resources taken in between end here too)
    DataContext.get_current().wait_for_min_actors_s = cfg.execution.actor_start_timeout_s


def reserve_pool(cfg: JobConfig, cluster: dict, res: Resources) -> None:
    """Wait until the cluster can hold the whole actor pool; past actor_start_timeout_s fail, leaving nothing behind.

    The pool's resources are asked for as one placement group, which an autoscaler sees and serves, and
    which is removed whatever happens. Ray Data's own wait, on a timeout, leaves its actors pending and
    their demand in the cluster for as long as the driver lives (Ray 2.60, measured here).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    ex = cfg.execution
    bundle = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    pg = placement_group([bundle] * ex.actors, strategy="PACK")
    try:
        ready = pg.wait(timeout_seconds=ex.actor_start_timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        raise _pool_did_not_start(cfg, cluster, res)


def _pool_did_not_start(cfg: JobConfig, cluster: dict, res: Resources) -> PipelineError:
    ex = cfg.execution
    return PipelineError(
        f"no actor started within execution.actor_start_timeout_s={ex.actor_start_timeout_s}s: each of "
        f"{ex.actors} actors asks for {res.gpus:g} GPU(s) and {res.cpus:g} CPU(s); the cluster has "
        f"{cluster.get('GPU', 0):g} GPU(s) and {cluster.get('CPU', 0):g} CPU(s). Use a cluster with the GPUs "
        "(or let its autoscaler add them), lower execution.gpus_per_actor, cpus_per_actor or actors, or set "
        "gpus_per_actor: 0 to run on CPU")


def execute(ds: Any, sink: Any, cfg: JobConfig, cluster: dict, res: Resources) -> None:
    """Run the pipeline; a pool that cannot start (no GPU, say) fails within the configured wait."""
    try:
        ds.write_datasink(sink)
    except Exception as e:
        failed_write = _write_failure(e)
        if failed_write is not None:
            first_line = str(failed_write).splitlines()[0]  # Ray appends its retry advice below
            raise PipelineError(f"{first_line}. Rows written before the failure are kept in complete parts; "
                                "make output.dir writable (or free space) and rerun the same command: it "
                                "resumes with the missing rows") from None
        if "Timed out while starting actors" not in f"{e!r} {e.__cause__!r}":
            raise
        raise _pool_did_not_start(cfg, cluster, res) from None


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
    plan = plan_job(cfg)
    if cfg.decoding.num_samples > 1 and samples_identical(plan.decode):
        log(f"warning: decoding.num_samples={cfg.decoding.num_samples} with temperature 0, alg_temp 0 and "
            "low-confidence remasking: every sample of a row will be identical; set --temperature > 0 "
            "(or --remasking random) to draw different ones")
    old, complete = prepare_output(plan)
    out = cfg.output.dir
    run_id = output.new_run_id()
    if complete:
        counts = output.count_rows(out)
        log(f"{out}: already complete for this input and settings; nothing to do")
        return Summary(out, 0, 0, 0, counts["rows"], counts["rows"], counts["unique_ids"], time.time() - t0,
                       "nothing to do", plan.settings_hash, run_id)
    output.check_writable(out)  # before Ray starts: an unwritable directory fails in seconds, not after a load
    removed = output.remove_temp_files(out)
    done = output.done_ids(out)
    if removed or len(done):
        log(f"{out}: resuming: {len(done)} ids already written are skipped"
            + (f", {removed} partial parts of a killed run removed" if removed else ""))
    log(f"job checked in {time.time() - t0:.1f}s: {plan.fmt} input {cfg.input.path}, model {cfg.model.dir}, "
        f"settings {plan.settings_hash}")
    import ray

    started = connect_ray(cfg)
    try:
        cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
        res = resolve_resources(cfg, cluster, _largest_node_cpus())
        log(f"Ray {'started' if started else 'joined'} at {time.time() - t0:.1f}s: {cluster.get('CPU', 0):g} CPUs, "
            f"{cluster.get('GPU', 0):g} GPUs; {cfg.execution.actors} actors x {res.cpus:g} CPU, {res.gpus:g} GPU")
        manifest = _manifest(plan, old, run_id, t0, cluster, res)
        output.write_manifest(out, manifest)
        configure_data_context(cfg)
        try:
            reserve_pool(cfg, cluster, res)
            ds, sink = build_dataset(plan, actor_spec(plan, res), res, done, run_id)
            execute(ds, sink, cfg, cluster, res)
        except BaseException as e:
            _mark_failed(out, manifest, e)
            raise
    finally:
        if started:
            ray.shutdown()
    try:
        if rewritten := output.harmonize_parts(out):
            log(f"{out}: {rewritten} parts given the columns other parts have (inputs differ in their keys)")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # the rows are complete; only one-schema readers mind
        log(f"{out}: parts differ in column types and were left as they are ({e})")
    counts = output.count_rows(out, run_id=run_id)
    status = "partial" if cfg.input.limit else "complete"
    summary = Summary(out, counts["run_rows"], counts["run_ok"], counts["run_rows"] - counts["run_ok"], len(done),
                      counts["rows"], counts["unique_ids"], time.time() - t0, status, plan.settings_hash, run_id)
    _finish_manifest(manifest, summary, counts)
    output.write_manifest(out, manifest)
    return summary


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
                  "engine": cfg.model.engine},
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
                                 "errors": s.errors, "skipped": s.skipped, "status": s.status})
    manifest.update({"status": s.status, "ended_at": end, "ended_at_iso": _iso(end), "wall_s": round(s.wall_s, 3),
                     "rows": {k: counts[k] for k in ("rows", "ok", "errors", "unique_ids", "files")}})


def _mark_failed(out: str, manifest: dict, e: BaseException) -> None:
    """Record a failed run in the manifest where the directory still takes it (a resume ignores the status)."""
    reason = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
    manifest["runs"][-1].update({"ended_at": time.time(), "status": "failed", "error": reason})
    manifest["status"] = "failed"
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
