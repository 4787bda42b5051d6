"""The Ray Data actor: loads the model once, decodes batches of rows, never fails a job for a row.

`GenerateActor` is the callable class given to `map_batches(..., compute=ActorPoolStrategy(...))`.
Heavy imports (torch, the models, DeepSpeed) happen inside it, in the actor process. Each row gets
its own seed derived from the job seed and the row id, so its output does not depend on which
actor took it or what else was in its batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.replica import ReplicaLost
from pipeline.schema import ERROR, INPUT_ERROR, OK, OUTPUT_COLUMNS, OUTPUT_SCHEMA, passthrough_name

if TYPE_CHECKING:
    from pipeline.replica import ReplicaSpec

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs, built once by the driver (plain data, cheap to ship)."""

    model_dir: str
    dtype: str                        # "bf16" | "fp16" | "fp32"
    engine: str                       # "deepspeed" | "torch"
    device: str                       # "cpu" | "cuda"
    decode: dict                      # prophet.DecodeConfig.to_dict() of the job
    seed: int
    settings_hash: str
    prompt_column: str
    messages_column: str | None = None
    chat_template: bool = False       # plain prompts rendered as one user message (input.chat_template)
    id_column: str | None = None
    threads: int = 1                  # torch intra-op threads
    allow_pickle: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    drop_columns: tuple[str, ...] = field(default=())  # internal input columns never written
    fallback_counter: str | None = None  # name of the run's FallbackCounter Ray actor, where there is one
    replica: ReplicaSpec | None = None  # the replica's ranks where execution.tensor_parallel > 1 (pipeline.replica)


class FallbackCounter:
    """Counts batches that failed whole and were retried row by row, with the first error seen.

    A model that fails every batch would otherwise run quietly at batch size one; the driver
    creates one of these per run (a named Ray actor, no CPU) and reports it in the summary and
    the manifest. Plain class: the driver wraps it with `ray.remote`, tests use it directly.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.first_error: str | None = None

    def record(self, rows: int, error: str) -> None:
        self.batches += 1
        self.rows += rows
        if self.first_error is None:
            self.first_error = error

    def report(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "first_error": self.first_error}


def row_seed(seed: int, row_id: str) -> int:
    """The seed of one row: a stable 63-bit hash of (job seed, row id)."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def wrap_with_deepspeed(model: Any, dtype: Any, tp_size: int = 1) -> None:
    """The one place DeepSpeed wraps the model: `model.module` becomes an inference engine around it (no
    kernel injection), sharded over the replica's process group where tp_size > 1 (pipeline.parallel).
    DeepSpeed moves the engine to its device (a replica's ranks load on the host: see load_engine), so
    the model's device is read back from it."""
    from pipeline.parallel import shard_with_deepspeed

    model.module = shard_with_deepspeed(model.module, dtype, tp_size)
    model.device = next(model.module.parameters()).device


@dataclass
class Prepared:
    """One input row on its way to the decoder: prompt ids, or the reason it cannot be decoded."""

    text: str | None
    ids: list[int] | None = None
    error: str | None = None


def prompt_text(prompt: Any, messages: Any, use_messages: bool, render_chat: Any,
                chat_template: bool = False) -> tuple[str | None, str | None]:
    """(text, error) of one row: the plain prompt (as one user message through the template where
    chat_template), or chat messages through the template."""
    if use_messages:
        if messages is None:
            return None, "messages is null"
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                return None, f"messages is not valid JSON ({e.msg})"
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            return None, "messages is not a non-empty list of {role, content}"
        try:
            prompt = render_chat(messages)
        except Exception as e:  # a template error is the row's, not the job's
            return None, f"chat template failed: {type(e).__name__}: {e}"
    if prompt is None:
        return None, "prompt is null"
    if isinstance(prompt, bytes):  # a binary column (Parquet): text only where it is UTF-8
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(prompt, str):
        return None, f"prompt is a {type(prompt).__name__}, not a string"
    if not prompt.strip():
        return prompt, "prompt is empty or whitespace only"
    if chat_template and not use_messages:
        try:
            return render_chat([{"role": "user", "content": prompt}]), None
        except Exception as e:  # a template error is the row's, not the job's
            return prompt, f"chat template failed: {type(e).__name__}: {e}"
    return prompt, None


