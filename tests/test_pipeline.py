"""The pipeline's parts that need no Ray: config, readers and ids, output directory, flags, actor."""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io as pio
from pipeline import output
from pipeline.actor import ActorSpec, GenerateActor, prepare, prompt_text, row_seed
from pipeline.cli import DEFAULT_JOB, build_parser, config_from_args, flag_of, leaf_fields
from pipeline.config import DECODE_DESCRIPTIONS, JobConfig, JobConfigError, load_job_config
from pipeline.schema import INPUT_ERROR, OUTPUT_COLUMNS, OUTPUT_SCHEMA, passthrough_name
from prophet.config import DecodeConfig

ROOT = Path(__file__).resolve().parents[1]


def base(tmp_path: Path, **over) -> dict:
    """A minimal valid override set (paths need not exist for config validation)."""
    return {"input.path": str(tmp_path / "in.jsonl"), "output.dir": str(tmp_path / "out"),
            "model.dir": str(tmp_path / "model"), **over}


# ----------------------------------------------------------------------------- config

def test_every_decode_field_is_mirrored_with_a_description():
    from pipeline.config import DecodingConfig

    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    assert names <= set(DecodingConfig.model_fields)
    assert names == set(DECODE_DESCRIPTIONS)
    for section in ("input", "output", "model", "decoding", "execution"):
        model = JobConfig.model_fields[section].annotation
        for name, info in model.model_fields.items():
            assert info.description, f"{section}.{name} has no description"


def test_config_defaults_match_decodeconfig(tmp_path):
    cfg = load_job_config(None, base(tmp_path))
    assert cfg.decode_config("llada") == DecodeConfig()
    assert cfg.dtype == "fp32"
    assert load_job_config(None, base(tmp_path, **{"execution.gpus_per_actor": 1})).dtype == "bf16"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(JobConfigError, match=r"decoding\.stepz: unknown key"):
        load_job_config(None, base(tmp_path, **{"decoding.stepz": 3}))
    with pytest.raises(JobConfigError, match=r"inputs: unknown key"):
        load_job_config(None, base(tmp_path, **{"inputs.path": "x"}))


def test_wrong_type_is_named_with_the_value(tmp_path):
    with pytest.raises(JobConfigError, match=r"execution\.actors: .*integer.*'two'"):
        load_job_config(None, base(tmp_path, **{"execution.actors": "two"}))
    with pytest.raises(JobConfigError, match=r"decoding\.rule: .*'fastest'"):
        load_job_config(None, base(tmp_path, **{"decoding.rule": "fastest"}))


def test_missing_sections_are_named():
    with pytest.raises(JobConfigError) as e:
        load_job_config(None, {"input": {"path": "x"}})
    assert "output: Field required" in str(e.value) and "model: Field required" in str(e.value)


def test_decodeconfig_errors_surface_as_job_errors(tmp_path):
    cfg = load_job_config(None, base(tmp_path, **{"decoding.gen_length": 24, "decoding.steps": 24, "decoding.block_length": 5}))
    with pytest.raises(JobConfigError, match=r"decoding: gen_length=24 is not a multiple of block_length=5"):
        cfg.decode_config("llada")
    cfg = load_job_config(None, base(tmp_path, **{"decoding.thresholds": [3, 5, 8]}))
    with pytest.raises(JobConfigError, match="non-increasing"):
        cfg.decode_config("llada")


def test_preset_calibration_and_anchor(tmp_path):
    cfg = load_job_config(None, base(tmp_path, **{"decoding.preset": "paper", "decoding.rule": "prophet"}))
    assert cfg.decode_config("llada").thresholds == (7.5, 5.0, 2.5)
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"decode": {"rule": "prophet", "thresholds": [6, 4, 2], "statistic": "min"}}))
    got = load_job_config(None, base(tmp_path, **{"decoding.calibration": str(cal)})).decode_config("dream")
    assert (got.rule, got.thresholds, got.statistic, got.host) == ("prophet", (6.0, 4.0, 2.0), "min", "dream")
    with pytest.raises(JobConfigError, match="preset and decoding.thresholds both set"):
        load_job_config(None, base(tmp_path, **{"decoding.preset": "paper", "decoding.thresholds": [9, 5, 1]}))
    with pytest.raises(JobConfigError, match="calibration: no such file"):
        load_job_config(None, base(tmp_path, **{"decoding.calibration": str(tmp_path / "nope.json")}))
    anchored = load_job_config(None, base(tmp_path, **{"decoding.anchor": "=", "decoding.region": "anchor",
                                                       "decoding.gen_length": 24, "decoding.steps": 24}))
    assert anchored.decode_config("llada", (7,)).anchor_ids == (7,)


