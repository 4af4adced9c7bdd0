"""The paper's overhead figure, from config values alone (nothing allocated)."""

import jax
from flax import nnx

from deltamem_jax import DeltaMemConfig
from deltamem_jax.models.presets import preset
from deltamem_jax.models.summary import abstract_model, format_counts, parameter_counts


def test_qwen3_4b_overhead_matches_paper():
    model = abstract_model(preset("qwen3_4b"), DeltaMemConfig(output_init="base_slice_fixed"))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    counts = parameter_counts(model)
    assert counts["memory"] == 4_866_336
    assert round(100 * counts["memory_share"], 2) == 0.12
    assert 4.0e9 < counts["backbone"] < 4.05e9
    assert "4,866,336" in format_counts(counts) and "0.12 %" in format_counts(counts)


def test_uncoupled_and_target_layers_change_the_count():
    base = preset("qwen3_4b")
    per_layer = 135_176 + 8 * 2560 + 8                       # + lambda_proj and lambda_bias
    counts = parameter_counts(abstract_model(
        base, DeltaMemConfig(couple_lambda=False, target_layers=(0, 5, 35))))
    assert counts["memory"] == 3 * per_layer
