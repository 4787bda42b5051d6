"""One validated job configuration for jobs/generate.py (YAML and/or flags, flags win).

Mirrors `ray.data.llm`: one pydantic model, every field described, unknown keys and wrong types
rejected with the field's dotted name before Ray starts. The `decoding` section is generated from
`prophet.DecodeConfig` (its types and defaults), so the two cannot drift; this module only adds
descriptions and the pipeline's own keys (preset, calibration, anchor).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from prophet.config import PRESETS, ConfigError, DecodeConfig, Host

Dtype = Literal["bf16", "fp16", "fp32"]
InputFormat = Literal["auto", "parquet", "jsonl", "csv", "hf"]


class JobConfigError(ValueError):
    """The job configuration is invalid; the message names the field (dotted path) and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    """Where the prompts come from."""

    path: str = Field(description="Input file or directory (Parquet, JSONL, CSV, or a Hugging Face "
                                  "`datasets` directory written by save_to_disk).")
    format: InputFormat = Field("auto", description="Input format; 'auto' decides from the file "
                                "extensions, or 'hf' for a directory holding dataset_info.json.")
    prompt_column: str = Field("prompt", description="Column of plain-text prompts.")
    messages_column: Optional[str] = Field(None, description="Column of chat messages (a list of "
                                           "{role, content}, or its JSON text); rendered with the "
                                           "tokenizer's chat template. Used instead of prompt_column.")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="Plain-text prompts through the model's chat template, each as one user "
        "message with the generation prompt added (what Instruct models expect): 'auto' where the "
        "model has a template (tokenizer_config.json or chat_template.jinja) and as is where it has "
        "none; 'always' refuses a model without one; 'never' sends the text as is (Base models). "
        "messages_column rows always use the template.")
    id_column: Optional[str] = Field(None, description="Column of unique row ids. When unset, ids are "
                                     "'<file>:<row>' (path relative to `path`, 0-based row), stable "
                                     "across reruns and distinct for duplicate prompts.")
    limit: Optional[int] = Field(None, ge=1, description="Process at most this many not-yet-written input "
                                 "rows, each with all its decoding.num_samples samples (a trial run; a later "
                                 "run without it resumes the rest).")


class OutputConfig(_Section):
    """Where results go."""

    dir: str = Field(description="Output directory: Parquet files plus .manifest.json. Rerunning into "
                                 "it resumes (only ids not yet written are processed).")
    overwrite: bool = Field(False, description="Delete this job's earlier output in `dir` and start over.")
    break_lock: bool = Field(False, description="Take over the output's lock even where its run looks alive "
                             "(one run at a time per output; a dead run's lock on this host, or one whose "
                             "heartbeat is over 5 minutes old, is taken over without it). Only for a run "
                             "known to be dead: two live runs write rows twice.")


class ModelConfig(_Section):
    """Which model, in what precision, behind which engine."""

    dir: str = Field(description="Model directory (config.json, *.safetensors, tokenizer.json).")
    dtype: Optional[Dtype] = Field(None, description="Weight dtype; default fp32 on CPU, bf16 when "
                                   "gpus_per_actor > 0.")
    engine: Literal["deepspeed", "torch"] = Field("deepspeed", description="'deepspeed' wraps the "
                                                  "module with deepspeed.init_inference (tp_size 1, no "
                                                  "kernel injection); 'torch' runs it as is.")
    allow_pickle: bool = Field(False, description="Allow pickled (*.bin/*.pt) weights; safetensors "
                               "otherwise. Pickle can run code: only for files you trust.")
    trust_remote_code: bool = Field(False, description="transformers masked LMs only: run the model "
                                    "directory's own Python code; needs `revision`.")
    revision: Optional[str] = Field(None, description="Full 40-hex commit the remote code is pinned to.")


