"""One frozen decoding configuration, validated once at construction."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, get_args

Host = Literal["llada", "dream", "block"]
Remasking = Literal["low_confidence", "random"]
DreamAlg = Literal["origin", "maskgit_plus", "topk_margin", "entropy"]
Rule = Literal["full", "prophet", "gap_parallel", "confidence_threshold"]
Parallel = Literal["none", "gap_parallel", "confidence_threshold"]
Region = Literal["anchor", "window", "block"]
Statistic = Literal["mean", "min", "quantile"]
Cache = Literal["none", "prefix", "dual"]
Progress = Literal["exact", "reference"]

# Prophet thresholds (tau_high, tau_mid, tau_low) in logit units, applied over the first,
# middle and last third of the step budget. "default" is the project's; the others are the
# paper's own table.
PRESETS: dict[str, tuple[float, float, float]] = {
    "default": (8.0, 5.0, 3.0),
    "paper": (7.5, 5.0, 2.5),
    "paper_gsm8k": (8.0, 5.0, 3.5),
    "paper_code": (7.5, 5.0, 4.5),
}
# confidence_threshold's default per host: Fast-dLLM's 0.9, LLaDA2's reference 0.95 (SPEC 5, 8)
DEFAULT_CONFIDENCE = {"llada": 0.9, "dream": 0.9, "block": 0.95}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode: host schedule, sampling, commit rule and batching."""

    host: Host = "llada"              # whose step schedule: LLaDA blocks, Dream eps, or block diffusion (LLaDA2)
    gen_length: int = 64              # generated positions after the prompt
    steps: int = 64                   # step budget (forward passes) for the whole window
    # semi-autoregressive block (llada, dream); None = one block of gen_length. Host block: the
    # model's attention block (None = the model's; another value is refused)
    block_length: int | None = None
    # Block KV cache (SPEC section 6): none, prefix (cache what precedes the block) or dual (also
    # the positions after it, as of the block's first step). Needs a model that keeps keys/values.
    cache: Cache = "none"
    cache_refresh_every: int | None = None  # also refresh every k steps inside a block (1 = as 'none')
    temperature: float = 0.0          # 0 = argmax; > 0 = float64 Gumbel-max (LLaDA) / sampling (Dream)
    # LLaDA host
    remasking: Remasking = "low_confidence"
    cfg_scale: float = 0.0            # classifier-free guidance; 0 = off
    logits_eos_inf: bool = False      # forbid EOS by setting its logit to -inf
    confidence_eos_eot_inf: bool = False  # EOS/EoT get zero confidence (committed last)
    # Dream host
    alg: DreamAlg = "maskgit_plus"
    alg_temp: float = 0.0             # > 0 samples the k positions instead of taking the top k
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3                 # Dream's schedule floor: ts = linspace(1, eps, steps + 1)
    # Commit rule
    rule: Rule = "full"
    thresholds: tuple[float, float, float] = PRESETS["default"]
    # how progress p picks the threshold: "exact" p = steps consumed / steps, cut at exact thirds;
    # "reference" Prophet's generate_earlyexit, p = (step index + 1) / steps, cut at 0.33 and 0.67
    progress: Progress = "exact"
    region: Region = "window"         # anchor window, still-masked positions of the window, or of the block
    statistic: Statistic = "mean"     # how per-position gaps pool into one number
    quantile: float = 0.1             # used when statistic == "quantile"
    anchor_ids: tuple[int, ...] = ()  # answer-anchor tokens written into the canvas (region "anchor")
    anchor_offset: int | None = None  # window position of the anchor; None = as late as fits
    answer_window: int = 5            # monitored positions after the anchor
    # confidence_threshold: commit where p > confidence; None = the host's default (0.9; block 0.95)
    confidence: float | None = None
    # Prophet's normal update: the host's schedule ('none') or a parallel rule on top (a step may
    # both commit by the rule and, when the gap clears, fill the rest)
    parallel: Parallel = "none"
    # Block host (block-causal models, SPEC 8)
    lookahead: int = 0                # mask blocks forwarded after the current one (Prophet watches and fills them)
    # LLaDA2.1 editing: rewrite committed positions whose prediction changed, with p > this; None = off
    editing_threshold: float | None = None
    max_post_steps: int = 16          # editing: passes after a block's last mask while an edit still fires
    sub_block: int | None = None      # commit only inside the block's first sub-block of this many positions that
                                      # still holds a mask (Fast-dLLM v2's decoder: 8); None = the whole block
    # Batching
    batch_size: int = 32              # slots in the forward pass
    continuous: bool = True           # refill freed slots; False leaves finished rows frozen in the batch

    def __post_init__(self) -> None:
        _check_literals(self)
        _positive(self, "gen_length", "steps", "batch_size", "answer_window")
        if self.steps > self.gen_length:
            raise ConfigError(f"steps={self.steps} exceeds gen_length={self.gen_length}: "
                              "a step commits at least one token; lower steps")
        if self.block_length is not None:
            _positive(self, "block_length")
            if self.gen_length % self.block_length:
                raise ConfigError(f"gen_length={self.gen_length} is not a multiple of block_length="
                                  f"{self.block_length}: choose a block_length that divides gen_length")
            if self.steps % (self.gen_length // self.block_length):
                nb = self.gen_length // self.block_length
                raise ConfigError(f"steps={self.steps} is not a multiple of the number of blocks ({nb} = "
                                  "gen_length / block_length): choose steps divisible by it")
        if self.cache_refresh_every is not None:
            _positive(self, "cache_refresh_every")
        th = tuple(float(t) for t in self.thresholds)
        if len(th) != 3 or not all(math.isfinite(t) for t in th):
            raise ConfigError(f"thresholds={self.thresholds!r}: give three finite numbers (high, mid, low)")
        if not th[0] >= th[1] >= th[2]:
            raise ConfigError(f"thresholds={th} must be non-increasing (high >= mid >= low): reorder them")
        object.__setattr__(self, "thresholds", th)
        object.__setattr__(self, "anchor_ids", tuple(int(t) for t in self.anchor_ids))
        if self.temperature < 0 or self.alg_temp < 0 or self.cfg_scale < 0:
            raise ConfigError("temperature, alg_temp and cfg_scale must be >= 0")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps={self.eps} must lie in (0, 1)")
        if not 0.0 <= self.quantile <= 1.0:
            raise ConfigError(f"quantile={self.quantile} must lie in [0, 1]")
        if self.confidence is None:
            object.__setattr__(self, "confidence", DEFAULT_CONFIDENCE[self.host])
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence={self.confidence} must lie in (0, 1)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1")
        _check_block_host(self)
        if self.region == "anchor" and not self.anchor_ids:
            raise ConfigError("region='anchor' needs anchor_ids (the anchor text's token ids); "
                              "or choose region 'window' or 'block'")
        if self.anchor_ids:
            # anchor, one free slot, then the monitored answer window (that part only for region 'anchor')
            need = len(self.anchor_ids) + (1 + self.answer_window if self.region == "anchor" else 0)
            start = self.anchor_start
            if start < 0 or start + need > self.gen_length or len(self.anchor_ids) >= self.gen_length:
                raise ConfigError(f"anchor of {len(self.anchor_ids)} tokens at offset {start} with answer_window="
                                  f"{self.answer_window} does not fit in gen_length={self.gen_length} and leave a "
                                  "position to generate: shorten the anchor, lower answer_window/anchor_offset "
                                  "or raise gen_length")

    @property
    def num_blocks(self) -> int:
        """LLaDA blocks in the window (1 for Dream)."""
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def anchor_start(self) -> int:
        """Window position where the anchor tokens go."""
        if self.anchor_offset is not None:
            return self.anchor_offset
        return self.gen_length - len(self.anchor_ids) - 1 - self.answer_window

    def with_calibration(self, path: str | Path) -> "DecodeConfig":
        """This config with the rule, thresholds, region and statistic of a calibration file."""
        data = json.loads(Path(path).read_text())
        allowed = {"rule", "thresholds", "region", "statistic", "quantile", "confidence", "parallel"}
        unknown = set(data.get("decode", {})) - allowed
        if "decode" not in data or unknown:
            raise ConfigError(f"{path}: a calibration file holds {{'decode': {{...}}}} with keys "
                              f"{sorted(allowed)}; unknown: {sorted(unknown)}")
        check_calibrated_with(self, data.get("calibrated_with"), path)
        upd = dict(data["decode"])
        if "thresholds" in upd:
            upd["thresholds"] = tuple(upd["thresholds"])
        return replace(self, **upd)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for manifests and hashes)."""
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        d["anchor_ids"] = list(self.anchor_ids)
        return d


# What a calibration's thresholds mean: the gap is read on these windows, at this step progress of
# this step budget, in these blocks, on this host's schedule. Thresholds fitted under other values
# are numbers for another quantity: refused.
MEANING_FIELDS = ("host", "gen_length", "steps", "block_length", "progress")
# The path the canvas takes: which token is drawn and which position commits next. The gap is still
# read on the raw logits (before any Gumbel noise or reordering), so the thresholds keep their
# meaning; only the accuracy and steps the calibration measured may not carry over: warned.
PATH_FIELDS = ("temperature", "remasking", "alg", "confidence_eos_eot_inf")


class CalibrationWarning(UserWarning):
    """A calibration is used on another sampling path than the one it was measured on."""


def check_calibrated_with(cfg: DecodeConfig, fitted: dict | None, path: str | Path) -> None:
    """Refuse thresholds fitted under settings that change what they mean (MEANING_FIELDS, or any
    recorded field not in PATH_FIELDS), ConfigError naming them; warn (CalibrationWarning) where
    only the path differs (PATH_FIELDS). LLaDA's remasking counts only for the LLaDA host, Dream's
    alg only for Dream; a file without `progress` was fitted with "exact"."""
    if not fitted:
        return
    fitted = {"progress": "exact", **fitted}
    skip = {"llada": {"alg"}, "dream": {"remasking"}, "block": {"alg", "remasking"}}[cfg.host]
    differ = {k: f"{k} (calibrated {v!r}, here {getattr(cfg, k)!r})" for k, v in fitted.items()
              if k not in skip and hasattr(cfg, k) and getattr(cfg, k) != v}
    refused = [d for k, d in differ.items() if k not in PATH_FIELDS]
    if refused:
        raise ConfigError(f"{path} was calibrated under other settings: {'; '.join(refused)}. Decode with the "
                          "calibrated settings, recalibrate (jobs/calibrate.py), or pass thresholds explicitly")
    if differ:
        warnings.warn(f"{path} was calibrated on another sampling path: {'; '.join(differ.values())}. Its "
                      "thresholds keep their meaning (the gap is read on the logits before sampling), but the "
                      "accuracy and steps it measured were not measured here; to fit them on this path, "
                      "recalibrate with these settings (jobs/calibrate.py --temperature), or pass thresholds "
                      "explicitly", CalibrationWarning, stacklevel=3)


def _check_block_host(cfg: DecodeConfig) -> None:
    """Fields that belong to one host only are refused on the others, with the fix."""
    if cfg.host != "block":
        if cfg.lookahead or cfg.editing_threshold is not None or cfg.sub_block is not None:
            raise ConfigError(f"lookahead / editing_threshold / sub_block apply to host 'block' (block-diffusion "
                              f"models); host={cfg.host!r}: leave them unset")
        return
    if cfg.sub_block is not None:
        _positive(cfg, "sub_block")
        if cfg.block_length is not None and cfg.block_length % cfg.sub_block:
            raise ConfigError(f"sub_block={cfg.sub_block} does not divide block_length={cfg.block_length}: "
                              "choose a sub_block that divides the model's attention block")
    if cfg.cache != "none" or cfg.cache_refresh_every is not None:
        raise ConfigError("host 'block' always decodes on its exact block cache: leave cache and "
                          "cache_refresh_every unset (they choose the approximate caches of bidirectional hosts)")
    if cfg.cfg_scale > 0 or cfg.logits_eos_inf or cfg.confidence_eos_eot_inf:
        raise ConfigError("host 'block' has no classifier-free guidance and no EOS demotion (LLaDA options): "
                          "leave cfg_scale, logits_eos_inf and confidence_eos_eot_inf unset")
    if "gap_parallel" in (cfg.rule, cfg.parallel):
        raise ConfigError("host 'block' offers rules 'full', 'confidence_threshold' and 'prophet' (with parallel "
                          "'none' or 'confidence_threshold'); gap_parallel is for hosts llada/dream")
    if not isinstance(cfg.lookahead, int) or cfg.lookahead < 0:
        raise ConfigError(f"lookahead={cfg.lookahead!r} must be an integer >= 0")
    if cfg.editing_threshold is not None and not 0.0 < cfg.editing_threshold < 1.0:
        raise ConfigError(f"editing_threshold={cfg.editing_threshold} must lie in (0, 1), or be unset (no editing)")
    if not isinstance(cfg.max_post_steps, int) or cfg.max_post_steps < 0:
        raise ConfigError(f"max_post_steps={cfg.max_post_steps!r} must be an integer >= 0")


def _check_literals(cfg: DecodeConfig) -> None:
    hints = {"host": Host, "remasking": Remasking, "alg": DreamAlg, "rule": Rule, "parallel": Parallel,
             "region": Region, "statistic": Statistic, "cache": Cache, "progress": Progress}
    for name, lit in hints.items():
        value, choices = getattr(cfg, name), get_args(lit)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def _positive(cfg: DecodeConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
