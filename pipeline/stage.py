"""The decode stage for a Ray Data pipeline of one's own, shaped like `ray.data.llm.build_processor`.

    import ray.data
    from pipeline.stage import StageConfig, build_stage
    stage = build_stage(StageConfig(model={"dir": "checkpoints/tiny-llada"}, decoding={"steps": 32},
                                    execution={"actors": 2}))
    ds = stage(ray.data.read_json("prompts.jsonl"))       # lazy: nothing runs yet
    ds.filter(lambda r: r["status"] == "ok").write_parquet("s3://bucket/out")

One config object (the job's model, decoding and execution sections plus the column names), the
job's actor class, its per-row output columns (`pipeline.schema`) and error rows: a row that
cannot be decoded comes back with status "error" and a reason, never failing the Dataset. The
job script (`pipeline.run`) builds its Dataset through the same `DecodeStage`, between its own
resumable reader and atomic writer, so there is one code path.

Row ids: the `id_column` when given (null or empty ids fall back as below, with an error); else
the job reader's '<file>:<row>' key, and for a Dataset of one's own a hash of the prompt (so equal
prompts share an id and a seed: give `id_column` to tell them apart).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pyarrow as pa
from pydantic import Field

from pipeline import io as pio
from pipeline.actor import ActorSpec
from pipeline.config import (DecodingConfig, ExecutionConfig, JobConfig, JobConfigError, ModelConfig, _Section,
                             format_validation_error, settings_hash)
from pipeline.facts import model_facts, model_fingerprint
from pipeline.replica import ReplicaGroups, ReplicaSpec, check_tensor_parallel
from pipeline.resources import check_replica_fits, resolve_resources

# DecodeConfig fields that change how fast rows decode, never what they decode to (the core
# guarantees batch-independence), so a resumed job may change them.
NOT_IN_SETTINGS = ("batch_size", "continuous")


class StageConfig(_Section):
    """The decode stage: which model, how to decode, how the work spreads, which columns hold what."""

    model: ModelConfig = Field(description=ModelConfig.__doc__)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description=DecodingConfig.__doc__)  # type: ignore[valid-type]
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=ExecutionConfig.__doc__)
    prompt_column: str = Field("prompt", description="Column of plain-text prompts.")
    messages_column: Optional[str] = Field(None, description="Column of chat messages, used instead of "
                                           "prompt_column (see input.messages_column).")
    id_column: Optional[str] = Field(None, description="Column of unique row ids; unset = a hash of the prompt.")
    chat_template: Literal["auto", "always", "never"] = Field("auto", description="Plain prompts through the "
                                                              "model's chat template (see input.chat_template).")

    # the same derivations as the job's (one definition, see JobConfig)
    dtype = JobConfig.dtype
    rows_per_block = JobConfig.rows_per_block
    decode_config = JobConfig.decode_config

    @classmethod
    def from_job(cls, cfg: JobConfig) -> "StageConfig":
        """The stage part of a job configuration."""
        return cls(model=cfg.model, decoding=cfg.decoding, execution=cfg.execution,
                   prompt_column=cfg.input.prompt_column, messages_column=cfg.input.messages_column,
                   id_column=cfg.input.id_column, chat_template=cfg.input.chat_template)

    def prompt_setting(self, template: bool) -> str:
        """Which column the prompt comes from (and whether through the template), as the settings record it."""
        if self.messages_column:
            return f"messages:{self.messages_column}"
        return f"prompt:{self.prompt_column}" + (" chat_template" if template else "")


@dataclass(frozen=True)
class StagePlan:
    """What the driver decided about decoding before any row moves."""

    decode: dict          # DecodeConfig.to_dict() with the resolved host and anchor ids
    settings: dict        # what decides a row's output (hashed into settings_hash)
    settings_hash: str
    chat_template: bool = False   # plain prompts go through the model's chat template
    token_ids: dict = field(default_factory=dict)  # mask/pad/eos/eot ids decoding uses (config.json's)


def plan_stage(cfg: StageConfig | JobConfig) -> StagePlan:
    """Check the model directory and the decoding settings (no weights read); JobConfigError names the field."""
    stage = cfg if isinstance(cfg, StageConfig) else StageConfig.from_job(cfg)
    if "://" not in stage.model.dir and not Path(stage.model.dir).is_dir():
        raise JobConfigError(f"model.dir: no such directory {stage.model.dir}")
    host, anchor_ids = model_facts(stage)
    check_tensor_parallel(stage)
    template = uses_template(stage)
    decode = stage.decode_config(host, anchor_ids).to_dict()
    check_block_length(stage, decode)
    settings = {"decode": {k: v for k, v in decode.items() if k not in NOT_IN_SETTINGS},
                "model": Path(stage.model.dir).resolve().name, "model_files": model_fingerprint(stage.model.dir),
                "dtype": stage.dtype, "seed": stage.execution.seed, "prompt": stage.prompt_setting(template)}
    if stage.decoding.num_samples != 1:  # a rerun with another num_samples is a settings change (refused)
        settings["num_samples"] = stage.decoding.num_samples
    return StagePlan(decode, settings, settings_hash(settings), template, token_ids(stage.model.dir))


def check_block_length(cfg: StageConfig, decode: dict) -> None:
    """Host 'block' decodes in the model's attention blocks: decoding.block_length, when given, must be
    the model's (config.json's, else the family's); read from config.json, no weights."""
    if decode["host"] != "block" or "://" in cfg.model.dir:
        return
    from prophet.models.loading import native_family, read_config

    raw = read_config(Path(cfg.model.dir))
    family = native_family(raw)
    model_block = family[0].from_dict(raw).attention_block if family else None  # SDAR's block_size, ...
    if model_block is None:
        raise JobConfigError(f"decoding.host: 'block' needs a block-diffusion model (block-causal attention); "
                             f"{cfg.model.dir} is bidirectional: leave decoding.host unset")
    if decode["block_length"] not in (None, model_block):
        raise JobConfigError(f"decoding.block_length: {decode['block_length']} differs from the model's attention "
                             f"block ({model_block}); host 'block' decodes in the model's blocks: leave it unset")


