"""Bad input matrix: every case ends as an error row with a reason, or as a clear error naming the field
before any work is scheduled (the output directory is never even created).

Per-row cases run through the job's own steps without Ray (plan with its up-front checks, the
format's reader, ids, GenerateActor); two end-to-end runs on the session Ray confirm the same rows
and reasons come out of the real pipeline, across files whose columns differ.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import io as pio
from pipeline import output
from pipeline.actor import GenerateActor
from pipeline.config import JobConfig, JobConfigError, load_job_config
from pipeline.run import Resources, actor_spec, plan_job, run
from prophet.models import load_model, save_model
from prophet.models.loading import SAFE_FILE

ROOT = Path(__file__).resolve().parents[1]
GOOD = "S:1.3.2.4.3.1.4.2="   # a prompt every tiny model takes
NOT_DONE = pa.array([], pa.string())


def no_log(_: str) -> None:
    """Swallow run()'s progress lines."""


def job(input_path: Path, out: Path, model_dir: Path, **over) -> JobConfig:
    """A small CPU job: one actor, torch engine, an 8-step budget."""
    base = {"input.path": str(input_path), "output.dir": str(out), "model.dir": str(model_dir),
            "model.engine": "torch", "decoding.gen_length": 8, "decoding.steps": 8, "decoding.batch_size": 8,
            "execution.actors": 1, "execution.cpus_per_actor": 0.5, "execution.batch_size": 8,
            "execution.rows_per_file": 4}
    return load_job_config(None, {**base, **over})


@lru_cache(maxsize=4)
def _actor(model_dir: str, spec_json: str) -> GenerateActor:
    from pipeline.actor import ActorSpec

    return GenerateActor(ActorSpec(**json.loads(spec_json)))


def through_pipeline(cfg: JobConfig) -> pa.Table:
    """The job's steps without Ray: plan (up-front checks) -> each file's reader -> ids -> actor -> rows."""
    plan = plan_job(cfg)
    spec = actor_spec(plan, Resources(cpus=1, gpus=0, threads=1))
    actor = _actor(spec.model_dir, json.dumps({**spec.__dict__, "drop_columns": list(spec.drop_columns)}))
    root = pio.normalize_root(cfg.input.path)
    tables = []
    for file in pio.input_files(Path(cfg.input.path), plan.fmt):
        with open(file, "rb") as fh:
            rel = pio.relative_name(str(file.resolve()), root)
            for chunk in pio.read_file(plan.fmt, fh, rel, cfg.input.prompt_column):
                tables.append(actor(pio.ids_not_done(chunk, cfg.input.id_column, NOT_DONE, plan.input_schema)))
    return pa.concat_tables(tables, promote_options="permissive")


def _jsonl(path: Path, rows: list, raw: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((json.dumps(r) + "\n").encode() for r in rows) + raw)
    return path


def _corrupt_row_group(path: Path, group: int) -> None:
    """Flip bytes inside one row group's column chunks; the footer stays readable."""
    meta = pq.read_metadata(path)
    data = bytearray(path.read_bytes())
    for c in range(meta.num_columns):
        col = meta.row_group(group).column(c)
        start = col.dictionary_page_offset or col.data_page_offset
        for k in range(start + 2, start + col.total_compressed_size - 2, 5):
            data[k] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- per-row errors

def _too_long(tmp: Path, max_prompt: int) -> Path:
    return _jsonl(tmp / "p.jsonl", [{"prompt": GOOD}, {"prompt": "S:" + "1" * (max_prompt + 8) + "="}])


def _corrupt_page(tmp: Path, _: int) -> Path:
    path = tmp / "p.parquet"
    pq.write_table(pa.table({"prompt": [GOOD] * 4 + [GOOD[::-1]] * 4, "n": list(range(8))}), path, row_group_size=4)
    _corrupt_row_group(path, 1)
    return path


def _parquet(values: pa.Array) -> Callable[[Path, int], Path]:
    def write(tmp: Path, _: int) -> Path:
        pq.write_table(pa.table({"prompt": values}), tmp / "p.parquet")
        return tmp / "p.parquet"
    return write


