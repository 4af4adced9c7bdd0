"""The benchmark CLI's scan table at a tiny size: every method, finite figures, depths."""

import math

from deltamem_jax.memory import osam
from deltamem_jax.tools.bench import common as bench_common
from deltamem_jax.tools.bench import scan as bench


def test_scan_table_tiny():
    T, chunk = 16, 4                  # tiny: the cost is compiling 8 programs
    rows = bench.run_scan(T_list=[T], batch=2, rank=4, chunk_sizes=[chunk], repeats=1,
                          max_seconds=5.0)
    assert [r["method"] for r in rows] == list(bench.SCAN_METHODS)
    for r in rows:
        for kind in ("fwd", "fwd_bwd"):
            m = r[kind]
            assert "na" not in m, (r["method"], kind, m.get("na"))
            for key in ("ms", "loop_flops", "peak_bytes", "ratio_to_sequential"):
                assert math.isfinite(m[key]) and m[key] > 0, (r["method"], kind, key)
    by = {r["method"]: r for r in rows}
    assert by["auto"]["resolved"] == "sequential"                      # on CPU
    assert by["chunked"]["fwd"]["serial_depth"] == T // chunk
    assert by["sequential"]["fwd"]["serial_depth"] == T // osam.SEQUENTIAL_UNROLL
    assert by["associative"]["fwd"]["serial_depth"] == 1               # no loop
    assert by["sequential"]["fwd_bwd"]["ratio_to_sequential"] == 1.0
    # XLA counts a loop body once; the recount multiplies it by the trip count.
    assert by["sequential"]["fwd"]["loop_flops"] > 10 * by["sequential"]["fwd"]["flops"]

    table = bench.format_scan_markdown(rows, bench_common.machine_info(),
                                       {"batch": 2, "rank": 4, "repeats": 1})
    for label in ("auto → sequential", "| sequential |", "associative", "chunked (C=4)"):
        assert label in table
    assert "n/a" not in table


def test_scan_na_when_over_memory_budget():
    row = bench.bench_scan_case("sequential", 8, batch=1, rank=4, repeats=1, mem_budget=1)
    assert row["fwd"]["ms"] is None and "budget" in row["fwd"]["na"]
    assert "n/a (needs" in bench.format_scan_markdown(
        [row], bench_common.machine_info(), {"batch": 1, "rank": 4, "repeats": 1})


def test_cli_parses_scan_options():
    from deltamem_jax.tools.bench.__main__ import SUBCOMMANDS, build_parser
    args = build_parser().parse_args(
        ["scan", "--T", "128", "--methods", "sequential", "chunked", "--chunk-size", "8"])
    assert args.T == [128] and args.methods == ["sequential", "chunked"]
    assert args.chunk_size == [8] and "scan" in SUBCOMMANDS


def test_time_pair_reports_the_ratio_of_alternated_calls():
    import time
    sleeper = lambda sec: (lambda: time.sleep(sec))  # noqa: E731
    t = bench_common.time_pair(sleeper(0.02), (), sleeper(0.08), (), repeats=3)
    assert t["runs"] == 3 and t["a_ms"] >= 20 and t["b_ms"] >= 80
    assert 2.0 < t["ratio"] < 4.5       # 4, less whatever scheduling delay both share


def test_throughput_tiny(tmp_path):
    from deltamem_jax.tools.bench import throughput as bt
    res = bt.run_throughput(["demo"], prefill_T=[32], histories=[64, 128], window=16,
                            decode_tokens=2, repeats=1, log=lambda s: None)
    assert [r["T"] for r in res["prefill"]] == [32] and len(res["decode"]) == 1
    for r in res["prefill"] + res["decode"]:
        assert r["base_tok_s"] > 0 and r["mem_tok_s"] > 0 and math.isfinite(r["overhead"])
    assert [r["history"] for r in res["history"]] == [64, 128]
    assert all(r["full_context_ms"] > 0 and r["memory_ms"] > 0 for r in res["history"])
    table = bt.format_markdown(res, bench_common.machine_info())
    assert "| demo | 32 |" in table and "| 128 |" in table
    bt.plot(res, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_load_tiny():
    from deltamem_jax.tools.bench import load as bench_load
    res = bench_load.run_load(hidden=64, layers=2, vocab=300, shard_mb=0, repeats=1,
                              log=lambda s: None)
    targets = [r["target"] for r in res["rows"]]
    assert targets[:2] == ["float32", "bfloat16"] and len(targets) == 3   # + the 8-device mesh
    assert all(r["shards"] > 1 and r["seconds"] > 0 and r["bytes"] > 0 for r in res["rows"])
    assert "| bfloat16 |" in bench_load.format_markdown(res, bench_common.machine_info())