def uses_template(cfg: StageConfig) -> bool:
    """Whether plain prompts are rendered through the chat template: input.chat_template resolved
    against the model directory ('auto': where it ships one)."""
    from prophet.models import ModelLoadError
    from prophet.models.tokenizer import has_chat_template

    mode = cfg.chat_template
    if cfg.messages_column or mode == "never":
        return False
    try:
        found = has_chat_template(cfg.model.dir)
    except ModelLoadError as e:
        raise JobConfigError(f"model.dir: {e}") from None
    if mode == "always" and not found:
        raise JobConfigError(f"input.chat_template: 'always', but {cfg.model.dir} has no chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja); use 'never'")
    return found


TEMPLATE_TRIES = 8  # rows tried before a template that fails on each of them is refused


def check_chat_template(cfg: StageConfig, template: bool, rows: pa.Table) -> None:
    """Render the first rows of the input through the model's chat template before any worker starts:
    a template that fails on every row tried (one that always raises) is refused with its own message,
    instead of a job that loads the model everywhere and ends with every row an error row."""
    from pipeline.actor import prompt_text
    from prophet.models import ModelLoadError, Tokenizer

    if not (template or cfg.messages_column):
        return
    try:
        render = Tokenizer.from_dir(cfg.model.dir).render_chat
    except ModelLoadError:
        return  # a tokenizer only transformers reads: its actors report template errors row by row
    failures = []
    for row in rows.slice(0, 64).to_pylist():
        _, error = prompt_text(row.get(cfg.prompt_column), row.get(cfg.messages_column or ""),
                               cfg.messages_column is not None, render, template)
        if error is None:
            return
        if error.startswith("chat template failed"):
            failures.append(error)
            if len(failures) == TEMPLATE_TRIES:
                break
    if failures:
        fix = ("fix the template" if cfg.messages_column else
               "fix the template, or set input.chat_template: never to send the prompts as they are")
        raise JobConfigError(f"model.dir: the chat template of {cfg.model.dir} (tokenizer_config.json "
                             f"'chat_template' or chat_template.jinja) failed on each of the first "
                             f"{len(failures)} rows of the input; the first: {failures[0].removeprefix('chat template failed: ')}. {fix}")