# Descriptions of every DecodeConfig field; a test checks that none is missing.
DECODE_DESCRIPTIONS: dict[str, str] = {
    "host": "Step schedule: 'llada' (semi-autoregressive blocks), 'dream' (eps schedule) or 'block' "
            "(block-diffusion models such as LLaDA2: one block per step on an exact KV cache); "
            "unset = the model family's own.",
    "gen_length": "Generated positions after the prompt.",
    "steps": "Step budget (forward passes) for the whole window; 'Full' decoding spends all of them.",
    "block_length": "Semi-autoregressive block length (divides gen_length) for hosts llada/dream; unset = "
                    "one block. Host block: the model's attention block (unset = the model's; another "
                    "value is refused).",
    "sub_block": "Host block only: commit only inside the block's first sub-block of this many positions "
                 "that still holds a mask (Fast-dLLM v2's decoder: 8 within its blocks of 32); unset = the "
                 "whole block.",
    "cache": "Block KV cache: 'none', 'prefix' (reuse keys/values before the block) or 'dual' (also "
             "the positions after it, as of the block's first step); needs a native model.",
    "cache_refresh_every": "With a cache, also recompute every position every k steps inside a block; "
                           "unset = only at each block's first step.",
    "temperature": "0 = argmax; > 0 samples (Gumbel-max for LLaDA, from counter-based uniforms of (row seed, step, position, token)).",
    "remasking": "LLaDA: which masked positions to commit each step.",
    "cfg_scale": "Classifier-free guidance scale; 0 = off.",
    "logits_eos_inf": "LLaDA: forbid EOS by setting its logit to -inf.",
    "confidence_eos_eot_inf": "LLaDA: EOS/EoT get zero confidence (committed last).",
    "alg": "Dream: position scoring ('origin' reveals at random).",
    "alg_temp": "Dream: > 0 samples the k positions instead of taking the top k.",
    "top_p": "Dream: nucleus sampling mass (with temperature > 0).",
    "top_k": "Dream: top-k sampling (with temperature > 0).",
    "eps": "Dream: schedule floor, ts = linspace(1, eps, S + 1) per block of S steps.",
    "rule": "Commit rule: 'full' (no early commit), 'prophet', 'gap_parallel' or 'confidence_threshold'.",
    "progress": "How Prophet's progress picks the threshold: 'exact' (steps consumed / steps, exact "
                "thirds) or 'reference' (generate_earlyexit's (step + 1) / steps, cut at 0.33 and 0.67); "
                "a paper_* preset sets 'reference' unless progress is given.",
    "thresholds": "Prophet thresholds (high, mid, low) for the three thirds of the step budget, "
                  "non-increasing; or use `preset` or `calibration`.",
    "region": "Positions whose gaps Prophet watches: 'anchor' (after the anchor text), 'window' or "
              "'block' (still-masked positions).",
    "statistic": "How per-position gaps pool into one number.",
    "quantile": "The quantile used when statistic == 'quantile'.",
    "anchor_ids": "Anchor token ids written into the canvas; prefer `anchor` (text).",
    "anchor_offset": "Window position of the anchor; unset = as late as fits.",
    "answer_window": "Positions watched after the anchor.",
    "confidence": "confidence_threshold rule: commit positions whose probability exceeds this; unset = "
                  "the host's default (0.9; 0.95 for host block, as LLaDA2's reference).",
    "parallel": "Under rule 'prophet': the normal update of a step whose gap does not clear, the host's "
                "schedule ('none') or a parallel rule ('confidence_threshold', 'gap_parallel').",
    "lookahead": "Host block: mask blocks forwarded after the current one; Prophet watches them and its "
                 "fill commits them too.",
    "editing_threshold": "Host block (LLaDA2.1 editing): rewrite committed positions of the block whose "
                         "prediction changed with probability above this; unset = no editing.",
    "max_post_steps": "Host block with editing: passes after a block's last mask while an edit still fires.",
    "batch_size": "Decode slots per forward pass (continuous batching refills them).",
    "continuous": "Refill slots freed by finished rows (continuous batching).",
}
_EXTRA_DECODE_FIELDS: dict[str, Any] = {
    "preset": (Optional[Literal[tuple(PRESETS)]], Field(  # type: ignore[misc]
        None, description=f"Named Prophet thresholds, one of {sorted(PRESETS)}; conflicts with thresholds.")),
    "calibration": (Optional[str], Field(
        None, description="Calibration JSON ({'decode': {rule, thresholds, region, ...}}), e.g. "
                          "<model>/calibration.json; its keys override the ones here.")),
    "anchor": (Optional[str], Field(
        None, description="Answer-anchor text (e.g. ' The answer is'), tokenized with the model's "
                          "tokenizer into anchor_ids.")),
    # A pipeline concern, not a decode setting: the actors decode each expanded row once.
    "num_samples": (int, Field(
        1, ge=1, description="Output rows per input row, each with its own seed from (job seed, id, sample); "
                             "above 1 rows get columns sample and source_id and the id '<input id>#<sample>'.")),
}


