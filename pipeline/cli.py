"""Command-line flags for jobs/generate.py, generated from JobConfig so that every field has one.

A flag is the field's name with dashes (`--gen-length`), except the few renamed in FLAG_NAMES
(`--input`, `--output`, `--model`, ...). Flags override the YAML file given with `--config`; with
neither `--config` nor `--input`, the embedded default job (`pipeline/data/default_job.yaml`) is
the base.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import JobConfig, JobConfigError, read_yaml, set_dotted, validate_job_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = Path(__file__).resolve().parent / "data" / "default_job.yaml"
SECTIONS = ("input", "output", "model", "decoding", "execution", "storage")
FLAG_NAMES = {
    "input.path": "input", "input.format": "input-format", "input.limit": "limit",
    "output.dir": "output", "output.overwrite": "overwrite",
    "model.dir": "model", "model.dtype": "dtype", "model.engine": "engine",
    "decoding.batch_size": "slots", "execution.batch_size": "batch-size",
}
EXAMPLES = """\
examples:
  python jobs/generate.py                                   # the embedded default (tiny model, bundled prompts)
  python jobs/generate.py --output runs/demo                # the same into runs/demo (rerun = resume)
  python jobs/generate.py --config my_job.yaml --actors 4   # a YAML job, one field overridden
  python jobs/generate.py --input data.parquet --model checkpoints/tiny-dream --output runs/d \\
      --gen-length 32 --steps 32 --rule prophet --preset paper
  ray job submit --working-dir . -- python jobs/generate.py --config my_job.yaml

The last stdout line is one JSON object: output, rows, ok, errors, wall_s and more.
"""


def leaf_fields() -> list[tuple[str, Any, Any]]:
    """(dotted name, pydantic FieldInfo, annotation) of every JobConfig leaf field."""
    out = []
    for section in SECTIONS:
        model: type[BaseModel] = JobConfig.model_fields[section].annotation  # type: ignore[assignment]
        for name, info in model.model_fields.items():
            out.append((f"{section}.{name}", info, info.annotation))
    return out


def flag_of(dotted: str) -> str:
    """The command-line flag of a dotted field name."""
    return "--" + FLAG_NAMES.get(dotted, dotted.split(".", 1)[1].replace("_", "-"))


def _base_type(annotation: Any) -> Any:
    """X from Optional[X]; anything else as it is."""
    args = get_args(annotation)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return annotation


def _none_or(convert: Any) -> Any:
    """An argparse type: 'none' or 'null' -> None (unset an optional field), else convert(text)."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)
    return parse


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: --config plus one flag per JobConfig field (defaults come from the config)."""
    p = argparse.ArgumentParser(
        prog="jobs/generate.py", usage="%(prog)s [--config FILE] [--output DIR] [options]", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Batch generation with a masked diffusion LM and Prophet early commit: read prompts, "
                    "decode them on Ray actors, write Parquet plus .manifest.json. Rerunning into the same "
                    "--output resumes.")
    p.add_argument("--config", type=Path, help="YAML job file (sections input, output, model, decoding, "
                                               "execution); flags override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved job as YAML and exit")
    groups = {s: p.add_argument_group(s, JobConfig.model_fields[s].description) for s in SECTIONS}
    seen: set[str] = set()
    for dotted, info, annotation in leaf_fields():
        flag = flag_of(dotted)
        if flag in seen:
            raise AssertionError(f"two fields share the flag {flag}; add one to FLAG_NAMES")
        seen.add(flag)
        kind = _base_type(annotation)
        optional = kind is not annotation
        default = None if info.default is PydanticUndefined else info.default
        help_ = (f"{info.description}{' (none = unset)' if optional else ''} "
                 f"[{dotted}; default: {'required' if info.is_required() else default}]")
        kw: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is tuple:
            kw.update(type=_comma_list, metavar="A,B,...")
        elif get_origin(kind) is Literal:
            names = [str(c) for c in get_args(kind)] + (["none"] if optional else [])
            kw.update(choices=[*names[:len(get_args(kind))], *([None] if optional else [])],
                      metavar="{" + ",".join(names) + "}")
        else:
            kw["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        if optional and kind is not bool:
            kw["type"] = _none_or(kw.get("type", str))
        groups[dotted.split(".")[0]].add_argument(flag, **kw)
    return p


REFERENCE_PAGE = ROOT / "docs" / "configuration.md"
REFERENCE_BEGIN = "<!-- BEGIN generated by pipeline.cli.reference_markdown()"
REFERENCE_END = "<!-- END generated -->"


def reference_markdown() -> str:
    """The configuration reference table of docs/configuration.md: key, flag, default, meaning (one row per field)."""
    lines = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for dotted, info, _ in leaf_fields():
        default = "required" if info.is_required() else info.default
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{dotted}` | `{flag_of(dotted)}` | `{default}` | {meaning} |")
    return "\n".join(lines)


def reference_page(text: str) -> str:
    """`text` (docs/configuration.md) with the table between its generated markers replaced by reference_markdown()."""
    start = text.index("\n", text.index(REFERENCE_BEGIN)) + 1
    end = text.index(REFERENCE_END, start)
    return text[:start] + reference_markdown() + "\n" + text[end:]


def default_output_dir() -> str:
    """runs/<timestamp> under the working directory."""
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def config_from_args(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    """Parse flags into a validated JobConfig (the embedded default as base without --config/--input)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    tree: dict = {}
    if args.config is not None:
        tree = read_yaml(args.config)
    elif "input.path" not in overrides:
        tree = read_yaml(DEFAULT_JOB)
        _anchor_default_paths(tree)
    overrides.setdefault("output.dir", (tree.get("output") or {}).get("dir") or default_output_dir())
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return validate_job_config(tree), args


def _anchor_default_paths(tree: dict) -> None:
    """The embedded default's paths are relative to the checkout, not to the working directory."""
    for section, key in (("input", "path"), ("model", "dir"), ("decoding", "calibration")):
        value = (tree.get(section) or {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            tree[section][key] = str(ROOT / value)


def main_config(argv: list[str] | None = None) -> JobConfig | None:
    """JobConfig from argv; prints the YAML and returns None for --print-config."""
    cfg, args = config_from_args(argv)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return None
    return cfg


__all__ = ["JobConfigError", "build_parser", "config_from_args", "main_config"]


if __name__ == "__main__":  # python -m pipeline.cli: rewrite the generated reference in docs/configuration.md
    REFERENCE_PAGE.write_text(reference_page(REFERENCE_PAGE.read_text()))
    print(f"wrote the configuration reference into {REFERENCE_PAGE}")