def test_cpu_actors_leave_a_cpu_for_read_and_write_tasks(tmp_path):
    from pipeline.run import resolve_resources

    cfg = load_job_config(None, base(tmp_path))  # 2 actors on CPU
    assert resolve_resources(cfg, {"CPU": 3.0}) == resolve_resources(cfg, {"CPU": 3.0}, 3.0)
    assert resolve_resources(cfg, {"CPU": 3.0}).cpus == 1.0 and resolve_resources(cfg, {"CPU": 2.0}).cpus == 0.5
    assert resolve_resources(cfg, {"CPU": 33.0}, node_cpus=8.0).cpus == 8.0  # one actor fits on one node
    greedy = load_job_config(None, base(tmp_path, **{"execution.cpus_per_actor": 1}))
    with pytest.raises(JobConfigError, match="leave no CPU .* for read/write tasks"):
        resolve_resources(greedy, {"CPU": 2.0})
    gpu = load_job_config(None, base(tmp_path, **{"execution.gpus_per_actor": 1}))
    assert resolve_resources(gpu, {"CPU": 2.0}).cpus == 1.0 and resolve_resources(gpu, {"CPU": 2.0}).gpus == 1


def test_yaml_and_flags_flags_win(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {tmp_path}/in.jsonl}}\noutput: {{dir: {tmp_path}/o}}\n"
                   f"model: {{dir: {tmp_path}/m}}\ndecoding: {{steps: 8, gen_length: 16}}\n")
    cfg, _ = config_from_args(["--config", str(job), "--steps", "4", "--thresholds", "9,5,1", "--no-continuous"])
    assert (cfg.decoding.steps, cfg.decoding.gen_length) == (4, 16)
    assert cfg.decoding.thresholds == (9.0, 5.0, 1.0) and cfg.decoding.continuous is False
    unset, _ = config_from_args(["--config", str(job), "--block-length", "none", "--dtype", "none", "--host", "none"])
    assert (unset.decoding.block_length, unset.model.dtype, unset.decoding.host) == (None, None, None)
    assert cfg.output.dir == f"{tmp_path}/o"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(JobConfigError, match="top level must be a mapping"):
        config_from_args(["--config", str(bad)])


def test_every_field_has_exactly_one_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    flags = [flag_of(d) for d, _, _ in leaf_fields()]
    assert len(flags) == len(set(flags))
    assert {d for d, _, _ in leaf_fields()} <= dests
    assert flag_of("input.path") == "--input" and flag_of("output.dir") == "--output"


