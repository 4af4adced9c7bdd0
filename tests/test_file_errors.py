"""Every file we read fails with its path and what is wrong, not a library's bare error."""

import pytest

from deltamem_jax.checkpoints.adapters import load_adapter, read_adapter_config
from deltamem_jax.checkpoints.hf import load_hf_model
from deltamem_jax.data.records import load_records
from deltamem_jax.models.config import DecoderConfig
from deltamem_jax.utils.atomic import atomic_directory, atomic_write_text
from deltamem_jax.utils.files import FileFormatError

from helpers import random_model, save_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_pretrained(random_model(0), tmp_path_factory.mktemp("pretrained"))


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    model_dir = _copy(saved[0], tmp_path / "m")
    shard = model_dir / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(FileFormatError, match=r"model\.safetensors: cannot read safetensors"):
        load_hf_model(str(model_dir))
    shard.write_bytes(data[:5])                     # not even a header length
    with pytest.raises(FileFormatError, match=r"model\.safetensors"):
        load_hf_model(str(model_dir))


def test_corrupt_adapter_config_names_the_file(saved, tmp_path):
    adapter = _copy(saved[1], tmp_path / "a")
    (adapter / "delta_mem_config.json").write_text('{"rank": 8,')
    with pytest.raises(FileFormatError, match=r"delta_mem_config\.json: cannot read"):
        read_adapter_config(str(adapter))
    (adapter / "delta_mem_config.json").write_text('{"rank": "eight"}')
    with pytest.raises(FileFormatError, match=r"delta_mem_config\.json"):
        read_adapter_config(str(adapter))
    (adapter / "delta_mem_config.json").write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="JSON object"):
        read_adapter_config(str(adapter))


def test_truncated_adapter_tensors_name_the_file(saved, tmp_path):
    adapter = _copy(saved[1], tmp_path / "a")
    (adapter / "delta_mem_adapter.pt").unlink(missing_ok=True)
    f = adapter / "delta_mem_adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=r"delta_mem_adapter\.safetensors"):
        load_adapter(random_model(0, memory=None), str(adapter))


def test_corrupt_model_config_names_the_file(saved, tmp_path):
    model_dir = _copy(saved[0], tmp_path / "m")
    (model_dir / "config.json").write_text("{oops")
    with pytest.raises(FileFormatError, match=r"config\.json: cannot read the model config"):
        DecoderConfig.from_pretrained(str(model_dir))


def test_bad_data_file_names_the_file(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('[{"messages": [}')
    with pytest.raises(FileFormatError, match=r"train\.json: not valid JSON"):
        load_records(str(bad))
    binary = tmp_path / "train.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FileFormatError, match=r"train\.jsonl: cannot read chat records"):
        load_records(str(binary))


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "dir") as d:
            open(f"{d}/x", "w").write("partial")
            raise RuntimeError("crash")
    assert not (tmp_path / "dir").exists()
    with atomic_directory(tmp_path / "dir") as d:
        open(f"{d}/x", "w").write("v1")
    with atomic_directory(tmp_path / "dir") as d:
        open(f"{d}/y", "w").write("v2")
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["y"]
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.txt"]   # no temp left