def token_ids(model_dir: str) -> dict:
    """The special ids decoding uses, from config.json (a native family's, never the tokenizer's pad,
    which may differ: DiffuCoder pads with 151667 in its tokenizer and 151643 in config.json).
    Empty for transformers masked LMs, whose ids come from their tokenizer inside the actor."""
    from prophet.models.loading import native_family, read_config

    raw = read_config(Path(model_dir))
    family = native_family(raw)
    if family is None:
        return {}
    c = family[0].from_dict(raw)
    return {"mask": c.mask_token_id, "pad": c.pad_token_id, "eos": c.eos_token_id, "eot": c.eot_token_id}


def prompt_ids(batch: pa.Table, prompt_column: str, messages_column: str | None) -> pa.Table:
    """Add the reader's row key where a Dataset has none: a hash of the prompt (or messages) text."""
    if pio.ROW_KEY in batch.column_names:
        return batch
    name = messages_column or prompt_column
    values = batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows
    keys = [hashlib.sha256(repr(v).encode()).hexdigest()[:16] for v in values]
    return batch.append_column(pio.ROW_KEY, pa.array(keys, pa.string()))


def with_ids(batch: pa.Table, prompt_column: str, messages_column: str | None, id_column: str | None) -> pa.Table:
    """A user's batch with the string `id` column the actor needs (see the module docstring)."""
    return pio.assign_ids(prompt_ids(batch, prompt_column, messages_column), id_column)