def _decode_fields() -> dict[str, Any]:
    """Pydantic field definitions mirroring DecodeConfig's types and defaults."""
    hints = typing.get_type_hints(DecodeConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(DecodeConfig):
        kind, default = hints[f.name], f.default
        if f.name == "host":  # unset = the model family's default schedule
            kind, default = Optional[Host], None
        fields[f.name] = (kind, Field(default, description=DECODE_DESCRIPTIONS[f.name]))
    return fields


DecodingConfig = create_model(  # type: ignore[call-overload]
    "DecodingConfig", __base__=_Section, __doc__="How to decode (prophet.DecodeConfig plus names).",
    **_decode_fields(), **_EXTRA_DECODE_FIELDS)


class ExecutionConfig(_Section):
    """How the work spreads over Ray actors."""

    actors: int = Field(2, ge=1, description="Actors (model replicas) in the pool; one per GPU on a GPU cluster.")
    tensor_parallel: int = Field(1, ge=1, description="Ranks per replica: above 1, each actor is a replica of "
                                 "this many ranks on one node (a placement group of that many bundles of "
                                 "gpus_per_actor GPUs and cpus_per_actor CPUs), over which DeepSpeed shards "
                                 "the model (native families; divides the attention and KV heads).")
    rank_timeout_s: int = Field(300, ge=1, description="With tensor_parallel > 1: how long a rank waits for "
                                "the others inside one collective (the ranks decode in lockstep, so this bounds "
                                "their skew, not a decode's length); past it the replica counts as lost and "
                                "restarts, and its batch is retried.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0 = CPU); per rank "
                                  "where tensor_parallel > 1 (exactly 1 then). A request the cluster cannot "
                                  "meet fails after actor_start_timeout_s.")
    cpus_per_actor: Optional[float] = Field(None, gt=0, description="Logical CPUs per actor, per rank "
                                            "where tensor_parallel > 1 (fractions allowed). Unset: 1 with GPUs; on CPU, the cluster's CPUs "
                                            "minus one spread over the actors (read/write tasks need one).")
    batch_size: int = Field(64, ge=1, description="Rows per actor call (map_batches batch_size); the "
                                                  "decoder keeps decoding.batch_size of them in flight.")
    rows_per_block: Optional[int] = Field(None, ge=1, description="Rows per Ray Data block after the "
                                          "read (so every actor gets work); unset = batch_size.")
    rows_per_file: int = Field(1024, ge=1, description="At most this many rows per Parquet part: rows are "
                               "gathered up to it before a part is written, and a larger write is split "
                               "(smaller = less work redone after a killed run, more files).")
    seed: int = Field(0, description="Job seed; each row's seed derives from it and the row id, so a row's "
                                     "output does not depend on which actor took it.")
    max_restarts: int = Field(8, ge=0, description="Times a crashed actor is restarted.")
    max_task_retries: int = Field(3, ge=0, description="Times a batch of a crashed actor is retried.")
    actor_start_timeout_s: int = Field(600, ge=1, description="How long to wait for the first actor to "
                                       "start before failing (e.g. GPUs requested on a cluster without).")
    ray_address: Optional[str] = Field(None, description="Ray cluster to connect to; unset = RAY_ADDRESS "
                                       "(set inside `ray job submit`) or a local Ray started for the job.")
    local_cpus: Optional[int] = Field(None, ge=1, description="Logical CPUs of a local Ray started for "
                                      "the job; unset = cores + 1 (one spare for read/write tasks).")


class StorageConfig(_Section):
    """Object storage for s3:// paths (input.path, output.dir)."""

    s3_endpoint: Optional[str] = Field(None, description="S3 endpoint URL for s3:// paths (MinIO, Ceph, "
                                       "e.g. 'http://10.0.0.5:9000'); unset = AWS_ENDPOINT_URL_S3 / "
                                       "AWS_ENDPOINT_URL, else AWS. Credentials: the usual AWS_* variables.")


class JobConfig(_Section):
    """A generation job: input -> model + decoding -> Parquet output."""

    input: InputConfig = Field(description=InputConfig.__doc__)
    output: OutputConfig = Field(description=OutputConfig.__doc__)
    model: ModelConfig = Field(description=ModelConfig.__doc__)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description=DecodingConfig.__doc__)  # type: ignore[valid-type]
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description=ExecutionConfig.__doc__)
    storage: StorageConfig = Field(default_factory=StorageConfig, description=StorageConfig.__doc__)

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        if self.input.messages_column and self.input.chat_template == "never":
            raise ValueError("input.chat_template: 'never' with input.messages_column set: chat messages "
                             "need the template; use a plain prompt_column, or chat_template 'auto'")
        d = self.decoding
        if d.preset is not None and d.thresholds != DecodeConfig.thresholds:
            raise ValueError("decoding.preset and decoding.thresholds both set: give one")
        if d.anchor is not None and d.anchor_ids:
            raise ValueError("decoding.anchor and decoding.anchor_ids both set: give one")
        if d.calibration is not None and not Path(d.calibration).is_file():
            raise ValueError(f"decoding.calibration: no such file {d.calibration}")
        return self

    @property
    def dtype(self) -> Dtype:
        """The weight dtype: explicit, or fp32 on CPU and bf16 on GPU."""
        return self.model.dtype or ("bf16" if self.execution.gpus_per_actor > 0 else "fp32")

    @property
    def rows_per_block(self) -> int:
        """Rows per block after the read."""
        return self.execution.rows_per_block or self.execution.batch_size

    def decode_config(self, host: str, anchor_ids: tuple[int, ...] = ()) -> DecodeConfig:
        """The prophet.DecodeConfig of this job; ConfigError messages come back as JobConfigError."""
        d = self.decoding.model_dump()
        extra = {k: d.pop(k) for k in _EXTRA_DECODE_FIELDS}
        d["host"] = d["host"] or host
        if extra["preset"] is not None:
            d["thresholds"] = PRESETS[extra["preset"]]
            if extra["preset"].startswith("paper") and "progress" not in self.decoding.model_fields_set:
                d["progress"] = "reference"  # the paper's thresholds were tuned with its own progress
        if extra["anchor"] is not None:
            d["anchor_ids"] = anchor_ids
        try:
            cfg = DecodeConfig(**d)
            return cfg.with_calibration(extra["calibration"]) if extra["calibration"] else cfg
        except (ConfigError, TypeError, json.JSONDecodeError) as e:
            raise JobConfigError(f"decoding: {e}") from e


