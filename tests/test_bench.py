"""jobs/bench.py and benchmarks/throughput.py: the steady-rate arithmetic exactly, and both sections
run end to end on small inputs (the figures themselves live in BENCHMARKS.md, never asserted)."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from benchmarks.throughput import steady_rate
from tiny_support import load_job, one_thread  # noqa: F401 (one_thread is an autouse fixture)


def test_steady_rate_counts_rows_inside_the_window_where_every_worker_produces():
    # worker a finishes rows at 0..10, worker b at 2..8: the window is (2, 8]
    a = [float(t) for t in range(0, 11)]
    b = [2.0, 4.0, 6.0, 8.0]
    table = pa.table({"worker_id": ["a"] * len(a) + ["b"] * len(b), "finished_at": a + b})
    rate, window = steady_rate(table)
    inside = sum(2 < t <= 8 for t in a + b)  # a: 3..8 (6 rows), b: 4, 6, 8 (3 rows)
    assert window == 6.0
    assert rate == pytest.approx(inside / 6.0) == pytest.approx(9 / 6)


def test_steady_rate_falls_back_to_the_whole_span_when_windows_do_not_overlap():
    table = pa.table({"worker_id": ["a", "a", "b", "b"], "finished_at": [0.0, 1.0, 5.0, 9.0]})
    rate, window = steady_rate(table)
    assert window == 9.0
    assert rate == pytest.approx(3 / 9)  # rows after the start (0.0 excluded) over the span


def test_interleaved_runs_cases_in_turn_keeping_the_best_time_and_last_result():
    from benchmarks.harness import interleaved

    calls = []
    runs = interleaved({"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or len(calls)}, 3)
    assert calls == ["a", "b"] * 3  # interleaved, so load from other processes hits both alike
    assert (runs["a"].result, runs["b"].result) == (5, 6)
    assert all(0 <= t.wall_s < 1 and 0 <= t.cpu_s < 1 for t in runs.values())


def test_table_aligns_titles_as_their_cells_and_prints_none_as_a_dash():
    from benchmarks.harness import Table

    t = Table(("mode", "<6"), ("n", ">3"), ("s", "6.2f"))
    assert t.header() == "  mode     n      s"
    assert t.row("cont", 12, 1.5) == "  cont    12   1.50"
    assert t.row("b1", 3, None) == "  b1       3      -"
    with pytest.raises(ValueError):
        t.row("too", "few")


def test_bench_batching_section_runs_and_reports_every_mode():
    bench = load_job("bench")
    out = bench.main(["--section", "batching", "--prompts", "12", "--batch1-prompts", "3", "--repeats", "1",
                      "--batch-size", "4"])["batching"]
    assert set(out["modes"]) == {"continuous", "frozen", "batch1"}
    for mode in out["modes"].values():
        assert mode["step_speedup"] >= 1.0  # prophet never uses more steps than full
        assert mode["wall_full_s"] > 0 and mode["wall_prophet_s"] > 0
        assert mode["forward_rows_prophet"] <= mode["forward_rows_full"]
    assert out["wall_over_steps_ratio"] == out["modes"]["continuous"]["ratio"]


def test_bench_pipeline_section_decodes_every_row_through_ray(ray_local):
    bench = load_job("bench")
    out = bench.main(["--section", "pipeline", "--pipeline-prompts", "48", "--pipeline-batch-size", "8"])["pipeline"]
    assert out["rows"] == out["ok"] == 48
    assert out["bare_rows"] == 48 and out["actors"] == 2
    assert out["pipeline_rows_per_s"] > 0 and out["bare_rows_per_s"] > 0
    assert math.isclose(out["ratio"], out["pipeline_rows_per_s"] / out["bare_rows_per_s"], rel_tol=0.01)
    assert out["startup_s"] < out["wall_s"]


@pytest.mark.parametrize("kv_heads,keep", [(None, 0), (2, 5)])
def test_forward_flops_formula_matches_torchs_flop_counter(kv_heads, keep):
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.forward import TINY, forward_flops, random_llada

    cfg = dataclasses.replace(TINY, n_kv_heads=kv_heads)
    model = random_llada(cfg, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(ids, None, logits_to_keep=keep)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = 4 * 3 * 24 * 24 * cfg.d_model * cfg.n_layers  # QK^T and AV; CPU's SDPA kernel is not counted
    assert counts.pop("aten.mm") == forward_flops(cfg, 3, 24, keep) - attention  # every linear layer, exactly
    assert sum(counts.values()) in (0, attention)


def test_llada_8b_config_costs_about_15_gflop_per_position():
    from benchmarks.forward import MODELS, forward_flops

    per_token = forward_flops(MODELS["llada-8b"], 1, 1) / 1e9  # no attention term at length 1
    assert 14.5 < per_token < 15.5  # SPEC: about 15 GFLOP per position


def test_bench_forward_section_runs_the_tiny_model_on_cpu():
    bench = load_job("bench")
    out = bench.main(["--section", "forward", "--forward-model", "tiny", "--forward-shapes", "2x16,1x32",
                      "--peak-n", "128", "--repeats", "1", "--device", "cpu"])["forward"]
    assert [(r["batch"], r["seq"]) for r in out["shapes"]] == [(2, 16), (1, 32)]
    for r in out["shapes"]:
        assert r["seconds"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / out["matmul_peak_tflops"])
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--section", "forward", "--device", "cpu"])


def test_bench_cache_section_counts_the_positions_each_cache_runs():
    bench = load_job("bench")
    out = bench.main(["--section", "cache", "--repeats", "1", "--cache-prompt", "8", "--cache-window", "16",
                      "--cache-block", "4", "--cache-slots", "2", "--cache-vocab", "64"])["cache"]
    assert {(c["rule"], c["cache"]) for c in out["cases"]} == {(r, c) for r in ("full", "confidence_threshold",
                                                                                 "prophet")
                                                                for c in ("none", "prefix", "dual")}
    # Full, one step per position, 4 blocks of 4: none runs 24 positions a step; prefix a refresh
    # (24) then 3 steps of 16 - 4b positions; dual a refresh then 3 steps of the block's 4
    assert out["prefix_token_ratio"] == (4 * 24 + 3 * (16 + 12 + 8 + 4)) / (16 * 24)
    assert out["dual_token_ratio"] == (4 * 24 + 3 * 4 * 4) / (16 * 24)
    assert 0 < out["dual_wall_ratio"] and 0 < out["prefix_wall_ratio"]


GPU_TINY = ["--section", "gpu", "--gpu-model", "tiny", "--gpu-prompt", "8", "--gpu-window", "16", "--gpu-block", "8",
            "--gpu-steps", "4", "--gpu-slots", "2", "--forward-shapes", "1x16", "--repeats", "1",
            "--gpu-llada2-rows", "2,4", "--gpu-llada2-prefix", "16", "--gpu-llada2-window", "16",
            "--gpu-llada2-slots", "2"]


def test_bench_gpu_section_runs_the_tiny_models_on_cpu():
    out = load_job("bench").main(GPU_TINY)["gpu"]
    assert len(out["decode"]) == 9 and all(r["forward_tokens"] > 0 for r in out["decode"])
    by = {(r["cache"], r["rule"]): r for r in out["decode"]}
    assert by["dual", "full"]["forward_tokens"] < by["prefix", "full"]["forward_tokens"] < \
        by["none", "full"]["forward_tokens"]
    families = out["block_families"]  # SDAR and Fast-dLLM v2 shapes, tiny here: a block pass and two decodes each
    assert [(r["family"], r["rule"]) for r in families] == [(f, r) for f in ("sdar-tiny", "fast-dllm-tiny")
                                                            for r in ("full", "confidence_threshold")]
    assert all(r["pass_ms"] > 0 and r["tokens_per_s"] > 0 for r in families)
    # LLaDA2 (tiny: 2 layers, the first dense, blocks of 8): one block after a 16-position cache,
    # the one MoE layer timed alone on that forward's hidden states
    two = out["llada2"]
    assert [(f["rows"], f["positions"], f["prefix"], f["moe_layers"]) for f in two["forward"]] == [(2, 8, 16, 1),
                                                                                               (4, 8, 16, 1)]
    assert all(f["seconds"] > 0 and f["moe_seconds"] > 0 for f in two["forward"])
    # block host, prompt 16 = 2 whole blocks, window 16 = 2 blocks of 8 steps: a prefill (16 positions),
    # 16 one-block passes and one store pass per row; random weights never clear a threshold
    assert [(r["cache"], r["rule"]) for r in two["decode"]] == [("exact", "full"), ("exact", "confidence_threshold"),
                                                                ("exact", "prophet")]
    for r in two["decode"]:
        assert r["mean_steps"] == 1 + 16 + 1 and r["forward_tokens"] == 2 * (16 + 16 * 8 + 8)
    if torch.cuda.device_count() < 2:  # the tp check says plainly why it did not run
        assert out["tp"] == {"skipped": "tensor parallelism needs 2 GPUs on one machine; this one has "
                                        f"{torch.cuda.device_count()}"}


def test_bench_gpu_section_starts_no_decode_once_its_budget_is_spent():
    out = load_job("bench").main(GPU_TINY + ["--gpu-budget-s", "0"])["gpu"]
    assert [r.get("skipped") for r in out["decode"] + out["llada2"]["decode"]] == ["time budget spent"] * 12
    assert len(out["llada2"]["forward"]) == 2  # the forwards are measured regardless


def test_bench_gpu_tp_check_gives_tp1s_tokens_on_two_gloo_ranks_and_starts_nothing_past_its_budget(capsys):
    from benchmarks import gpu

    bench = load_job("bench")
    small = GPU_TINY + ["--gpu-tp-backend", "gloo", "--gpu-tp-prompt", "8", "--gpu-tp-window", "16",
                        "--gpu-tp-steps", "8", "--gpu-tp-block", "8", "--gpu-tp-slots", "2"]
    out = gpu.tp_check(bench.parse_args(small))  # the GPU's NCCL path, on CPU ranks (random fp32 tiny LLaDA)
    assert (out["backend"], out["world"], out["dtype"]) == ("gloo", 2, "float32")
    assert out["tokens_equal"] and out["token_agreement"] == 1.0
    assert out["tp1_tokens_per_s"] == pytest.approx(2 * 16 / out["tp1_s"])
    assert out["tp_tokens_per_s"] == pytest.approx(2 * 16 / out["tp_s"])
    assert "tokens at tp 2 equal tp 1's: yes" in capsys.readouterr().out
    assert gpu.tp_check(bench.parse_args(small + ["--gpu-tp-s", "0"])) == {"skipped": "time budget spent"}
    assert "tp check skipped: time budget spent" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without a GPU")
def test_bench_gpu_section_refuses_llada_8b_without_a_gpu():
    with pytest.raises(SystemExit, match="GPU"):
        load_job("bench").main(["--section", "gpu"])


def test_bench_memory_section_measures_every_host_temperature_and_rule():
    # small shapes: the child process, VmHWM reset and table run for real; the target is checked
    # at the real vocabulary by the benchmark, not here
    out = load_job("bench").main(["--section", "memory", "--memory-rows", "2", "--memory-window", "32",
                                  "--memory-steps", "2", "--memory-vocab", "1024"])["memory"]
    cases = {(c["host"], c["temperature"], c["rule"]) for c in out["cases"]}
    assert cases == {(h, t, r) for h in ("llada", "dream") for t in (0.0, 0.7) for r in ("full", "prophet")}
    assert out["logits_mb"] == 2 * 32 * 1024 * 2 / 2**20
    assert all(c["peak_mb"] > 0 for c in out["cases"])
    assert out["peak_over_logits"] == max(c["peak_over_logits"] for c in out["cases"])


def test_bench_block_section_counts_prefill_blocks_and_stores_against_recomputing():
    bench = load_job("bench")
    out = bench.main(["--section", "block", "--repeats", "1", "--block-prompt", "8", "--block-window", "16",
                      "--block-block", "4", "--block-slots", "2", "--block-vocab", "64"])["block"]
    assert {(c["rule"], c["way"]) for c in out["cases"]} == {
        (r, w) for r in ("full", "confidence_threshold", "prophet", "prophet+lookahead1") for w in ("cache", "ref")}
    # prompt 8 = 2 whole blocks of 4, window 16 = 4 blocks of 4 steps: the cache runs a prefill (8),
    # 16 passes of one block and 3 store passes (4 each); the reference recomputes 12, 16, 20, 24 positions
    assert out["cache_token_ratio"] == (8 + 16 * 4 + 3 * 4) / (4 * (12 + 16 + 20 + 24))
    assert out["lookahead_token_ratio"] > 1 and out["cache_wall_ratio"] > 0


def test_bench_tp_section_reduces_twice_per_layer_and_keeps_tp1s_tokens():
    out = load_job("bench").main(["--section", "tp", "--repeats", "1", "--tp-window", "16", "--tp-slots", "2"])["tp"]
    assert [(c["model"], c["cache"]) for c in out["cases"]] == [("tiny-llada", "none"), ("tiny-llada", "prefix"),
                                                                ("tiny-llada", "dual"), ("tiny-llada2", "exact")]
    assert out["tokens_equal"] and all(c["tokens_equal"] for c in out["cases"])
    for c in out["cases"]:
        assert c["tp1_wall_s"] > 0 and c["tp2_over_tp1"] == pytest.approx(c["tp2_wall_s"] / c["tp1_wall_s"])
        assert 0 < c["allreduce_share"] < 1 and 0 < c["allreduce_share_rank1"] < 1
    by = {c["cache"]: c for c in out["cases"]}
    # tiny-llada (4 layers, width 128, LLaDA's output head whole): one fp32 (rows, positions, 128) all-reduce after
    # the attention and one after the MLP of every layer; window 16 = 16 forwards, without a cache over the
    # whole padded sequence
    from benchmarks.harness import TINY_LLADA
    from benchmarks.tp import default_job_prompts
    from prophet.models import load_model

    longest = max(len(load_model(TINY_LLADA).encode(p)) for p in default_job_prompts(2))
    assert all(by[cache]["allreduces"] == 16 * 2 * 4 for cache in ("none", "prefix", "dual"))
    assert by["none"]["bytes_reduced"] == 16 * 2 * (longest + 16) * 128 * 4 * 2 * 4
    assert by["dual"]["bytes_reduced"] < by["prefix"]["bytes_reduced"] < by["none"]["bytes_reduced"]
    # tiny-llada2 reduces its untied lm_head too: 9 per forward (the block host's prefill, block passes, stores)
    assert by["exact"]["allreduces"] % (2 * 4 + 1) == 0 and by["exact"]["allreduces"] > 0
    with pytest.raises(SystemExit, match="unknown tiny-nope"):
        load_job("bench").main(["--section", "tp", "--tp-models", "tiny-llada,tiny-nope"])
