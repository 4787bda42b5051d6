"""lm-evaluation-harness (lm-eval 0.4.13, the `lmeval` extra) model class backed by `prophet.decode`.

    from prophet.lmeval import ProphetLM
    lm = ProphetLM(model="checkpoints/tiny-llada", gen_length=24, steps=24, rule="prophet")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(include_path=DIR))

Importing this module registers the class under lm-eval's model name "prophet"; `jobs/lm_eval.py`
runs lm-eval's own CLI with it. Every `DecodeConfig` field is a `--model_args` key (values are
coerced to the field's type; thresholds as 8/5/3 or a preset name), plus `model`, `device`,
`dtype`, `calibration` (a calibration file: rule and thresholds), `seed` and the Monte-Carlo
log-likelihood options `mc_num`, `mc_batch`, `check_greedy`.
"""
from __future__ import annotations

import json
import logging
import math
import types
import typing
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from prophet.config import PRESETS, ConfigError, DecodeConfig
from prophet.decode import decode
from prophet.models import load_model
from prophet.tasks.evaluation import completions
from prophet.types import DecodeResult, TextDLM

log = logging.getLogger(__name__)

# model_args keys that are not DecodeConfig fields
OWN_ARGS = {"model", "device", "dtype", "calibration", "seed", "mc_num", "mc_batch", "check_greedy"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATS_KEY = "prophet"  # the key of the per-response stats appended to a request's logged arguments


def coerce_field(name: str, value: Any) -> Any:
    """A model_args value (lm-eval has already turned 'true', '3', 'none' into bool/int/None) -> the
    type of DecodeConfig field `name`; a ConfigError naming the field where it does not fit."""
    hint = typing.get_type_hints(DecodeConfig)[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        value = "none" if value is None else value  # lm-eval reads 'none' as None: cache=none
        return str(value)  # DecodeConfig names the choices when it is not one of them
    if name == "thresholds":
        if isinstance(value, str) and value in PRESETS:
            return PRESETS[value]
        return _numbers(name, value, float)
    if name == "anchor_ids":
        return _numbers(name, value, int)
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args {name}={value!r}: expected {hint.__name__}") from None
    return value


def _numbers(name: str, value: Any, kind: type) -> tuple:
    """'8/5/3' (commas separate model_args, so '/' or ':' separate numbers) -> (8.0, 5.0, 3.0)."""
    if isinstance(value, (int, float)):
        return (kind(value),)
    try:
        return tuple(kind(v) for v in str(value).replace(":", "/").split("/") if v != "")
    except ValueError:
        extra = f" or a preset {sorted(PRESETS)}" if name == "thresholds" else ""
        raise ConfigError(f"model_args {name}={value!r}: give numbers separated by '/' (e.g. 8/5/3){extra}") from None


def build_config(args: dict[str, Any], default_host: str, calibration: str | Path | None = None,
                 max_gen_toks: int | None = None, block_length: int | None = None) -> DecodeConfig:
    """The DecodeConfig of `args` (DecodeConfig fields only). gen_length defaults to the request's
    max_gen_toks (for host 'block' rounded up to whole blocks of the model's `block_length`; the
    text is cut at max_gen_toks), steps to gen_length, host to the model's own; a calibration file
    sets rule, thresholds, region and statistic, and fields given explicitly win over it."""
    known = {f.name for f in fields(DecodeConfig)}
    unknown = set(args) - known
    if unknown:
        raise ConfigError(f"model_args {sorted(unknown)}: not decoding options; known: "
                          f"{sorted(known | OWN_ARGS)}")
    given = {k: coerce_field(k, v) for k, v in args.items()}
    gen = given.get("gen_length", max_gen_toks or DecodeConfig.gen_length)
    if given.get("host", default_host) == "block" and block_length and "gen_length" not in given:
        gen = -(-gen // block_length) * block_length
    base = {"host": default_host, "gen_length": gen, "steps": gen}
    cfg = DecodeConfig(**(base | given))
    if calibration is not None:  # checked against the settings it was fitted with; explicit fields win
        cfg = replace(cfg.with_calibration(calibration), **given)
    return cfg


@dataclass
class RowStats:
    """What one decoded request cost: it goes into the logged sample and the summary."""

    steps_used: int
    forward_tokens: int
    committed_early: bool
    commit_step: int
    num_generated: int
    decode_seconds: float
    budget: int

    def to_dict(self) -> dict:
        return {"steps_used": self.steps_used, "forward_tokens": self.forward_tokens,
                "committed_early": self.committed_early, "commit_step": self.commit_step,
                "num_generated": self.num_generated, "decode_seconds": round(self.decode_seconds, 6),
                "budget": self.budget}


def row_stats(res: DecodeResult, budget: int) -> list[RowStats]:
    """Per-row stats of one decode call."""
    ftok = res.forward_tokens.tolist() if res.forward_tokens is not None else [0] * len(res)
    return [RowStats(int(s), int(f), bool(e), int(c), int(n), float(t), budget)
            for s, f, e, c, n, t in zip(res.steps_used.tolist(), ftok, res.committed_early.tolist(),
                                        res.commit_step.tolist(), res.num_generated.tolist(),
                                        res.decode_seconds.tolist())]


def cut_at_until(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (empty strings ignored)."""
    ends = [i for s in until if s and (i := text.find(s)) >= 0]
    return text[:min(ends)] if ends else text


def _until(gen_kwargs: dict) -> list[str]:
    u = gen_kwargs.get("until") or []
    return [u] if isinstance(u, str) else list(u)


@register_model("prophet")
class ProphetLM(LM):
    """An lm-eval model: generate_until through `prophet.decode` (continuous batching, every decoding
    option from model_args), loglikelihood by LLaDA's Monte-Carlo masked ELBO."""

    def __init__(self, model: str | TextDLM, device: str = "cpu", dtype: str = "float32",
                 calibration: str | None = None, seed: int = 0, mc_num: int = 128, mc_batch: int = 32,
                 check_greedy: bool = False, **decode_args: Any) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            if dtype not in DTYPES:
                raise ConfigError(f"model_args dtype={dtype!r}: choose one of {sorted(DTYPES)}")
            model = load_model(model, device=device, dtype=DTYPES[dtype])
        self.model: TextDLM = model
        self._device = torch.device(model.device)
        self.calibration = calibration
        self.seed = int(seed)
        if int(mc_num) < 1 or int(mc_batch) < 1:
            raise ConfigError(f"model_args mc_num={mc_num}, mc_batch={mc_batch}: both must be >= 1")
        self.mc_num, self.mc_batch, self.check_greedy = int(mc_num), int(mc_batch), bool(check_greedy)
        self.decode_args = decode_args
        build_config(decode_args, model.default_host, calibration, None, self.block_length)  # refuse bad args now
        self.stats: dict[str, list[RowStats]] = defaultdict(list)  # task name -> rows decoded

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ProphetLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ProphetLM":
        """model_args win over lm-eval's own --batch_size/--device. A --batch_size of 1 or 'auto' (the
        CLI's default) leaves the decoder's slots as model_args or DecodeConfig say (one-at-a-time
        decoding must be asked for in model_args: batch_size=1); the CLI's default device cuda:0 is
        taken only where CUDA is there, else the CPU."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        bs = extra.get("batch_size")
        if bs not in (None, 1, "1", "auto") and "batch_size" not in args:
            args["batch_size"] = int(bs)
        dev = extra.get("device")
        if dev and "device" not in args:
            usable = not str(dev).startswith("cuda") or torch.cuda.is_available()
            args["device"] = dev if usable else "cpu"
        return cls(**args)

    @property
    def tokenizer_name(self) -> str:
        return self.model.name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat template (with the generation prompt, the only mode it offers)."""
        if not add_generation_prompt:
            raise NotImplementedError("prophet: the chat template always adds the generation prompt; "
                                      "drop --fewshot_as_multiturn or assistant prefills")
        return self.model.render_chat(chat_history)

    # -- generation ------------------------------------------------------------------------------

    def config_for(self, max_gen_toks: int | None) -> DecodeConfig:
        """The decoding config of a request whose task allows max_gen_toks new tokens."""
        return build_config(self.decode_args, self.model.default_host, self.calibration, max_gen_toks,
                            self.block_length)

    @property
    def block_length(self) -> int | None:
        """The model's attention block (block-diffusion families), None for bidirectional ones."""
        return getattr(self.model, "block_length", None)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Decode every request, grouped by decoding config, each group in one continuously batched
        `decode` call; cut at EOS, at max_gen_toks tokens and at the first `until` string."""
        groups: dict[DecodeConfig, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[self.config_for(req.args[1].get("max_gen_toks"))].append(i)
        out: list[str | None] = [None] * len(requests)
        for cfg, idx in groups.items():
            prompts = [self._prompt(requests[i].args[0], cfg.gen_length) for i in idx]
            res = decode(self.model, prompts, cfg, seeds=[self.seed + i for i in idx])
            texts = self._texts(res, [requests[i].args[1] for i in idx])
            for i, text, st in zip(idx, texts, row_stats(res, cfg.steps)):
                out[i] = text
                self._record(requests[i], text, st)
        return out  # type: ignore[return-value]

    def _prompt(self, context: str, gen_length: int) -> list[int]:
        """Context ids, the oldest cut away where prompt + window exceed the model's length."""
        ids = self.model.encode(context)
        room = self.model.max_length - gen_length
        if room < 1:
            raise ConfigError(f"gen_length={gen_length} leaves no room for a prompt in the model's "
                              f"max_length={self.model.max_length}: lower gen_length / max_gen_toks")
        if len(ids) > room:
            log.warning("prophet: prompt of %d tokens cut to its last %d", len(ids), room)
        return ids[-room:]

    def _texts(self, res: DecodeResult, gen_kwargs: list[dict]) -> list[str]:
        n = res.num_generated.clone()
        for r, kw in enumerate(gen_kwargs):
            if kw.get("max_gen_toks"):
                n[r] = min(int(n[r]), int(kw["max_gen_toks"]))
        return [cut_at_until(t, _until(kw)) for t, kw in zip(completions(self.model, res.tokens, n), gen_kwargs)]

    def _record(self, req: Instance, text: str, st: RowStats) -> None:
        """Cache the answer, append the row's stats to the request's arguments (so that they reach
        lm-eval's logged samples: one dict per response, as `resps`) and to the task's summary."""
        self.cache_hook.add_partial("generate_until", req.args[:2], text)
        args = req.arguments
        if len(args) > 2 and isinstance(args[-1], dict) and STATS_KEY in args[-1]:
            args[-1][STATS_KEY].append(st.to_dict())
        else:
            req.arguments = tuple(args) + ({STATS_KEY: [st.to_dict()]},)
        self.stats[req.task_name or "?"].append(st)

    def summary(self) -> dict[str, dict]:
        """Per task: requests decoded, mean steps against the budget, step speed-up, forward tokens."""
        out = {}
        for task, rows in self.stats.items():
            steps = sum(r.steps_used for r in rows) / len(rows)
            budget = sum(r.budget for r in rows) / len(rows)
            out[task] = {"n": len(rows), "mean_steps": round(steps, 4), "budget": round(budget, 4),
                         "speedup": round(budget / steps, 4),
                         "mean_forward_tokens": round(sum(r.forward_tokens for r in rows) / len(rows), 2),
                         "committed_early": round(sum(r.committed_early for r in rows) / len(rows), 4)}
        return out

    # -- likelihood ------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """LLaDA's Monte-Carlo estimate of log p(continuation | context): the masked ELBO averaged over
        `mc_num` samples (mask counts stratified over each batch of `mc_batch`, positions uniform),
        seeded per request (seed + request index). is_greedy: low-confidence one-token-per-step decoding
        reproduces the continuation (check_greedy=true), else False as in LLaDA's evaluation."""
        out = []
        for i, req in enumerate(requests):
            context, continuation = req.args[0], req.args[1]
            prefix, target = self._encode_pair(context, continuation)
            ll = mc_loglikelihood(self.model, prefix, target, self.mc_num, self.mc_batch, self.seed + i)
            greedy = self.check_greedy and self._greedy(prefix, target)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
            out.append((ll, greedy))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of context and continuation, the context's trailing spaces moved to the continuation
        (lm-eval's convention); the oldest context cut where both exceed the model's length."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, prefix = self.model.encode(context + continuation), self.model.encode(context)
        target = whole[len(prefix):]
        if not target:
            raise ConfigError(f"loglikelihood: the continuation {continuation!r} encodes to no token")
        room = self.model.max_length - len(target)
        return prefix[max(0, len(prefix) - room):], target

    def _greedy(self, prefix: list[int], target: list[int]) -> bool:
        """Whether greedy decoding of the target's length gives the target. A block model decodes whole
        blocks (its host's window is rounded up; block-causal, so later blocks change nothing before)."""
        n, bl = len(target), self.block_length
        gen = -(-n // bl) * bl if bl else n
        cfg = DecodeConfig(host="block" if bl else "llada", gen_length=gen, steps=gen, batch_size=1)
        res = decode(self.model, [prefix], cfg, seeds=[self.seed])
        return res.tokens[0, :n].tolist() == target

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "prophet: loglikelihood_rolling (perplexity tasks such as wikitext) is not supported: a masked "
            "diffusion LM has no left-to-right likelihood to roll; use generate_until or loglikelihood tasks")


@torch.no_grad()
def mc_loglikelihood(model: TextDLM, prefix: list[int], target: list[int], mc_num: int, mc_batch: int,
                     seed: int) -> float:
    """-E[sum over masked target positions of CE / mask ratio]: the masked-diffusion ELBO of `target`
    given `prefix`, estimated from ceil(mc_num / mc_batch) * mc_batch masked copies, as LLaDA's
    eval_llada.py does (per batch a random start k and evenly spaced mask counts, then a random
    permutation per row). Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(model.device)
    seq = torch.tensor(prefix + target, dtype=torch.long)
    T, P = len(target), len(prefix)
    losses = []
    for _ in range(math.ceil(mc_num / mc_batch)):
        k = int(torch.randint(1, T + 1, (), generator=g))
        counts = torch.round(torch.linspace(float(k), k + (mc_batch - 1) * (T / mc_batch), mc_batch)).long()
        counts = (counts - 1) % T + 1
        ranks = torch.stack([torch.randperm(T, generator=g) for _ in range(mc_batch)])
        masked = ranks < counts[:, None]                               # (b, T): count masks per row
        noisy = seq.repeat(mc_batch, 1)
        noisy[:, P:] = torch.where(masked, model.mask_id, noisy[:, P:])
        logits = model.logits(noisy.to(device), None, last=T).float().cpu()  # (b, T, V)
        ce = F.cross_entropy(logits[masked], seq[P:].repeat(mc_batch, 1)[masked], reduction="none")
        ratio = (counts.float() / T)[:, None].expand(-1, T)[masked]
        losses.append(float((ce / ratio).sum()) / mc_batch)
    return -sum(losses) / len(losses)


# -- an offline lm-eval task directory over the project's own task prompts ----------------------------

def write_task_dir(directory: str | Path, task_names: Sequence[str], n: int, seed: int = 0,
                   split: str = "test") -> list[str]:
    """Write, per task, `<task>.jsonl` (n prompts of `split`, the ones jobs/evaluate.py takes for the
    same n and seed) and `prophet_<task>.yaml` (lm-eval generate_until, exact_match against the
    answer, max_gen_toks = the task's gen_length). Returns the lm-eval task names."""
    from prophet.tasks import get_task

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name in task_names:
        task = get_task(name)
        examples = task.examples(split, task.available(split, n), seed=seed)
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
        lm_name = f"prophet_{name}"
        (directory / f"{lm_name}.yaml").write_text(TASK_YAML.format(
            task=lm_name, data=json.dumps(str(data)), max_gen_toks=task.budget.gen_length))
        names.append(lm_name)
    return names


TASK_YAML = """\
# written by prophet.lmeval.write_task_dir: held-out prompts, scored by exact match with the answer
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: []
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def summary_lines(results: dict, lm: ProphetLM) -> list[str]:
    """One line per task: lm-eval's metrics next to mean steps, budget, speed-up and forward tokens."""
    lines = []
    for task, s in lm.summary().items():
        metrics = {k: v for k, v in results.get("results", {}).get(task, {}).items()
                   if "," in k and "stderr" not in k and isinstance(v, (int, float))}  # 'metric,filter' keys
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        lines.append(f"prophet summary | {task} | {shown} | n={s['n']} mean steps {s['mean_steps']:.2f} / "
                     f"{s['budget']:g} | speed-up {s['speedup']:.2f}x | mean forward tokens "
                     f"{s['mean_forward_tokens']:.1f}")
    return lines