def prepare(text: str | None, error: str | None, encode: Any, max_prompt: int) -> Prepared:
    """Tokenize one row's text; too long or untokenizable rows carry an error."""
    if error is not None:
        return Prepared(text, None, error)
    try:
        ids = list(encode(text))
    except Exception as e:
        return Prepared(text, None, f"tokenizer failed: {type(e).__name__}: {e}")
    if not ids:
        return Prepared(text, ids, "prompt has no tokens")
    if len(ids) > max_prompt:
        return Prepared(text, ids, f"prompt has {len(ids)} tokens; the model takes at most {max_prompt} "
                                   "with this gen_length (max_length - gen_length)")
    return Prepared(text, ids)


def load_engine(spec: ActorSpec) -> tuple[Any, Any, Any]:
    """(model, DecodeConfig, torch dtype) of an actor or a rank, the model loaded whole (not yet wrapped)."""
    if spec.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from pipeline.config import decode_config_from_dict
    from prophet.models import load_model

    torch.set_num_threads(spec.threads)
    dtype = getattr(torch, DTYPES[spec.dtype])
    # A rank of a replica reads the checkpoint into host memory and DeepSpeed moves only its shard to its
    # GPU: a model larger than one GPU (what tensor parallelism is for) never sits whole on one.
    device = "cpu" if spec.replica is not None else spec.device
    model = load_model(spec.model_dir, device=device, dtype=dtype, allow_pickle=spec.allow_pickle,
                       trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    return model, decode_config_from_dict(spec.decode), dtype


class GenerateActor:
    """Callable class for `map_batches`: pyarrow batch in, output rows (schema.OUTPUT_SCHEMA) out.

    With execution.tensor_parallel N > 1 this actor is rank 0 of a replica (pipeline.replica): it starts
    the other ranks, and every batch decodes on all of them in lockstep."""

    def __init__(self, spec: ActorSpec) -> None:
        self.spec = spec
        self.model, self.config, dtype = load_engine(spec)
        self.replica = None
        if spec.replica is not None:
            from pipeline.replica import Replica

            self.replica = Replica(spec, self.model, self.config, dtype)
        elif spec.engine == "deepspeed":
            wrap_with_deepspeed(self.model, dtype)
        self.max_prompt = self.model.max_length - self.config.gen_length
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.fallbacks = FallbackCounter()  # this actor's own count; the run's is spec.fallback_counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        n = batch.num_rows
        prompts = _column(batch, spec.prompt_column, n)
        messages = _column(batch, spec.messages_column, n) if spec.messages_column else [None] * n
        input_errors = _column(batch, INPUT_ERROR, n)
        rows = []
        for prompt, msgs, input_error in zip(prompts, messages, input_errors):
            text, error = (None, input_error) if input_error else prompt_text(
                prompt, msgs, spec.messages_column is not None, self.model.render_chat, spec.chat_template)
            rows.append(prepare(text, error, self.model.encode, self.max_prompt))
        ids = batch.column("id").to_pylist()
        metrics = self._decode(rows, ids)
        return self._output(batch, rows, metrics)

    def _decode(self, rows: list[Prepared], ids: list[str]) -> dict[int, dict]:
        """Decode the rows without an error; row index -> metrics (or {'error': ...})."""
        todo = [i for i, r in enumerate(rows) if r.error is None]
        if not todo:
            return {}
        try:
            return self._decode_some(rows, ids, todo)
        except ReplicaLost:
            raise  # a lost rank is the replica's, never the rows' (its actor restarts; pipeline.replica)
        except Exception as e:
            # one bad row must not take the others down: retry them one by one to isolate it
            self._count_fallback(len(todo), f"{type(e).__name__}: {e}")
            out: dict[int, dict] = {}
            for i in todo:
                try:
                    out.update(self._decode_some(rows, ids, [i]))
                except ReplicaLost:
                    raise
                except Exception as e:
                    out[i] = {"error": f"decode failed: {type(e).__name__}: {e}"}
            return out

    def _count_fallback(self, rows: int, error: str) -> None:
        """Count a batch that fell back to row by row, here and in the run's counter (never fails the batch)."""
        error = error.splitlines()[0][:300] if error else "unknown error"
        self.fallbacks.record(rows, error)
        if self.spec.fallback_counter:
            try:
                import ray

                ray.get_actor(self.spec.fallback_counter).record.remote(rows, error)
            except Exception:
                pass  # the count is a report; losing it must not lose rows

    def _decode_some(self, rows: list[Prepared], ids: list[str], todo: list[int]) -> dict[int, dict]:
        from prophet.decode import decode

        seeds = [row_seed(self.spec.seed, ids[i]) for i in todo]
        prompts = [rows[i].ids for i in todo]
        # a replica of N ranks decodes in lockstep; a lost rank never comes back here (the actor restarts)
        res = (self.replica.decode(prompts, seeds) if self.replica is not None
               else decode(self.model, prompts, self.config, seeds=seeds))
        finished = time.time()
        tokens, n_gen = res.tokens.tolist(), res.num_generated.tolist()
        steps, early = res.steps_used.tolist(), res.committed_early.tolist()
        cstep, cgap = res.commit_step.tolist(), res.commit_gap.tolist()
        secs, bad = res.decode_seconds.tolist(), res.nonfinite.tolist()
        ftok = res.forward_tokens.tolist()
        out = {}
        for j, i in enumerate(todo):
            if bad[j]:
                out[i] = {"error": "the model returned non-finite (NaN/inf) logits for this row",
                          "decode_s": secs[j], "finished_at": finished}
                continue
            kept = tokens[j][:n_gen[j]]
            out[i] = {"completion": self.model.decode(kept), "completion_ids": kept, "generated_tokens": n_gen[j],
                      "steps_used": steps[j], "forward_tokens": ftok[j], "committed_early": early[j],
                      "commit_step": cstep[j] if cstep[j] >= 0 else None,
                      "commit_gap": cgap[j] if cstep[j] >= 0 else None,
                      "decode_s": secs[j], "finished_at": finished}
        return out

    def _output(self, batch: pa.Table, rows: list[Prepared], metrics: dict[int, dict]) -> pa.Table:
        now = time.time()
        cols: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for i, row in enumerate(rows):
            m = metrics.get(i, {})
            error = row.error or m.get("error")
            values = {"prompt": row.text, "prompt_tokens": None if row.ids is None else len(row.ids),
                      "gen_length": self.config.gen_length, "steps_budget": self.config.steps,
                      "finished_at": m.get("finished_at", now), "worker_id": self.worker_id,
                      "model": self.model.name, "settings_hash": self.spec.settings_hash,
                      "status": ERROR if error else OK, "error": error}
            if error is None:
                values.update(m)
            else:
                values["decode_s"] = m.get("decode_s")
            for name in OUTPUT_COLUMNS:
                if name != "id":
                    cols[name].append(values.get(name))
        cols["id"] = batch.column("id").to_pylist()
        table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)
        return _append_passthrough(table, batch, self._consumed(batch))

    def _consumed(self, batch: pa.Table) -> set[str]:
        """Input columns represented by output columns (never passed through)."""
        spec = self.spec
        used = {"id", INPUT_ERROR, *spec.drop_columns}
        if spec.messages_column is None:
            used.add(spec.prompt_column)
        if spec.id_column:
            used.add(spec.id_column)
        return used


def _column(batch: pa.Table, name: str | None, n: int) -> list:
    if name is None or name not in batch.column_names:
        return [None] * n
    return batch.column(name).to_pylist()


def _append_passthrough(table: pa.Table, batch: pa.Table, consumed: set[str]) -> pa.Table:
    """Append every input column not consumed, renamed where it clashes with an output column."""
    taken = set(OUTPUT_COLUMNS)
    for name in batch.column_names:
        if name in consumed:
            continue
        new = passthrough_name(name, taken)
        taken.add(new)
        column = batch.column(name)
        if pa.types.is_null(column.type):  # all-null here; a string column keeps part files alike
            column = column.cast(pa.string())
        table = table.append_column(new, column)
    return table
