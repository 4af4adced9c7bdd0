"""The authors' LoCoMo path feeds each conversation's shared context once and copies it to
every question. Under truncation a question with a longer QA prompt keeps one turn fewer;
the newest session comes first, so its prompt differs from the start of the context. Such
questions form their own prefix group: the others keep sharing their long prefix, and every
answer equals the one from feeding that question's whole prompt alone (greedy, token
writes: the strongest case)."""

import json

import jax
import numpy as np
import pytest

from deltamem_jax.data.tokenizer import load_tokenizer
from deltamem_jax.evaluation import locomo as L
from deltamem_jax.evaluation import locomo_authors as A
from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.defaults import eval_config
from deltamem_jax.evaluation.generate import Prompt, answer_prompts
from deltamem_jax.evaluation.loading import load_eval_model
from deltamem_jax.evaluation.locomo_task import LocomoTask
from deltamem_jax.evaluation.run import RULES, eval_mesh
from deltamem_jax.evaluation.settings import resolve

from helpers import random_model, save_pretrained

RESERVE = 50                     # the authors' answer reserve (locomo.answer_reserve_tokens)
LONG = "What did Ann say about the weather on the longest day of that very rainy summer?"


def _file(path):
    c = {"speaker_a": "Ann", "speaker_b": "Bob"}
    for s in (1, 2, 3):
        c[f"session_{s}"] = [{"speaker": "Ann", "dia_id": f"D{s}:1", "text": f"My code is {s}7."},
                             {"speaker": "Bob", "dia_id": f"D{s}:2", "text": "Noted, thanks."}]
        c[f"session_{s}_date_time"] = f"1:00 pm on {s} May, 2023"
    qa = [{"question": f"Code {k}?", "answer": f"{k}7", "category": 4} for k in range(5)]
    qa.insert(2, {"question": LONG, "answer": "rain", "category": 4})
    path.write_text(json.dumps([{"sample_id": "conv-0", "conversation": c, "qa": qa}]))
    return path


def _budget(path, tok):
    """The smallest token budget at which the long question keeps fewer turns than the rest."""
    (conv,) = L.load_locomo(str(path), categories=(4,))
    count = A.count_tokens(tok)
    for budget in range(200, 2000, 4):
        ctx = {A.context_text(conv, A.QuestionSpec(q.question, 4).qa_prompt, count, budget)
               for q in conv.questions}
        if len(ctx) == 2:
            return budget
    raise AssertionError("no budget separates the long question")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    model_dir, adapter = save_pretrained(random_model(0), root)
    c = eval_config()
    c.task, c.data.path = "locomo", str(_file(root / "locomo.json"))
    c.model.hf_dir, c.model.adapter = str(model_dir), str(adapter)
    c.batch_size, c.mesh.data, c.progress = 4, 1, False
    c.decoding.mode, c.decoding.max_new_tokens = "greedy", 6
    c.locomo.categories = (4,)
    c.locomo.context_window = (_budget(root / "locomo.json", load_tokenizer(str(model_dir)))
                               + RESERVE)
    s = resolve(c)
    mesh = eval_mesh(1, s.batch_size)
    with jax.set_mesh(mesh):
        yield LocomoTask(s, load_eval_model(s, mesh, RULES)), mesh


def test_a_truncated_outlier_gets_its_own_prefix_group(task):
    t, mesh = task
    setting = "delta_mem_full_context"
    ids, group, plans = t._conversation(setting, 0)
    long_index = [it.question.question for it in t.items].index(LONG)
    assert len(set(group)) == 2 and group.count(group[long_index]) == 1
    majority = plans[group[0]]
    # the majority's shared prefix is its whole context, not the few tokens all six share
    shared_by_all = min(next((k for k, (a, b) in enumerate(zip(ids[0], x)) if a != b), len(x))
                        for x in ids)
    assert majority[0] > shared_by_all + 100
    with jax.set_mesh(mesh):
        got = [r["raw_prediction"] for r in t.run_batch(setting, list(range(4)))
               + t.run_batch(setting, list(range(4, len(t.items))))]
        want = [answer_prompts(t.em, [Prompt(np.asarray(x))], [42 + k], memory=True,
                               decoding=Decoding(max_new_tokens=6), batch_size=4)[0]
                for k, x in enumerate(ids)]
    assert got == want
    assert len(set(want)) > 1                      # the answers are not trivially equal
