"""``bench prefill`` without the authors' checkout (CI has none): our side, table, growth."""

from deltamem_jax.tools.bench import prefill


def test_prefill_tool_ours_only_tiny():
    """``bench prefill`` without the authors' checkout: our side, table and growth lines."""
    shape = {"vocab": 64, "hidden": 32, "intermediate": 64, "layers": 2, "heads": 4,
             "kv_heads": 2, "head_dim": 8}
    rec = prefill.run_prefill([16, 32], repeats=1, shape=shape, progress=lambda s: None)
    assert [(r["T"], r["logits"]) for r in rec["rows"]] == [(16, True), (16, False),
                                                          (32, True), (32, False)]
    assert all(r["ours_s"] > 0 and "theirs_s" not in r for r in rec["rows"])
    table = prefill.format_markdown(rec)
    assert "| 32 | last only |" in table and "growth T = 16 → 32" in table


def test_authors_repo_must_be_their_checkout(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="--authors-repo"):
        prefill.Authors(str(tmp_path), str(tmp_path), prefill.SHAPE, threads=2, seed=0)
