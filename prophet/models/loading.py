"""Load and save Hugging Face style model directories safely.

A directory holds config.json, weights (model.safetensors, or model-0000x-of-0000y.safetensors
shards with model.safetensors.index.json) and tokenizer files. The family comes from config.json,
never from the path. Native weights are read shard by shard straight onto the target device and
dtype and assigned into a module built on the meta device, so no second full copy exists.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prophet.models.adapter import NativeAdapter
from prophet.models.dream import DreamConfig, DreamModel, FastDLLMConfig
from prophet.models.errors import ModelLoadError
from prophet.models.family import FamilyConfig
from prophet.models.hf import check_remote_code, is_masked_lm_config, load_masked_lm
from prophet.models.llada import LLaDAConfig, LLaDAModel
from prophet.models.llada2 import LLaDA2Config, LLaDA2Model
from prophet.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from prophet.models.sdar import SDARConfig, SDARModel, SDARMoeConfig
from prophet.models.tokenizer import (CHAT_TEMPLATE_FILE, MERGES_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
                                      VOCAB_FILE, Tokenizer)
from prophet.types import TextDLM

CONFIG_FILE = "config.json"
SAFE_FILE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickles that are never weights (the HF Trainer writes its arguments next to the model).
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
# Buffers some checkpoints carry that the native modules recompute; skipped, not reported.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

NATIVE_FAMILIES: tuple[tuple[type[FamilyConfig], type[nn.Module]], ...] = (
    (LLaDAConfig, LLaDAModel),
    (DreamConfig, DreamModel),
    (LLaDA2Config, LLaDA2Model),
    (SDARConfig, SDARModel),
    (SDARMoeConfig, SDARModel),
    (FastDLLMConfig, DreamModel),
    (LLaDAMoEConfig, LLaDAMoEModel),
)

# Published model types named by the project's users that no native module implements, and why.
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {}


@dataclass
class WeightFiles:
    """Where a directory's tensors are: kind "safetensors" or "pickle", and file -> tensor names."""

    kind: str
    shards: dict[Path, list[str] | None]  # names known from the index; None = read from the file


