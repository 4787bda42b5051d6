"""The output schema of jobs/generate.py: the single source of column names and types.

Every output row carries these columns, in this order, followed by the input's passthrough
columns. Error rows keep `id`, `prompt` (when it was text), `gen_length`, `steps_budget`,
`decode_s`, `finished_at`, `worker_id`, `model`, `settings_hash`, `status` and `error`; the
per-generation metrics are null there (so means over a column are means over generated rows).
"""
from __future__ import annotations

import pyarrow as pa

OK, ERROR = "ok", "error"
# Names dataset readers skip, so the output directory reads as one Parquet dataset. pyarrow (and
# pandas over it) skip names starting with "." or "_" (Spark's _SUCCESS, Parquet's _metadata), but
# datasets.load_dataset(data_dir=...) skips only "."-files and "__"-directories: hence a hidden
# manifest file and a "__" report directory, which every one of them skips.
MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"  # what older versions wrote; still read for resume
REPORT_DIR = "__report"  # jobs/report.py's default output, inside the output directory

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),         # input id, or "<file>:<row>" when derived
    pa.field("prompt", pa.string()),                     # the text fed to the tokenizer (chat rendered)
    pa.field("completion", pa.string()),                 # decoded text before the first EOS/EoT
    pa.field("completion_ids", pa.list_(pa.int32())),    # token ids before the first EOS/EoT
    pa.field("prompt_tokens", pa.int32()),
    pa.field("generated_tokens", pa.int32()),            # tokens before EOS (= len(completion_ids))
    pa.field("gen_length", pa.int32()),                  # generation window
    pa.field("steps_budget", pa.int32()),                # forward passes "Full" decoding would spend
    pa.field("steps_used", pa.int32()),                  # forward passes spent (deciding step counted)
    pa.field("forward_tokens", pa.int64()),              # positions sent through the model over all passes
    pa.field("committed_early", pa.bool_()),
    pa.field("commit_step", pa.int32()),                 # 1-based step of the early commit; null if none
    pa.field("commit_gap", pa.float32()),                # pooled gap G at commit; null if none
    pa.field("decode_s", pa.float64()),                  # wall seconds from slot admission to finish
    pa.field("finished_at", pa.float64()),               # unix seconds when the row's batch finished
    pa.field("worker_id", pa.string()),                  # "<host>:<pid>" of the actor process
    pa.field("model", pa.string()),                      # model name (directory name)
    pa.field("settings_hash", pa.string()),              # key into .manifest.json "settings"
    pa.field("status", pa.string(), nullable=False),     # "ok" or "error"
    pa.field("error", pa.string()),                      # reason when status == "error", else null
])
OUTPUT_COLUMNS: tuple[str, ...] = tuple(OUTPUT_SCHEMA.names)

# Internal column the readers add to a row they could not parse (broken JSON line, bad UTF-8);
# the actor turns it into an error row and never writes it.
INPUT_ERROR = "__prophet_input_error"
# Prefix given to a passthrough column whose name clashes with an output column
# (an input "completion" column becomes "input_completion").
PASSTHROUGH_PREFIX = "input_"


def passthrough_name(name: str, taken: set[str]) -> str:
    """Output name of a passthrough input column: prefixed while it clashes with a taken name."""
    while name in taken:
        name = PASSTHROUGH_PREFIX + name
    return name
