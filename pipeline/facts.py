"""What the driver learns of a model directory before any weights are read: its family's host, the
anchor's token ids, a fingerprint of its files. Used by the decode stage's plan (pipeline.stage) and
so by the job (pipeline.run), which builds on the stage."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import JobConfig, JobConfigError

if TYPE_CHECKING:
    from pipeline.stage import StageConfig


def model_facts(cfg: StageConfig | JobConfig) -> tuple[str, tuple[int, ...]]:
    """(the family's default host, the anchor's token ids); the whole directory is checked, weights unread."""
    from prophet.models import ModelLoadError, Tokenizer
    from prophet.models.hf import check_remote_code
    from prophet.models.loading import check_model_dir, native_family, read_config

    m = cfg.model
    try:
        check_remote_code(m.trust_remote_code, m.revision)
    except ModelLoadError as e:
        raise JobConfigError(f"model.revision: {e}") from None
    try:
        check_model_dir(m.dir, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code, revision=m.revision)
        family = native_family(read_config(Path(cfg.model.dir)))
        host = family[0].default_host if family else "llada"
        anchor = cfg.decoding.anchor
        ids = tuple(Tokenizer.from_dir(cfg.model.dir).encode(anchor)) if anchor is not None else ()
    except ModelLoadError as e:
        raise JobConfigError(f"model.dir: {e}") from None
    if anchor is not None and not ids:
        raise JobConfigError(f"decoding.anchor: {anchor!r} has no tokens in this model's tokenizer")
    return host, ids


def model_fingerprint(model_dir: str, sample: int = 1 << 20) -> str:
    """Hash of the model directory's files: names, sizes, and the first and last MiB of each.

    Retrained weights keep their sizes but change everywhere, so the samples tell them apart;
    reading all of an 8B model's 16 GB would cost more than the check is worth.
    """
    digest = hashlib.sha256()
    for p in sorted(q for q in Path(model_dir).iterdir() if q.is_file()):
        size = p.stat().st_size
        digest.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            digest.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]
