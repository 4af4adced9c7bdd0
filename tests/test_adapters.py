"""Authors'-format adapters: both file formats, export round trip, mismatches named."""

import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from deltamem_jax import DecoderConfig, DecoderLM, load_adapter, load_hf_model, save_adapter
from deltamem_jax.checkpoints.adapters import adapter_tensors

VARIANT = "qo_r8_uncoupled"


@pytest.fixture(scope="module")
def backbone_config(fixture_dir):
    return DecoderConfig.from_pretrained(str(fixture_dir / "backbone"))


def _model(fixture_dir):
    return load_hf_model(str(fixture_dir / "backbone"))


def test_torch_and_safetensors_files_load_the_same(fixture_dir, tmp_path):
    pt_only = tmp_path / "pt_only"
    shutil.copytree(fixture_dir / "adapters" / VARIANT, pt_only)
    (pt_only / "delta_mem_adapter.safetensors").unlink()
    a, b = _model(fixture_dir), _model(fixture_dir)
    load_adapter(a, str(fixture_dir / "adapters" / VARIANT))
    load_adapter(b, str(pt_only))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


def test_export_round_trip_in_authors_format(fixture_dir, tmp_path):
    src = fixture_dir / "adapters" / VARIANT
    model = _model(fixture_dir)
    config = load_adapter(model, str(src))
    out = tmp_path / "exported"
    save_adapter(model, str(out))
    ref = load_file(str(src / "delta_mem_adapter.safetensors"))
    ours = load_file(str(out / "delta_mem_adapter.safetensors"))
    assert ours.keys() == ref.keys()                      # the same names, all four heads
    for name, value in ref.items():
        inactive = name.endswith(("delta_k_proj", "delta_v_proj"))
        want = np.zeros_like(value) if inactive else value
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
    pt = torch.load(out / "delta_mem_adapter.pt", map_location="cpu", weights_only=True)
    assert pt.keys() == ours.keys()
    for name in pt:
        np.testing.assert_array_equal(pt[name].numpy(), ours[name])
    dumped = json.loads((out / "delta_mem_config.json").read_text())
    authors = json.loads((src / "delta_mem_config.json").read_text())
    assert dumped.keys() == authors.keys()
    assert {k: dumped[k] for k in ("rank", "couple_lambda", "delta_heads")} == \
        {k: authors[k] for k in ("rank", "couple_lambda", "delta_heads")}
    again = _model(fixture_dir)
    assert load_adapter(again, str(out)) == config
    for k, v in adapter_tensors(again).items():
        np.testing.assert_array_equal(v, ours[k])
    assert not list(tmp_path.glob(".adapter-*"))         # no temp dir left behind


def test_mismatched_backbone_names_tensor_and_shapes(fixture_dir, backbone_config):
    narrow = DecoderLM(backbone_config.replace(hidden_size=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.\w+' has shape "
                                         r"\(8, 64\).*need \(8, 32\)"):
        load_adapter(narrow, str(fixture_dir / "adapters" / "qo_r8"))
    shallow = DecoderLM(backbone_config.replace(num_hidden_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="for layer 1.*1-layer backbone"):
        load_adapter(shallow, str(fixture_dir / "adapters" / "qo_r8"))
    heads = DecoderLM(backbone_config.replace(num_attention_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"delta_q_proj.*\(64, 8\).*\(32, 8\)"):
        load_adapter(heads, str(fixture_dir / "adapters" / "qo_r8"))


def test_bad_adapter_directories(fixture_dir, tmp_path):
    model = _model(fixture_dir)
    with pytest.raises(FileNotFoundError, match="delta_mem_config.json"):
        load_adapter(model, str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(fixture_dir / "adapters" / "qo_r8", bad)
    cfg = json.loads((bad / "delta_mem_config.json").read_text())
    (bad / "delta_mem_config.json").write_text(json.dumps(dict(cfg, memory_reader_layers=[3])))
    with pytest.raises(ValueError, match="memory_reader_layers.*archived"):
        load_adapter(model, str(bad))
    (bad / "delta_mem_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(bad / "delta_mem_adapter.safetensors"))
    from safetensors.numpy import save_file
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.beta_bias" not in k},
              str(bad / "delta_mem_adapter.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.self_attn\.beta_bias"):
        load_adapter(model, str(bad))
    save_file(dict(tensors, **{"model.layers.0.self_attn.gizmo": np.zeros(3, np.float32)}),
              str(bad / "delta_mem_adapter.safetensors"))
    with pytest.raises(ValueError, match="unknown parameter 'gizmo'"):
        load_adapter(model, str(bad))
