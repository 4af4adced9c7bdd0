"""Every config file parses and resolves into typed settings; the defaults have one home."""

import dataclasses
import importlib.util
import json
import pathlib

import pytest

from deltamem_jax.memory.config import DeltaMemConfig
from deltamem_jax.training import settings as train_settings
from deltamem_jax.training.defaults import base_config, demo_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py")
                       if not p.name.startswith(("eval_", "__")))


def _load(path: pathlib.Path):
    """``get_config()`` of a config file, imported by path as ``--config=`` does."""
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_training_config_files_resolve(path):
    s = train_settings.resolve(_load(path), need_data=False)
    assert isinstance(s, train_settings.TrainSettings)
    s.decoder()                     # the architecture resolves too (preset, scratch or dir)


EVAL_CONFIGS = sorted((REPO / "configs").glob("eval_*.py"))


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_evaluation_config_files_resolve(path):
    from deltamem_jax.evaluation.settings import EvalSettings, resolve
    assert isinstance(resolve(_load(path), need_model=False), EvalSettings)


def test_every_config_file_is_covered():
    names = {p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py"}
    assert {p.name for p in TRAIN_CONFIGS} | {n for n in names if n.startswith("eval_")} == names


def test_config_dict_is_built_from_the_typed_schema():
    """The ConfigDict holds exactly the dataclass fields at their defaults (one home)."""
    c = base_config()
    s = train_settings.resolve(c, need_data=False)
    assert s == train_settings.TrainSettings()
    assert set(c.memory.keys()) == {f.name for f in dataclasses.fields(DeltaMemConfig)}
    assert s.memory == train_settings.AUTHORS_TRAINING_MEMORY


def test_memory_defaults_are_the_authors():
    """Our DeltaMemConfig defaults = the authors' config-class defaults (their full dump of a
    variant that overrides only rank and delta_heads), but Δ heads q,o (the paper's);
    their training recipe changes only output_init."""
    from conftest import FIXTURES
    dump = json.loads((FIXTURES / "adapters" / "qo_r8" / "delta_mem_config.json").read_text())
    assert DeltaMemConfig.from_authors_dict(dump) == DeltaMemConfig()
    assert dataclasses.replace(train_settings.AUTHORS_TRAINING_MEMORY,
                               output_init="zero") == DeltaMemConfig()
    assert train_settings.AUTHORS_TRAINING_MEMORY.output_init == "base_slice_fixed"


def test_qwen3_4b_config_is_the_authors_recipe():
    c = _load(REPO / "configs" / "qwen3_4b.py")
    s = train_settings.resolve(c, need_data=False)
    assert s.memory == train_settings.AUTHORS_TRAINING_MEMORY.__class__(
        **{**dataclasses.asdict(train_settings.AUTHORS_TRAINING_MEMORY), "chunk_size": 128})
    assert (s.optim.learning_rate, s.optim.warmup_ratio, s.optim.weight_decay) == (2e-4, 0.1, 0.0)
    assert (s.data.max_length, s.data.max_write_length, s.data.recent_messages) == (512, 8192, 1)
    assert s.data.long_replies == s.episodes().long_replies == "truncate_left"
    assert (s.data.p_state_only, s.train.sparsity_weight, s.train.sparsity_target) == \
        (0.2, 0.01, 0.05)
    smol = train_settings.resolve(_load(REPO / "configs" / "smollm3_3b.py"), need_data=False)
    assert smol.train.sparsity_weight == 0.0 and smol.decoder().model_type == "smollm3"


def test_demo_config_resolves():
    s = train_settings.resolve(demo_config(), need_data=False)
    assert s.data.tokenizer == "byte" and s.memory.output_init == "zero"


@pytest.mark.parametrize("field,value,message", [
    ("optim.learning_rate", "fast", "must be a number"),
    ("optim.lr", 1.0, "unknown field"),
    ("memory.rank", 2.5, "must be an int"),
    ("memory.delta_heads", ("q", "x"), "delta_heads"),
    ("data.p_state_only", 2.0, "probability"),
    ("data.long_replies", "drop", "long_replies"),
    ("mesh.rules", (("batch", "pipeline"),), "mesh.rules"),
])
def test_bad_fields_name_themselves(field, value, message):
    d = base_config().to_dict()
    section, name = field.split(".")
    d[section][name] = value
    import ml_collections
    with pytest.raises(train_settings.ConfigError, match=message) as e:
        train_settings.resolve(ml_collections.ConfigDict(d), need_data=False)
    assert f"config.{section}" in str(e.value)