def _rows(*values) -> Callable[[Path, int], Path]:
    return lambda tmp, _: _jsonl(tmp / "p.jsonl", [{"prompt": GOOD}] + [{"prompt": v} for v in values])


def _raw(fmt: str, content: bytes) -> Callable[[Path, int], Path]:
    def write(tmp: Path, _: int) -> Path:
        (tmp / f"p.{fmt}").write_bytes(content)
        return tmp / f"p.{fmt}"
    return write


def _messages(*values) -> Callable[[Path, int], Path]:
    good = [{"role": "user", "content": GOOD}]
    return lambda tmp, _: _jsonl(tmp / "p.jsonl", [{"messages": good}] + [{"messages": v} for v in values])


# case -> (input writer, job overrides, expected per row: "ok" or a regex of the error)
ROW_CASES = {
    "null": (_rows(None), {}, ["ok", "prompt is null"]),
    "empty": (_rows(""), {}, ["ok", "empty or whitespace only"]),
    "whitespace only": (_rows(" \t\n  "), {}, ["ok", "empty or whitespace only"]),
    "non-string values": (_rows(42, 4.5, True, [1, 2], {"a": "b"}), {}, ["ok"] + ["not a string"] * 5),
    "invalid UTF-8 (JSONL)": (_raw("jsonl", b'{"prompt": "S:1="}\n{"prompt": "S:\xff\xfe="}\n'), {},
                              ["ok", "line 2: invalid UTF-8"]),
    "invalid UTF-8 (CSV)": (_raw("csv", b"prompt,k\nS:1=,a\nS:\xff=,b\n"), {}, ["ok", "row 1: invalid UTF-8"]),
    "invalid UTF-8 (Parquet binary)": (_parquet(pa.array([GOOD.encode(), b"S:\xff="], pa.binary())), {},
                                       ["ok", "not valid UTF-8"]),
    "null (Parquet)": (_parquet(pa.array([GOOD, None])), {}, ["ok", "prompt is null"]),
    "numbers (Parquet)": (_parquet(pa.array([1, 2])), {}, ["prompt is a int, not a string"] * 2),
    "longer than the model takes": (_too_long, {}, ["ok", r"prompt has \d+ tokens; the model takes at most \d+"]),
    "broken JSONL line": (_raw("jsonl", b'{"prompt": "S:1="}\n{"prompt": "S:2=",\n[1]\n'), {},
                          ["ok", "line 2: invalid JSON", "line 3: a JSON list, not an object"]),
    "CSV row with too few fields": (_raw("csv", b"prompt,k\nS:1=,a\nS:2=\n"), {}, ["ok", "row 1: 1 fields, header has 2"]),
    "corrupt Parquet data page": (_corrupt_page, {}, ["ok"] * 4 + ["row group 1 unreadable"] * 4),
    "bad chat messages": (_messages(None, "not json", [], [{"role": "user"}]), {"input.messages_column": "messages"},
                          ["ok", "messages is null", "not valid JSON", "not a non-empty list", "not a non-empty list"]),
    "null or empty given ids": (lambda tmp, _: _jsonl(tmp / "p.jsonl", [{"prompt": GOOD, "k": "a"},
                                                                       {"prompt": GOOD, "k": None},
                                                                       {"prompt": GOOD, "k": ""}]),
                                {"input.id_column": "k"}, ["ok", "k is null or empty", "k is null or empty"]),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_a_bad_row_becomes_an_error_row_with_its_reason_and_the_others_decode(case, tmp_path, tiny_model_dir):
    write, over, expected = ROW_CASES[case]
    max_prompt = load_model(tiny_model_dir).max_length - 8
    src = write(tmp_path, max_prompt)
    out = through_pipeline(job(src, tmp_path / "out", tiny_model_dir, **over))
    rows = sorted(out.to_pylist(), key=lambda r: int(r["id"].rsplit(":", 1)[1]) if ":" in r["id"] else -1)
    assert len(rows) == len(expected) and len({r["id"] for r in rows}) == len(rows)
    for row, want in zip(rows, expected):
        if want == "ok":
            assert (row["status"], row["error"]) == ("ok", None) and row["steps_used"] >= 1
            assert row["generated_tokens"] == len(row["completion_ids"])
        else:
            assert row["status"] == "error" and re.search(want, row["error"]), (want, row["error"])
            assert row["completion"] is None and row["steps_used"] is None


# ----------------------------------------------------------------------------- up-front errors

def _broken_model(tmp: Path, model_dir: Path, how: str) -> Path:
    d = tmp / f"model-{how.replace(' ', '-')}"
    shutil.copytree(model_dir, d)
    if how == "missing shard":
        (d / SAFE_FILE).unlink()
        total = (model_dir / SAFE_FILE).stat().st_size
        save_model(load_model(model_dir).module, model_dir, d, max_shard_bytes=total // 3)
        sorted(d.glob("model-0000*-of-*.safetensors"))[1].unlink()
    elif how == "wrong shape":
        config = json.loads((d / "config.json").read_text())
        config["mlp_hidden_size"] = config["mlp_hidden_size"] * 2
        (d / "config.json").write_text(json.dumps(config))
    elif how == "no tokenizer":
        (d / "tokenizer.json").unlink()
    elif how == "no weights":
        (d / SAFE_FILE).unlink()
    elif how == "truncated weights":
        (d / SAFE_FILE).write_bytes((d / SAFE_FILE).read_bytes()[:40])
    elif how == "config not JSON":
        (d / "config.json").write_text("{model_type: llada")
    elif how == "unknown family":
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2-but-not-really"}))
    return d


MODEL_CASES = {
    "missing shard": r"model\.dir: missing shard file .*model-00002-of-0000\d\.safetensors",
    "wrong shape": r"model\.dir: wrong shape for tensor .*config\.json implies",
    "no tokenizer": r"model\.dir: missing tokenizer file .*tokenizer\.json",
    "no weights": r"model\.dir: no weights in",
    "truncated weights": r"model\.dir: .*model\.safetensors is not a readable safetensors file",
    "config not JSON": r"model\.dir: .*config\.json is not valid JSON",
    "unknown family": r"model\.dir: .*unknown model_type 'gpt2-but-not-really'",
}


@pytest.mark.parametrize("how", list(MODEL_CASES))
def test_a_broken_model_directory_is_refused_up_front_naming_model_dir(how, tmp_path, tiny_model_dir):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": GOOD}])
    cfg = job(src, tmp_path / "out", _broken_model(tmp_path, tiny_model_dir, how))
    with pytest.raises(JobConfigError, match=MODEL_CASES[how]):
        run(cfg, log=no_log)
    assert not (tmp_path / "out").exists()


def _input_case(tmp: Path, case: str) -> tuple[Path, dict]:
    if case == "missing prompt column":
        return _jsonl(tmp / "p.jsonl", [{"question": GOOD}]), {}
    if case == "missing messages column":
        return _jsonl(tmp / "p.jsonl", [{"prompt": GOOD}]), {"input.messages_column": "chat"}
    if case == "missing id column":
        return _jsonl(tmp / "p.jsonl", [{"prompt": GOOD}]), {"input.id_column": "uid"}
    if case.startswith("duplicate ids"):
        keys = ["k0", "k1", "k2", "k1"]
        if "Parquet" in case:
            pq.write_table(pa.table({"prompt": [GOOD] * 4, "k": keys}), tmp / "p.parquet")
            return tmp / "p.parquet", {"input.id_column": "k"}
        if "CSV" in case:
            (tmp / "p.csv").write_text("prompt,k\n" + "".join(f"{GOOD},{k}\n" for k in keys))
            return tmp / "p.csv", {"input.id_column": "k"}
        if "saved dataset" in case:
            import datasets

            datasets.Dataset.from_dict({"prompt": [GOOD] * 4, "k": keys}).save_to_disk(str(tmp / "hf"))
            return tmp / "hf", {"input.id_column": "k"}
        return _jsonl(tmp / "p.jsonl", [{"prompt": GOOD, "k": k} for k in keys]), {"input.id_column": "k"}
    if case == "empty JSONL file":
        return _raw("jsonl", b"\n\n")(tmp, 0), {}
    if case == "zero-row Parquet":
        return _parquet(pa.array([], pa.string()))(tmp, 0), {}
    if case == "empty directory":
        (tmp / "in").mkdir()
        return tmp / "in", {}
    if case == "directory without files of the format":
        (tmp / "in").mkdir()
        (tmp / "in" / "notes.txt").write_text("x")
        return tmp / "in", {"input.format": "jsonl"}
    d = tmp / "in"
    d.mkdir()
    pq.write_table(pa.table({"prompt": [GOOD], "meta": [1]}), d / "a.parquet")
    if case == "corrupt Parquet among good ones":
        (d / "b.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    else:  # "a column typed differently in two Parquet files"
        pq.write_table(pa.table({"prompt": [GOOD], "meta": ["one"]}), d / "b.parquet")
    pq.write_table(pa.table({"prompt": [GOOD], "meta": [3]}), d / "c.parquet")
    return d, {}


INPUT_CASES = {
    "missing prompt column": r"input\.prompt_column: the input has no column 'prompt' \(columns: \['question'\]\)",
    "missing messages column": r"input\.messages_column: the input has no column 'chat'",
    "missing id column": r"input\.id_column: the input has no column 'uid'",
    "duplicate ids": r"input\.id_column: 1 ids of column 'k' appear more than once \('k1' x2\)",
    "duplicate ids (Parquet)": r"input\.id_column: 1 ids of column 'k' appear more than once \('k1' x2\)",
    "duplicate ids (CSV)": r"input\.id_column: 1 ids of column 'k' appear more than once \('k1' x2\)",
    "duplicate ids (saved dataset)": r"input\.id_column: 1 ids of column 'k' appear more than once \('k1' x2\)",
    "empty JSONL file": r"input\.path: .*p\.jsonl has no rows",
    "zero-row Parquet": r"input\.path: .*p\.parquet has no rows",
    "empty directory": r"input\.format: cannot tell the format .*no files",
    "directory without files of the format": r"input\.path: no jsonl files",
    "corrupt Parquet among good ones": r"input\.path: .*b\.parquet is not a readable Parquet file",
    "a column typed differently in two Parquet files": r"input\.path: column 'meta' is int64 in a\.parquet but "
                                                       r"string in b\.parquet",
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_bad_input_data_is_refused_up_front_naming_the_field(case, tmp_path, tiny_model_dir):
    src, over = _input_case(tmp_path, case)
    with pytest.raises(JobConfigError, match=INPUT_CASES[case]):
        run(job(src, tmp_path / "out", tiny_model_dir, **over), log=no_log)
    assert not (tmp_path / "out").exists()


CONFIG_CASES = {
    "unknown key": ("decoding:\n  stepz: 8\n", r"decoding\.stepz: unknown key"),
    "unknown section": ("decodng:\n  steps: 8\n", r"decodng: unknown key"),
    "wrong type (text for a number)": ("decoding:\n  steps: many\n", r"decoding\.steps: .*integer.*'many'"),
    "wrong type (fraction of an actor)": ("execution:\n  actors: 1.5\n", r"execution\.actors: .*integer.*1\.5"),
    "wrong type (a list for a path)": ("model:\n  dir: [a, b]\n", r"model\.dir: .*string"),
    "a section that is not a mapping": ("decoding: 8\n", r"decoding: .*(dictionary|mapping|DecodingConfig)"),
    "out of range": ("execution:\n  batch_size: 0\n", r"execution\.batch_size: .*greater than or equal to 1"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_job_file_is_refused_naming_the_field(case, tmp_path):
    text, pattern = CONFIG_CASES[case]
    tree = {"input": {"path": f"{tmp_path}/p.jsonl"}, "output": {"dir": f"{tmp_path}/out"},
            "model": {"dir": f"{tmp_path}/m"}, **yaml.safe_load(text)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(JobConfigError, match=pattern):
        load_job_config(path)


DECODE_CASES = {
    "thresholds out of order": ({"decoding.rule": "prophet", "decoding.thresholds": [2, 5, 8]},
                                r"decoding: thresholds=\(2\.0, 5\.0, 8\.0\) must be non-increasing"),
    "gen_length not a multiple of block_length": ({"decoding.block_length": 3},
                                                  r"decoding: gen_length=8 is not a multiple of block_length=3"),
    "steps not a multiple of the blocks": ({"decoding.block_length": 4, "decoding.steps": 5},
                                           r"decoding: steps=5 is not a multiple of the number of blocks"),
    "preset and thresholds both": ({"decoding.preset": "paper", "decoding.thresholds": [9, 5, 1]},
                                   r"decoding\.preset and decoding\.thresholds both set"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_inconsistent_decoding_settings_are_refused_before_any_work(case, tmp_path, tiny_model_dir):
    over, pattern = DECODE_CASES[case]
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": GOOD}])
    with pytest.raises(JobConfigError, match=pattern):
        run(job(src, tmp_path / "out", tiny_model_dir, **over), log=no_log)
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_an_up_front_error_with_exit_code_2(tmp_path, tiny_model_dir):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": GOOD}])
    model = _broken_model(tmp_path, tiny_model_dir, "missing shard")
    p = subprocess.run([sys.executable, "jobs/generate.py", "--input", str(src), "--output", str(tmp_path / "out"),
                        "--model", str(model), "--engine", "torch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: model.dir: missing shard file") and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- end to end on Ray

def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.ray
def test_bad_jsonl_rows_through_ray_end_as_error_rows_and_the_output_loads_as_one_dataset(
        ray_local, tmp_path, tiny_model_dir):
    d = tmp_path / "in"
    bad = [None, "", "  ", 42, [1], "S:" + "1" * load_model(tiny_model_dir).max_length + "="]
    _jsonl(d / "a.jsonl", [{"prompt": GOOD, "meta": i} for i in range(6)] + [{"prompt": v, "meta": "x"} for v in bad],
           b'{"prompt": "S:\xff="}\n{"prompt": \n')
    _jsonl(d / "b.jsonl", [{"prompt": GOOD, "note": "other keys"} for _ in range(6)])
    before = _digest(d)
    cfg = job(d, tmp_path / "out", tiny_model_dir)
    s = run(cfg, log=no_log)
    t = pa.concat_tables([pq.read_table(p) for p in output.part_files(cfg.output.dir)])
    ids = t.column("id").to_pylist()
    assert sorted(ids) == sorted([f"a.jsonl:{i}" for i in range(14)] + [f"b.jsonl:{i}" for i in range(6)])
    assert (s.rows, s.ok, s.errors, s.unique_ids) == (20, 12, 8, 20)
    errors = {r["id"]: r["error"] for r in t.to_pylist() if r["status"] == "error"}
    assert [errors[f"a.jsonl:{i}"].split(" ")[0] for i in range(6, 14)] == [
        "prompt", "prompt", "prompt", "prompt", "prompt", "prompt", "line", "line"]
    assert "invalid UTF-8" in errors["a.jsonl:12"] and "invalid JSON" in errors["a.jsonl:13"]
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(Path(cfg.output.dir) / "*.parquet"), split="train")
    assert loaded.num_rows == 20 and {"meta", "note"} <= set(loaded.column_names)
    assert _digest(d) == before  # nothing in the input was touched


@pytest.mark.ray
def test_parquet_files_with_a_corrupt_page_and_differing_columns_lose_no_row(ray_local, tmp_path, tiny_model_dir):
    d = tmp_path / "in"
    d.mkdir()
    _corrupt_page(d, 0)                          # p.parquet: rows 4-7 unreadable, has column n
    pq.write_table(pa.table({"prompt": [GOOD] * 3, "extra": [None, None, None]}), d / "q.parquet")  # no n
    s = run(job(d, tmp_path / "out", tiny_model_dir), log=no_log)
    t = pa.concat_tables([pq.read_table(p) for p in output.part_files(str(tmp_path / "out"))])
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert sorted(by_id) == sorted([f"p.parquet:{i}" for i in range(8)] + [f"q.parquet:{i}" for i in range(3)])
    assert (s.rows, s.ok, s.errors) == (11, 7, 4)
    assert all("row group 1 unreadable" in by_id[f"p.parquet:{i}"]["error"] for i in range(4, 8))
    assert [by_id[f"p.parquet:{i}"]["n"] for i in range(4)] == [0, 1, 2, 3] and by_id["q.parquet:0"]["n"] is None
    assert t.schema.field("n").type == pa.int64()
