"""A seeded synthetic "fact recall" chat dataset for the CPU demo.

Each conversation: the user states a few facts (one per message, each
acknowledged briefly), a few turns of unrelated small talk follow, then the
user asks about ONE fact and the final assistant message is exactly the
answer. There are 18 kinds of fact; answers are drawn uniformly from large
pools (digit codes, ≥ 50 names, ≥ 50 cities, 30 colours), so without the
history a model is near chance (:func:`chance_accuracy`). Conversations stay a
few hundred characters long.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticConfig", "FACT_KINDS", "generate_conversation", "generate_split",
           "write_synthetic_dataset", "chance_accuracy", "SPLITS"]

SPLITS = ("train", "validation", "test")

_NAMES = (
    "Ada Alma Arlo Bea Bruno Cleo Dante Dora Elio Emil Faye Felix Gus Hana Hugo Ines Ivo Jade "
    "Juno Kai Kira Leo Lina Luca Mara Milo Nell Nico Nora Otto Pia Quinn Rafa Rosa Ruby Sami "
    "Sven Tara Theo Uma Vera Wade Wren Xena Yara Yuri Zoe Zane Ivan Olga Mira Boris Lola Enzo"
).split()
_CITIES = (
    "Lisbon Oslo Cairo Lima Quito Hanoi Dakar Porto Seoul Kyoto Perth Tunis Riga Sofia Turin Delhi "
    "Accra Bern Dublin Ghent Havana Izmir Jaipur Kazan Lagos Lyon Malmo Nantes Osaka Padua Quebec "
    "Rabat Split Tokyo Utrecht Vigo Warsaw Xiamen York Zagreb Bremen Cork Dresden Essen Fes Graz "
    "Haifa Lille Minsk Nice Odessa Pune Bilbao Cusco Agra Leeds"
).split()
_COLOURS = (
    "red blue green amber teal olive maroon navy coral ivory lilac mauve ochre plum rust sage "
    "scarlet tan violet beige cyan gold indigo jade khaki lemon mint peach pink silver"
).split()

# kind -> (statement template, question, answer sampler)
FACT_KINDS = {
    "locker": ("My locker code is {}.", "What is my locker code?",
             lambda r: str(r.integers(1000, 10000))),
    "pin": ("My bike lock PIN is {}.", "What is my bike lock PIN?",
          lambda r: str(r.integers(1000, 10000))),
    "room": ("My hotel room is number {}.", "What is my hotel room number?",
           lambda r: str(r.integers(100, 1000))),
    "pet": ("My cat is called {}.", "What is my cat called?", lambda r: str(r.choice(_NAMES))),
    "friend": ("My best friend is {}.", "Who is my best friend?", lambda r: str(r.choice(_NAMES))),
    "sister": ("My sister's name is {}.", "What is my sister's name?",
             lambda r: str(r.choice(_NAMES))),
    "born": ("I was born in {}.", "Where was I born?", lambda r: str(r.choice(_CITIES))),
    "trip": ("Next month I fly to {}.", "Where do I fly next month?",
           lambda r: str(r.choice(_CITIES))),
    "colour": ("My favourite colour is {}.", "What is my favourite colour?",
             lambda r: str(r.choice(_COLOURS))),
    "dog": ("My dog is called {}.", "What is my dog called?", lambda r: str(r.choice(_NAMES))),
    "brother": ("My brother's name is {}.", "What is my brother's name?",
              lambda r: str(r.choice(_NAMES))),
    "boss": ("My boss is {}.", "Who is my boss?", lambda r: str(r.choice(_NAMES))),
    "home": ("I live in {}.", "Where do I live?", lambda r: str(r.choice(_CITIES))),
    "office": ("My office is in {}.", "Where is my office?", lambda r: str(r.choice(_CITIES))),
    "car": ("My car is {}.", "What colour is my car?", lambda r: str(r.choice(_COLOURS))),
    "flight": ("My flight number is {}.", "What is my flight number?",
             lambda r: str(r.integers(100, 1000))),
    "desk": ("My desk number is {}.", "What is my desk number?",
           lambda r: str(r.integers(10, 100))),
    "zip": ("My zip code is {}.", "What is my zip code?", lambda r: str(r.integers(10000, 100000))),
}
# The same facts restated as a reply ("sentence" answers): the reply's first words
# follow from the question, the value must come from the history.
ANSWER_SENTENCES = {
    "locker": "Your locker code is {}.", "pin": "Your bike lock PIN is {}.",
    "room": "Your hotel room is number {}.", "pet": "Your cat is called {}.",
    "friend": "Your best friend is {}.", "sister": "Your sister's name is {}.",
    "born": "You were born in {}.", "trip": "Next month you fly to {}.",
    "colour": "Your favourite colour is {}.", "dog": "Your dog is called {}.",
    "brother": "Your brother's name is {}.", "boss": "Your boss is {}.",
    "home": "You live in {}.", "office": "Your office is in {}.", "car": "Your car is {}.",
    "flight": "Your flight number is {}.", "desk": "Your desk number is {}.",
    "zip": "Your zip code is {}.",
}

_ACKS = ("Got it.", "Noted.", "Okay, noted.", "I'll remember.", "Thanks, noted.")
_FILLER = (
    ("How are you today?", "I'm well, thanks."),
    ("Any tips for sleeping better?", "Keep a regular bedtime."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("Is tea better than coffee?", "It is a matter of taste."),
    ("What should I cook tonight?", "Maybe a simple pasta."),
    ("I feel a bit tired.", "A short walk might help."),
    ("Recommend a hobby.", "Try sketching."),
    ("It is raining again.", "Good weather for reading."),
    ("Do you like music?", "I enjoy hearing about it."),
    ("Any weekend ideas?", "A picnic could be nice."),
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and ranges (inclusive) of the synthetic dataset."""

    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 200
    facts: tuple[int, int] = (2, 4)
    filler_turns: tuple[int, int] = (1, 3)
    seed: int = 0
    answer_style: str = "value"        # "value": "4821"; "sentence": "Your locker code is 4821."

    def __post_init__(self):
        lo, hi = self.facts
        if not 1 <= lo <= hi <= len(FACT_KINDS):
            raise ValueError(f"facts range must be within [1, {len(FACT_KINDS)}], got {self.facts}")
        lo, hi = self.filler_turns
        if not 0 <= lo <= hi:
            raise ValueError(f"bad filler_turns range {self.filler_turns}")
        if self.answer_style not in ("value", "sentence"):
            raise ValueError("answer_style must be 'value' or 'sentence', "
                             f"got {self.answer_style!r}")