class DecodeStage:
    """Dataset -> Dataset of output rows (pipeline.schema), decoded on a pool of GenerateActor.

    With execution.tensor_parallel > 1 every actor is rank 0 of a replica with a placement group of its
    own (pipeline.replica); call `release()` once the Dataset has run to give the groups back (else they
    go when the driver ends)."""

    def __init__(self, cfg: StageConfig, plan: StagePlan | None = None, *, assign_ids: bool = True,
                 resources: Any = None, drop_columns: tuple[str, ...] = (pio.ROW_KEY,),
                 fallback_counter: str | None = None, replica_counter: str | None = None):
        self.cfg, self.plan = cfg, plan or plan_stage(cfg)
        self._assign_ids, self._resources, self._drop = assign_ids, resources, drop_columns
        self._fallback_counter = fallback_counter  # the job's named counter of row-by-row fallbacks
        self._replica_counter = replica_counter  # the job's named counter of replicas restarted (a rank lost)
        self._groups: ReplicaGroups | None = None

    def replica_groups(self) -> ReplicaGroups | None:
        """The placement groups of the pool's replicas (execution.tensor_parallel > 1), else None; created
        on demand, one per actor Ray Data starts. `release()` removes them (else the driver's end does)."""
        if self._groups is None and self.cfg.execution.tensor_parallel > 1:
            res = self.resources()
            self._groups = ReplicaGroups(self.cfg.execution.tensor_parallel, res.cpus, res.gpus)
        return self._groups

    def release(self) -> None:
        """Give back the replicas' placement groups (their rank actors end with them)."""
        if self._groups is not None:
            self._groups.release()

    def resources(self) -> Any:
        """Per-actor resources: given by the job, else decided from the cluster Ray Data runs on."""
        if self._resources is None:
            import ray

            from pipeline import nodes

            # a Ray started here is local and cannot grow; one joined (RAY_ADDRESS, or the caller's) may
            local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
            if not ray.is_initialized():
                ray.init()  # what Ray Data does on first use: a local Ray, or RAY_ADDRESS's cluster
            cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
            alive = nodes.alive_nodes(nodes.nodes_now())
            self._resources = resolve_resources(self.cfg, cluster, nodes.largest_cpus(alive))
            waiting = check_replica_fits(self.cfg, self._resources, alive, can_grow=not local)
            if waiting:
                warnings.warn(waiting, stacklevel=2)
        return self._resources

    def actor_spec(self) -> ActorSpec:
        """The actor's instructions."""
        cfg, res = self.cfg, self.resources()
        return ActorSpec(model_dir=str(Path(cfg.model.dir).resolve()) if "://" not in cfg.model.dir
                         else cfg.model.dir, dtype=cfg.dtype, engine=cfg.model.engine,
                         device="cuda" if res.gpus > 0 else "cpu", decode=self.plan.decode,
                         seed=cfg.execution.seed, settings_hash=self.plan.settings_hash,
                         prompt_column=cfg.prompt_column, messages_column=cfg.messages_column,
                         chat_template=self.plan.chat_template, id_column=cfg.id_column, threads=res.threads, allow_pickle=cfg.model.allow_pickle,
                         trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                         drop_columns=self._drop, fallback_counter=self._fallback_counter,
                         replica=self.replica_spec())

    def replica_spec(self) -> ReplicaSpec | None:
        """Rank 0's instructions for its replica; None at tensor_parallel 1."""
        ex, res = self.cfg.execution, self.resources()
        if ex.tensor_parallel == 1:
            return None
        return ReplicaSpec(size=ex.tensor_parallel, cpus=res.cpus, gpus=res.gpus,
                           start_timeout_s=ex.actor_start_timeout_s, timeout_s=ex.rank_timeout_s,
                           counter=self._replica_counter)

    def __call__(self, ds: Any) -> Any:
        """(ids) -> blocks of rows_per_block -> the actor pool; lazy, like any Dataset transform."""
        import ray.data

        from pipeline.actor import GenerateActor

        cfg, res, ex = self.cfg, self.resources(), self.cfg.execution
        if self._assign_ids:
            ds = ds.map_batches(with_ids, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"prompt_column": cfg.prompt_column,
                                           "messages_column": cfg.messages_column, "id_column": cfg.id_column})
        ds = ds.repartition(target_num_rows_per_block=cfg.rows_per_block)
        remote: dict[str, Any] = {"num_cpus": res.cpus, "max_restarts": ex.max_restarts,
                                  "max_task_retries": ex.max_task_retries}
        if res.gpus:
            remote["num_gpus"] = res.gpus
        groups = self.replica_groups()
        if groups is not None:  # each actor is rank 0 of a replica, in bundle 0 of a group of its own
            remote["ray_remote_args_fn"] = groups.strategy
        with warnings.catch_warnings():
            # max_restarts/max_task_retries have no named parameter in Ray 2.60 (only ray_remote_args), and
            # ray_remote_args_fn, the one way to give each actor its own placement group, warns it is deprecated
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn. is deprecated")
            return ds.map_batches(GenerateActor, fn_constructor_kwargs={"spec": self.actor_spec()},
                                  batch_size=ex.batch_size, batch_format="pyarrow",
                                  compute=ray.data.ActorPoolStrategy(size=ex.actors), **remote)


def build_stage(config: StageConfig | dict) -> DecodeStage:
    """The decode stage of `config` (a StageConfig or its dict), checked now: a bad model directory or
    decoding setting raises JobConfigError here, before any Dataset runs."""
    if isinstance(config, dict):
        from pydantic import ValidationError

        try:
            config = StageConfig.model_validate(config)
        except ValidationError as e:
            raise JobConfigError(format_validation_error(e)) from None
    return DecodeStage(config)
