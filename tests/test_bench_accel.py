"""``bench accel`` on CPU at a tiny size: it runs, and accelerator-only rows say so."""

from deltamem_jax.tools.bench import accel

TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}


def test_accel_tiny_on_cpu():
    cases = (("sequential", None), ("chunked", 8), ("pallas", None))
    rec = accel.run_accel(T_list=[16], batch_heads=[2], layers=1, model_shape=TINY,
                          model_T=[16], decode_tokens=2, repeats=1, total_s=600, row_s=120,
                          log=lambda s: None, scan_cases=cases)
    scan = {(r["method"], r["chunk_size"]): r for r in rec["scan"]}
    for key in (("sequential", None), ("chunked", 8)):
        for kind in ("fwd", "fwd_bwd"):
            assert scan[key][kind]["ms"] > 0 and scan[key][kind]["peak_bytes"] >= 0
    assert "accelerator only" in scan[("pallas", None)]["fwd"]["na"]
    model = {(r["pass"], r["attention"]): r for r in rec["model"]}
    for key in (("write", "auto"), ("write", "xla"), ("write", "blocked"), ("decode", "auto")):
        assert model[key]["m"]["ms"] > 0, key
    assert model[("write", "auto")]["resolved"] == "blocked"
    assert model[("write", "cudnn")]["m"]["na"] == "GPU only"
    assert model[("write", "splash")]["m"]["na"] == "TPU only"
    table = accel.format_markdown(rec)
    for text in ("| 16 | 2 | sequential |", "n/a (accelerator only", "auto → blocked",
                 "n/a (TPU only)", "`osam_scan(method=\"auto\")` here → `sequential`"):
        assert text in table, text


def test_rows_over_budget_are_reported_not_run():
    budget = accel.Budget(total_s=100.0, row_s=5.0)
    assert budget.refuse(None) is None
    assert "predicted 9 s" in budget.refuse(9.0)
    spent = accel.Budget(total_s=0.0, row_s=5.0)
    assert "total time budget" in accel.measure(lambda x: x, (1.0,), 1, spent, 1e9)["na"]
    # a failing function is a row entry, not a crash
    broken = accel.measure(lambda x: x.undefined, (1.0,), 1, budget, 1e9)
    assert broken["ms"] is None and "failed to compile" in broken["na"]


def test_cli_registers_accel():
    from deltamem_jax.tools.bench.__main__ import build_parser
    args = build_parser().parse_args(["accel", "--T", "1024", "--budget-s", "60"])
    assert args.T == [1024] and args.budget_s == 60