def test_default_job_resolves_paths_against_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = __import__("yaml").safe_load(DEFAULT_JOB.read_text())
    if not (ROOT / tree["decoding"]["calibration"]).is_file():
        pytest.skip("checkpoints/tiny-llada is not trained yet")
    cfg, _ = config_from_args(["--output", "somewhere"])
    assert cfg.input.path == str(ROOT / "pipeline/data/default_prompts.jsonl")
    assert cfg.model.dir == str(ROOT / "checkpoints/tiny-llada") and cfg.output.dir == "somewhere"


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file ('## A job file' -> 'a-job-file')."""
    import re

    heads = [line.lstrip("#").strip() for line in md.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_the_front_page_and_the_docs_link_only_to_what_exists():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 10 and len((ROOT / "README.md").read_text().splitlines()) <= 200  # a front door
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_file(), f"{page.name}: link to missing {target}"
            assert not anchor or anchor in _anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", (ROOT / "README.md").read_text()))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}, "every docs page is reachable from the front page"


def test_the_configuration_reference_page_is_current():
    from pipeline.cli import REFERENCE_PAGE, reference_markdown, reference_page

    text = REFERENCE_PAGE.read_text()
    assert reference_markdown() in text and reference_page(text) == text, \
        "docs/configuration.md's reference is stale: run `python -m pipeline.cli` to regenerate it"


def test_bad_flags_fail_before_ray_with_exit_code_2(tmp_path):
    code = ("import sys; sys.argv = ['generate.py', '--input', 'x.jsonl', '--output', 'o', '--steps', 'abc'];"
            "sys.path.insert(0, 'jobs'); import generate; rc = generate.main(sys.argv[1:]);"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "decoding.steps" in p.stderr and "'abc'" in p.stderr
    assert p.stdout.strip().endswith("NO_RAY")


def test_light_modules_do_not_import_ray_or_deepspeed():
    code = ("import sys; import pipeline.config, pipeline.io, pipeline.output, pipeline.schema, pipeline.cli, "
            "pipeline.actor; print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "[]", p.stderr


# ----------------------------------------------------------------------------- readers and ids

def _jsonl(path: Path, rows: list, extra_lines: tuple[bytes, ...] = ()) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in extra_lines:
            f.write(line)
    return path


def _read_all(fmt: str, path: Path, prompt_column: str = "prompt") -> pa.Table:
    with open(path, "rb") as fh:
        return pa.concat_tables(list(pio.read_file(fmt, fh, path.name, prompt_column)), promote_options="permissive")


def test_jsonl_reader_keeps_broken_lines_as_error_rows(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "n": 1}, {"prompt": 7, "n": 2}],
                  (b"\n", b"{broken\n", b'{"prompt": "\xff\xfe"}\n', b"[1, 2]\n", b'{"prompt": "y", "n": "3"}\n'))
    t = _read_all("jsonl", path)
    assert t.column(pio.ROW_KEY).to_pylist() == [f"a.jsonl:{i}" for i in range(6)]  # blank line skipped
    errors = t.column(INPUT_ERROR).to_pylist()
    assert errors[0] is None and errors[5] is None
    assert "not a string" in errors[1] and "invalid JSON" in errors[2]
    assert "invalid UTF-8" in errors[3] and "not an object" in errors[4]
    assert t.column("n").to_pylist() == ["1", "2", None, None, None, "3"]  # text: non-strings as JSON text


def test_csv_reader_reads_strings_and_flags_bad_rows(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'prompt,answer\n"multi\nline",42\nshort\n"ok","\xff"\n')
    t = _read_all("csv", path)
    assert t.column("prompt").to_pylist()[0] == "multi\nline"
    assert t.column("answer").type == pa.string() and t.column("answer").to_pylist()[0] == "42"
    errors = t.column(INPUT_ERROR).to_pylist()
    assert errors[0] is None and "1 fields" in errors[1] and "invalid UTF-8" in errors[2]


def test_parquet_reader_numbers_rows_across_row_groups(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(2500)]}), path, row_group_size=700)
    t = _read_all("parquet", path)
    assert t.column(pio.ROW_KEY).to_pylist() == [f"a.parquet:{i}" for i in range(2500)]


def test_hf_reader_streams_ranges(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(50)]}).save_to_disk(str(tmp_path / "hf"))
    assert pio.hf_num_rows(str(tmp_path / "hf")) == 50
    t = pa.concat_tables(list(pio.read_hf_range(str(tmp_path / "hf"), 10, 30, chunk_rows=7)))
    assert t.column("prompt").to_pylist() == [f"p{i}" for i in range(10, 30)]
    assert t.column(pio.ROW_KEY).to_pylist() == [str(i) for i in range(10, 30)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(JobConfigError, match="DatasetDict"):
        pio.hf_num_rows(str(tmp_path / "dd"))


def test_format_detection_and_column_checks(tmp_path):
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "x.jsonl", [{"question": "q"}])
    with gzip.open(tmp_path / "d" / "y.jsonl.gz", "wt") as f:
        f.write(json.dumps({"question": "r"}) + "\n")
    cfg = load_job_config(None, base(tmp_path, **{"input.path": str(tmp_path / "d")})).input
    assert pio.detect_format(cfg) == "jsonl"
    with pytest.raises(JobConfigError, match=r"input\.prompt_column: the input has no column 'prompt'.*question"):
        pio.check_columns(cfg, pio.peek(cfg, "jsonl"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.jsonl").write_text("\n")
    empty = load_job_config(None, base(tmp_path, **{"input.path": str(tmp_path / "e")})).input
    with pytest.raises(JobConfigError, match="has no rows"):
        pio.peek(empty, "jsonl")


def test_corrupt_parquet_input_is_named_up_front(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "in" / "good.parquet")
    (tmp_path / "in" / "bad.parquet").write_bytes(b"PAR1 not really")
    cfg = load_job_config(None, base(tmp_path, **{"input.path": str(tmp_path / "in")})).input
    with pytest.raises(JobConfigError, match="bad.parquet is not a readable Parquet file"):
        pio.check_parquet_files(cfg)


def test_derived_ids_are_stable_and_distinct_for_duplicates(tmp_path):
    rows = [{"prompt": "same"}] * 3 + [{"prompt": "other"}]
    path = _jsonl(tmp_path / "dup.jsonl", rows)
    a = pio.assign_ids(_read_all("jsonl", path), None).column("id").to_pylist()
    b = pio.assign_ids(_read_all("jsonl", path), None).column("id").to_pylist()
    assert a == b == ["dup.jsonl:0", "dup.jsonl:1", "dup.jsonl:2", "dup.jsonl:3"]


def test_given_ids_are_strings_and_null_ids_fall_back_with_an_error():
    batch = pa.table({"k": [5, None, 7], pio.ROW_KEY: ["f:0", "f:1", "f:2"]})
    out = pio.assign_ids(batch, "k")
    assert out.column("id").to_pylist() == ["5", "f:1", "7"]
    assert out.column(INPUT_ERROR).to_pylist() == [None, "k is null or empty", None]
    kept = pio.ids_not_done(batch, "k", pa.array(["5"]))
    assert kept.column("id").to_pylist() == ["f:1", "7"]
    # Several samples: a prompt is done when all its samples are; --limit (between the two) counts prompts.
    done = pa.array(["5#0", "5#1", "7#1"])
    prompts = pio.prompts_not_done(batch, "k", done, num_samples=2)
    assert prompts.column("id").to_pylist() == ["f:1", "7"]
    samples = pio.samples_not_done(prompts, done, num_samples=2)
    assert samples.column("id").to_pylist() == ["f:1#0", "f:1#1", "7#0"]  # 7 only its missing sample
    assert pio.ids_not_done(batch, "k", done, num_samples=2).equals(samples)
    own = pio.assign_ids(batch.append_column("id", pa.array(["a", "b", "c"])), None)
    assert own.column("id").to_pylist() == ["f:0", "f:1", "f:2"]  # derived, as asked
    assert own.column("input_id").to_pylist() == ["a", "b", "c"]  # the input's "id" kept, not overwritten


def test_cluster_yaml_is_a_valid_launcher_config_with_auth_on_and_a_local_dashboard():
    import yaml
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(fillout_defaults(config))
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and start.count("RAY_AUTH_MODE=token") == 2
    assert "disabled" not in start and config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("prophet-dlm" in c for c in config["setup_commands"])


# ----------------------------------------------------------------------------- output directory

def _rows(ids: list[str], **extra) -> pa.Table:
    cols = {f.name: pa.nulls(len(ids), f.type) for f in OUTPUT_SCHEMA}
    cols["id"] = pa.array(ids, pa.string())
    cols["status"] = pa.array(["ok"] * len(ids), pa.string())
    cols.update({k: pa.array(v) for k, v in extra.items()})
    return pa.table(cols)


def test_parts_are_atomic_and_resume_reads_their_ids(tmp_path):
    out = str(tmp_path / "out")
    output.write_manifest(out, {"status": "running"})
    output.write_part(_rows(["a", "b"], note=["x", "y"]), out, output.part_name("r1", 0))
    (tmp_path / "out" / ".part-r1-000001.parquet.tmp").write_bytes(b"half written")
    assert [Path(p).name for p in output.part_files(out)] == ["part-r1-000000-000000.parquet"]
    assert sorted(output.done_ids(out).to_pylist()) == ["a", "b"]
    assert output.remove_temp_files(out) == 1
    t = pq.read_table(output.part_files(out)[0])
    assert t.column_names == [*OUTPUT_COLUMNS, "note"] and t.schema.field("id").type == pa.string()
    counts = output.count_rows(out, run_id="r1")
    assert (counts["rows"], counts["unique_ids"], counts["run_rows"]) == (2, 2, 2)
    output.clear(out)
    assert output.part_files(out) == [] and output.read_manifest(out) is None


@pytest.mark.parametrize("text,problem", [("{not json", "not valid JSON"), ("[1, 2]", "holds a list")])
def test_a_corrupt_manifest_is_one_clear_error_for_resume_and_report(tmp_path, tiny_model_dir, text, problem):
    """output.read_manifest is the one reader: the job's resume check and the report name the same file and fix."""
    from pipeline.report import ReportError, read_manifest as report_manifest
    from pipeline.run import plan_job, prepare_output

    out = tmp_path / "out"
    out.mkdir()
    output.write_part(_rows(["a"]), str(out), output.part_name("r1", 0))
    (out / ".manifest.json").write_text(text)
    (tmp_path / "in.jsonl").write_text('{"prompt": "S:1="}\n')
    cfg = load_job_config(None, base(tmp_path, **{"model.dir": str(tiny_model_dir), "decoding.gen_length": 8,
                                                  "decoding.steps": 8}))
    with pytest.raises(JobConfigError, match=rf"^output\.dir: .*\.manifest\.json: {problem}.*--overwrite"):
        prepare_output(plan_job(cfg))
    with pytest.raises(ReportError) as info:
        report_manifest(out)
    assert str(info.value).startswith(f"{out / '.manifest.json'}: {problem}") and "--overwrite" in str(info.value)