def read_config(path: Path) -> dict:
    """config.json of a model directory as a dict."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelLoadError(f"missing {file}: a model directory needs config.json")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({e})") from None


def native_family(raw: dict) -> tuple[type[FamilyConfig], type[nn.Module]] | None:
    """(config class, module class) of the native family config.json names, or None.

    A listed architecture decides first (one model_type may cover several families: "llada" is dense
    LLaDA and LLaDA-MoE); then the model_type, which refuses an architecture none implements."""
    listed = raw.get("architectures") or []
    by_name = next(((c, m) for c, m in NATIVE_FAMILIES if any(a in c.architectures for a in listed)), None)
    return by_name or next(((c, m) for c, m in NATIVE_FAMILIES if c.matches(raw)), None)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               revision: str | None = None, block_length: int | None = None) -> TextDLM:
    """Load a model directory as a TextDLM: a native family, else a transformers masked LM.

    block_length: the attention block of a block-diffusion family (LLaDA2, SDAR, Fast-dLLM v2), for a checkpoint trained
    with another than the one its config.json (or the family) names; refused for other families.
    """
    check_remote_code(trust_remote_code, revision)
    path = Path(path)
    raw = read_config(path)
    family = _family_or_masked_lm(path, raw, trust_remote_code)
    if family is None:
        find_weights(path, allow_pickle)  # refuses pickles before transformers sees them
        return load_masked_lm(path, device, dtype, trust_remote_code=trust_remote_code, revision=revision)
    config_cls, module_cls = family
    tokenizer = Tokenizer.from_dir(path)  # before the weights: fail fast on a missing file
    config = config_cls.from_dict(raw)
    if block_length is not None:
        _check_block_length(config, block_length)
    module = load_native_module(path, config, module_cls, torch.device(device), dtype, allow_pickle)
    if block_length is not None:
        module.block_length = block_length
    return NativeAdapter(module, tokenizer, name=raw.get("_name_or_path") or path.resolve().name)


def _check_block_length(config: FamilyConfig, block_length: int) -> None:
    """Refuse a block_length for a bidirectional family, or one that is not positive."""
    if getattr(config, "default_block_length", None) is None:
        blocky = sorted({c.family for c, _ in NATIVE_FAMILIES if getattr(c, "default_block_length", None)})
        raise ModelLoadError(f"block_length={block_length} was given, but {config.family} attention is "
                             f"bidirectional: only block-diffusion families ({', '.join(blocky)}) take a block_length")
    if int(block_length) < 1:
        raise ModelLoadError(f"block_length must be positive (got {block_length})")


def load_native_module(path: Path, config: FamilyConfig, module_cls: type[nn.Module], device: torch.device,
                       dtype: torch.dtype, allow_pickle: bool = False) -> nn.Module:
    """Build the module on the meta device and assign the directory's weights (device, dtype)."""
    with torch.device("meta"):
        module = module_cls(config)
    expected = _shapes(module)
    weights = find_weights(path, allow_pickle)
    if weights.kind == "safetensors":
        check_tensors(safetensors_shapes(weights), expected)
        state = dict(read_safetensors(weights, set(expected), device, dtype))
    else:
        state = read_pickles(weights, device, dtype)
        check_tensors({k: tuple(v.shape) for k, v in state.items()}, expected)
        state = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def check_model_dir(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                    revision: str | None = None) -> None:
    """Everything load_model checks before reading weight data: options, config, tokenizer, files, shapes.

    Cheap (headers only, the module is built on the meta device), so a job can refuse a broken
    directory before it starts workers that would each fail to load it.
    """
    check_remote_code(trust_remote_code, revision)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"no such model directory {path}")
    raw = read_config(path)
    family = _family_or_masked_lm(path, raw, trust_remote_code)
    weights = find_weights(path, allow_pickle)
    if family is None:
        return
    config_cls, module_cls = family
    config = config_cls.from_dict(raw)  # refuses unsupported features and special ids outside the vocabulary
    Tokenizer.from_dir(path)
    if weights.kind == "safetensors":  # pickles cannot be inspected without unpickling them
        with torch.device("meta"):
            module = module_cls(config)
        check_tensors(safetensors_shapes(weights), _shapes(module))


def _family_or_masked_lm(path: Path, raw: dict, trust_remote_code: bool
                         ) -> tuple[type[FamilyConfig], type[nn.Module]] | None:
    """The native family of config.json, None for a transformers masked LM, else ModelLoadError."""
    family = native_family(raw)
    why = UNSUPPORTED_MODEL_TYPES.get(str(raw.get("model_type", "")).lower())
    if family is None and why:
        raise ModelLoadError(f"{path / CONFIG_FILE}: model_type {raw.get('model_type')!r} (architectures "
                             f"{raw.get('architectures')}): {why}. Supported architectures: "
                             f"{', '.join(a for c, _ in NATIVE_FAMILIES for a in c.architectures)}")
    if family is not None or is_masked_lm_config(raw, trust_remote_code):
        return family
    raise ModelLoadError(f"{path / CONFIG_FILE}: unknown model_type {raw.get('model_type')!r} "
                         f"(architectures {raw.get('architectures')}): not a native family "
                         f"({', '.join(c.model_type for c, _ in NATIVE_FAMILIES)}) nor a "
                         "transformers AutoModelForMaskedLM architecture")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def find_weights(path: Path, allow_pickle: bool) -> WeightFiles:
    """Locate the weight files; pickles only with allow_pickle, and only where no safetensors exist."""
    safe = _indexed_files(path, SAFE_INDEX) or ({path / SAFE_FILE: None} if (path / SAFE_FILE).is_file() else None)
    if safe:
        return WeightFiles("safetensors", safe)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS)
    if not pickles:
        raise ModelLoadError(f"no weights in {path}: expected {SAFE_FILE} or {SAFE_INDEX} with its shards")
    names = ", ".join(p.name for p in pickles)
    if not allow_pickle:
        raise ModelLoadError(f"{path} holds only pickled checkpoints ({names}); loading a pickle can run "
                             "code, so it is refused. Convert to safetensors, or pass allow_pickle=True "
                             "to load it with torch.load(weights_only=True)")
    indexed = _indexed_files(path, PICKLE_INDEX)
    if indexed:
        return WeightFiles("pickle", indexed)
    if (path / PICKLE_FILE).is_file() or len(pickles) == 1:
        return WeightFiles("pickle", {(path / PICKLE_FILE) if (path / PICKLE_FILE).is_file() else pickles[0]: None})
    raise ModelLoadError(f"{path}: several pickled files ({names}) and no {PICKLE_INDEX}: cannot tell which "
                         "holds the weights")


