"""The README's library example runs as written (on a tiny saved model instead of Qwen3-4B)."""

import pathlib
import re

import numpy as np

from helpers import random_model, save_pretrained

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _library_example() -> str:
    text = README.read_text()
    section = text[text.index("## The library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_example_runs(tmp_path):
    model_dir, adapter_dir = save_pretrained(random_model(0), tmp_path)
    code = (_library_example().replace("path/to/Qwen3-4B", str(model_dir))
            .replace("path/to/delta_mem_adapter_dir", str(adapter_dir)))
    rng = np.random.default_rng(0)
    scope = {"history_ids": rng.integers(3, 200, (1, 24)), "history_mask": np.ones((1, 24), bool),
             "question_ids": rng.integers(3, 200, (1, 6))}
    exec(compile(code, "README.md", "exec"), scope)
    out, gen, hist = scope["out"], scope["gen"], scope["hist"]
    assert out.logits.shape == (1, 6, 264) and np.isfinite(np.asarray(out.logits)).all()
    assert hist.logits is None and gen.tokens.shape == (1, 64)
    # memory was written: the read pass differs from one on a fresh state
    fresh = scope["run"](scope["question_ids"], memory_state=scope["run"].init_memory_state(1),
                         write=False)
    assert not np.allclose(np.asarray(out.logits), np.asarray(fresh.logits))