def test_a_foreign_unreadable_parquet_in_the_output_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-x.parquet").write_bytes(b"garbage")
    with pytest.raises(JobConfigError, match="not a readable part"):
        output.done_ids(str(tmp_path / "out"))


def test_passthrough_names_get_a_prefix_on_clash():
    assert passthrough_name("answer", set(OUTPUT_COLUMNS)) == "answer"
    assert passthrough_name("completion", set(OUTPUT_COLUMNS)) == "input_completion"
    assert passthrough_name("completion", {*OUTPUT_COLUMNS, "input_completion"}) == "input_input_completion"


# ----------------------------------------------------------------------------- actor (in process)

def test_prompt_text_and_prepare_reasons():
    render = lambda msgs: "|".join(m["content"] for m in msgs)  # noqa: E731
    assert prompt_text("hi", None, False, render) == ("hi", None)
    assert prompt_text(None, None, False, render)[1] == "prompt is null"
    assert prompt_text("  ", None, False, render)[1] == "prompt is empty or whitespace only"
    assert prompt_text(3, None, False, render)[1] == "prompt is a int, not a string"
    assert prompt_text(None, '[{"role": "user", "content": "a"}]', True, render) == ("a", None)
    assert "not a non-empty list" in prompt_text(None, [{"x": 1}], True, render)[1]
    assert prepare("abcd", None, list, 3).error.startswith("prompt has 4 tokens")
    assert prepare("", None, list, 3).error == "prompt has no tokens"
    assert prepare("ab", None, lambda s: 1 / 0, 3).error.startswith("tokenizer failed: ZeroDivisionError")