def _indexed_files(path: Path, index_name: str) -> dict[Path, list[str] | None] | None:
    """Shard file -> tensor names from an index json; every listed shard must exist."""
    index = path / index_name
    if not index.is_file():
        return None
    shards: dict[Path, list[str] | None] = {}
    for name, file in json.loads(index.read_text())["weight_map"].items():
        shards.setdefault(path / file, []).append(name)  # type: ignore[union-attr]
    for file in shards:
        if not file.is_file():
            raise ModelLoadError(f"missing shard file {file} (listed in {index})")
    return shards


def safetensors_shapes(weights: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers, without reading any data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in weights.shards.items():
        try:
            f = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
            raise ModelLoadError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        with f:
            present = set(f.keys())
            for name in names if names is not None else sorted(present):
                if name not in present:
                    raise ModelLoadError(f"tensor {name} is listed in the index but missing from shard {file}")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor."""
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = [k for k in expected if k not in found]
    if missing:
        raise ModelLoadError(f"missing tensor {missing[0]} in the checkpoint ({len(missing)} missing in all)")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise ModelLoadError(f"unexpected tensor {unexpected[0]} in the checkpoint ({len(unexpected)} in all): "
                             "config.json does not describe these weights")
    for name, shape in expected.items():
        if found[name] != shape:
            raise ModelLoadError(f"wrong shape for tensor {name}: checkpoint has {list(found[name])}, "
                                 f"config.json implies {list(shape)}")


def read_safetensors(weights: WeightFiles, wanted: set[str], device: torch.device,
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard, each read onto device and then cast there."""
    for file in weights.shards:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in wanted:
                    yield name, f.get_tensor(name).to(dtype)


def read_pickles(weights: WeightFiles, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The opt-in path: torch.load(weights_only=True) file by file, cast on the device."""
    state: dict[str, torch.Tensor] = {}
    for file in weights.shards:
        try:
            loaded = torch.load(str(file), map_location=device, weights_only=True)
        except Exception as e:  # UnpicklingError for anything but plain tensors (code, custom classes)
            why = next((ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower()), type(e).__name__)
            raise ModelLoadError(f"{file} holds more than plain tensors and was refused, nothing in it ran "
                                 f"(torch.load(weights_only=True): {why})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ModelLoadError(f"{file} is not a flat state dict of tensors")
        state.update({k: v.to(dtype) for k, v in loaded.items()})
    return state


def save_model(module: nn.Module, tokenizer: Tokenizer | str | Path, out_dir: str | Path,
               max_shard_bytes: int | None = None, extra_config: dict | None = None) -> Path:
    """Write config.json, safetensors weights (sharded above max_shard_bytes) and tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    for stale in out.iterdir():  # an earlier save's layout would shadow or mix with this one
        if stale.name in (SAFE_FILE, SAFE_INDEX) or SHARD_PATTERN.fullmatch(stale.name):
            stale.unlink()
    shards = split_shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = SHARD_NAME.format(i, len(shards))
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {**module.config.to_dict(), "torch_dtype": dtype, **(extra_config or {})}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _save_tokenizer(tokenizer, out)
    return out


def split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _save_tokenizer(tokenizer: Tokenizer | str | Path, out: Path) -> None:
    """Write a Tokenizer, or copy tokenizer files from a tokenizer.json path or its directory."""
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(out)
        return
    src = Path(tokenizer)
    src_dir = src.parent if src.is_file() else src
    Tokenizer.from_dir(src_dir)  # refuses a directory without a loadable tokenizer, naming the files
    for name in (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        if (src_dir / name).is_file() and (src_dir / name).resolve() != (out / name).resolve():
            shutil.copyfile(src_dir / name, out / name)
