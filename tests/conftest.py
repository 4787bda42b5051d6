"""Shared fixtures: one local Ray for the whole session, a tiny model directory, task prompts.

Ray start-up costs seconds and every actor pool costs more, so all tests that need Ray share the
`ray_local` session fixture (4 logical CPUs on any machine: actors take fractions, read/write
tasks always find a CPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_LLADA = ROOT / "checkpoints" / "tiny-llada"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy credentials for the local S3 test server (tests/test_storage_s3.py), set before any Ray starts
# so its workers inherit them; they never reach AWS (every S3 test names a 127.0.0.1 endpoint).
for _key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_key, "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (4 logical CPUs, no dashboard) shared by every test of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The shipped tiny LLaDA when it is there, else a random-init tiny LLaDA saved the same way."""
    if _has_weights(SHIPPED_LLADA):
        return SHIPPED_LLADA
    from benchmarks.throughput import random_tiny_llada

    return random_tiny_llada(tmp_path_factory.mktemp("models") / "rand-llada")


@pytest.fixture(scope="session")
def task_rows() -> list[dict]:
    """40 held-out sudoku4 prompts with their answers (the kind of rows the default job holds)."""
    from prophet.tasks import get_task

    task = get_task("sudoku4")
    return [{"prompt": ex.prompt, "answer": ex.answer, "task": task.name}
            for ex in task.examples("test", 40, seed=1)]