def generate_conversation(rng: np.random.Generator,
                          config: SyntheticConfig = SyntheticConfig()) -> dict:
    """One conversation record ``{"messages": [...]}``."""
    n_facts = int(rng.integers(config.facts[0], config.facts[1] + 1))
    n_filler = int(rng.integers(config.filler_turns[0], config.filler_turns[1] + 1))
    kinds = [str(k) for k in rng.choice(list(FACT_KINDS), size=n_facts, replace=False)]
    answers: dict[str, str] = {}
    for k in kinds:  # no answer equals, or hides inside, another one of the conversation
        a = FACT_KINDS[k][2](rng)
        while any(a in b or b in a for b in answers.values()):
            a = FACT_KINDS[k][2](rng)
        answers[k] = a
    msgs = []
    for k in kinds:
        msgs.append({"role": "user", "content": FACT_KINDS[k][0].format(answers[k])})
        msgs.append({"role": "assistant", "content": str(rng.choice(_ACKS))})
    for j in rng.choice(len(_FILLER), size=min(n_filler, len(_FILLER)), replace=False):
        q, a = _FILLER[int(j)]
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a})
    asked = kinds[int(rng.integers(len(kinds)))]
    msgs.append({"role": "user", "content": FACT_KINDS[asked][1]})
    reply = answers[asked] if config.answer_style == "value" else \
        ANSWER_SENTENCES[asked].format(answers[asked])
    msgs.append({"role": "assistant", "content": reply})
    return {"messages": msgs}


def generate_split(n: int, split: str, config: SyntheticConfig = SyntheticConfig()) -> list[dict]:
    """``n`` conversations of ``split``; each split has its own seeded stream."""
    rng = np.random.default_rng((config.seed, SPLITS.index(split)))
    return [generate_conversation(rng, config) for _ in range(n)]


def write_synthetic_dataset(out_dir: str | os.PathLike,
                            config: SyntheticConfig = SyntheticConfig()) -> dict[str, str]:
    """Write ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    sizes = {"train": config.n_train, "validation": config.n_validation, "test": config.n_test}
    paths = {}
    for split in SPLITS:
        path = os.path.join(os.fspath(out_dir), f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for rec in generate_split(sizes[split], split, config):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def chance_accuracy(records: Iterable[dict], by_question: bool = True,
                    fit: Iterable[dict] | None = None) -> float:
    """Accuracy of always giving the most frequent final answer (per final
    question if ``by_question``): what a model ignoring the history can reach.

    With ``fit`` (e.g. the training split) the most frequent answers are taken
    from ``fit`` and scored on ``records``, an unbiased estimate; without it they
    are read off ``records`` themselves, which overstates chance when each
    question has only a few records.
    """
    def key(r):
        msgs: Sequence[dict] = r["messages"]
        return msgs[-2]["content"] if by_question and len(msgs) >= 2 else ""

    records = list(records)
    if not records:
        raise ValueError("chance_accuracy: no records")
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in (records if fit is None else fit):
        groups[key(r)][r["messages"][-1]["content"]] += 1
    best = {q: c.most_common(1)[0][0] for q, c in groups.items()}
    return sum(best.get(key(r)) == r["messages"][-1]["content"] for r in records) / len(records)