def test_row_seed_is_stable_and_id_dependent():
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(0, "b") != row_seed(1, "a")
    assert 0 <= row_seed(3, "x") < 2**63


def _spec(model_dir: Path, engine: str = "torch", **decode) -> ActorSpec:
    cfg = DecodeConfig(**{"gen_length": 24, "steps": 24, "batch_size": 4, **decode})
    return ActorSpec(model_dir=str(model_dir), dtype="fp32", engine=engine, device="cpu", decode=cfg.to_dict(),
                     seed=0, settings_hash="h", prompt_column="prompt", drop_columns=(pio.ROW_KEY,))


def _batch(prompts: list, ids: list[str] | None = None, **extra) -> pa.Table:
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    return pa.table({"prompt": pa.array(prompts, pa.string()), "id": ids, pio.ROW_KEY: ids, **extra})


def test_actor_rows_do_not_depend_on_batch_company_or_engine(tiny_model_dir, task_rows):
    prompts = [r["prompt"] for r in task_rows[:6]]
    torch_actor = GenerateActor(_spec(tiny_model_dir, temperature=1.0))
    ds_actor = GenerateActor(_spec(tiny_model_dir, engine="deepspeed", temperature=1.0))
    together = torch_actor(_batch(prompts))
    alone = torch_actor(_batch(prompts[3:4], ["r3"]))
    assert together.column("completion_ids")[3] == alone.column("completion_ids")[0]
    assert ds_actor(_batch(prompts)).column("completion_ids") == together.column("completion_ids")
    assert set(together.column("status").to_pylist()) == {"ok"}