def decode_config_from_dict(d: dict) -> DecodeConfig:
    """A DecodeConfig from its to_dict() form (JSON lists back to tuples)."""
    return DecodeConfig(**{**d, "thresholds": tuple(d["thresholds"]), "anchor_ids": tuple(d["anchor_ids"])})


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-able settings dict (the key into .manifest.json 'settings')."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted 'a.b' (creating sections as needed)."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise JobConfigError(f"{p}: expected a section (mapping), got {type(node).__name__}")
        tree = node
    tree[leaf] = value


def load_job_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """JobConfig from an optional YAML file plus dotted overrides (which win); errors name the field."""
    tree: dict = {}
    if yaml_path is not None:
        tree = read_yaml(Path(yaml_path))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return validate_job_config(tree)


def validate_job_config(tree: dict) -> JobConfig:
    """JobConfig from a plain dict, pydantic's errors rewritten as one JobConfigError."""
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise JobConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    """One line per problem: 'decoding.steps: Input should be a valid integer (got 'x')'."""
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see jobs/generate.py --help)"
        elif err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(msg if not err["loc"] else f"{where}: {msg}")  # cross-checks name their fields
    return "invalid job configuration:\n  " + "\n  ".join(lines)


def read_yaml(path: Path) -> dict:
    """A YAML job file as a dict; errors name the file."""
    import yaml

    if not path.is_file():
        raise JobConfigError(f"--config: no such file {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise JobConfigError(f"{path}: not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise JobConfigError(f"{path}: the top level must be a mapping of sections "
                             "(input, output, model, decoding, execution, storage)")
    return tree