def test_a_cached_decode_runs_through_the_deepspeed_engine_and_reports_forward_tokens(tiny_model_dir, task_rows):
    prompts = [r["prompt"] for r in task_rows[:5]]
    cached = GenerateActor(_spec(tiny_model_dir, engine="deepspeed", block_length=8, cache="dual"))
    plain = GenerateActor(_spec(tiny_model_dir, block_length=8))
    got, want = cached(_batch(prompts)), plain(_batch(prompts))
    assert set(got.column("status").to_pylist()) == {"ok"}
    lengths = [len(plain.model.encode(p)) + 24 for p in prompts]
    assert want.column("forward_tokens").to_pylist() == [s * n for s, n in zip(want.column("steps_used").to_pylist(),
                                                                                lengths)]
    assert all(c < w for c, w in zip(got.column("forward_tokens").to_pylist(), want.column("forward_tokens").to_pylist()))


def test_actor_turns_bad_rows_and_nonfinite_logits_into_error_rows(tiny_model_dir, task_rows):
    actor = GenerateActor(_spec(tiny_model_dir))
    good = task_rows[0]["prompt"]
    long = good * 40
    poison = "S:" + "9" * 16 + "="   # the wrapped module returns NaN logits for rows holding "9"
    nine = actor.model.encode("9")[0]
    inner = actor.model.module

    def nan_for_nines(ids, mask, **kw):
        out = inner(ids, mask, **kw)
        return out.masked_fill((ids == nine).any(dim=1)[:, None, None], float("nan"))

    actor.model.module = nan_for_nines
    batch = _batch([good, "", None, long, poison, good], answer=["a", "b", "c", "d", "e", "f"],
                   completion=["ref"] * 6, **{INPUT_ERROR: [None, None, None, None, None, "line 9: invalid JSON"]})
    out = actor(batch)
    status, error = out.column("status").to_pylist(), out.column("error").to_pylist()
    assert status == ["ok", "error", "error", "error", "error", "error"]
    assert "empty" in error[1] and "null" in error[2] and "tokens" in error[3]
    assert "non-finite" in error[4] and error[5] == "line 9: invalid JSON"
    assert out.column("answer").to_pylist() == ["a", "b", "c", "d", "e", "f"]
    assert out.column("input_completion").to_pylist() == ["ref"] * 6
    assert pio.ROW_KEY not in out.column_names and INPUT_ERROR not in out.column_names
    assert out.column_names[:len(OUTPUT_COLUMNS)] == list(OUTPUT_COLUMNS)
    first = out.slice(0, 1).to_pylist()[0]
    assert first["generated_tokens"] == len(first["completion_ids"]) and first["steps_used"] <= 24
    assert first["prompt_tokens"] == len(actor.model.encode(good)) and math.isfinite(first["decode_s"])
    assert out.column("completion").to_pylist()[1:] == [None] * 5


def test_a_batch_that_fails_whole_is_counted_when_it_falls_back_to_rows(tiny_model_dir, task_rows):
    actor = GenerateActor(_spec(tiny_model_dir))
    inner = actor.model.module

    def fail_batches(ids, mask, **kw):  # a model that fails every batch of more than one row
        if ids.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return inner(ids, mask, **kw)

    actor.model.module = fail_batches
    prompts = [r["prompt"] for r in task_rows[:3]]
    out = actor(_batch(prompts))
    assert set(out.column("status").to_pylist()) == {"ok"}  # every row decoded, one by one
    actor(_batch(prompts[:1], ["solo"]))                    # a batch of one never falls back
    assert actor.fallbacks.report() == {"batches": 1, "rows": 3,
                                        "first_error": "RuntimeError: CUDA out of memory (simulated)"}
