"""Synthetic multi-session recall chats for the real-backbone demo: several unlike families.

Every family writes the documented chat format (``{"messages": [...]}``, the last
assistant message is the gold answer) but differs from the others in what matters
for generalisation: the kind of facts, the wording (several paraphrases per
statement and per question), the answer format, the filler between facts, how
sessions are marked and whether a system message is present.

* ``personal``: facts about the user (pets, family, home town, job, food, …) told
  over a few dated sessions of small talk; the answer is the bare value
  ("Milo", "Lisbon", "a nurse"); no system message.
* ``storage``: household items put away in numbered places, several items per chat
  (the others are distractors of the same type), arithmetic and unit chatter in
  between; the answer is the place ("drawer 4 in the hallway"); a short system
  message.
* ``codes``: codes and numbers (door codes, Wi-Fi passwords, gate numbers,
  reference numbers, times) amid tech-support and trivia turns that are full of
  other numbers; the answer is the code itself ("KX-4817"); a different system
  message and session marker.

``write_chat_dataset(out_dir, ChatSetConfig(dataset=...))`` writes ``train``,
``validation`` and ``test`` JSONL files; each split has its own seeded stream, so
a split is a pure function of (dataset, seed, split, size).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from deltamem_jax.utils.atomic import atomic_write_text

__all__ = ["DATASETS", "SPLITS", "ChatSetConfig", "generate_chat", "generate_chat_split",
           "write_chat_dataset"]

SPLITS = ("train", "validation", "test")

Rng = np.random.Generator


def _pick(rng: Rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# ------------------------------------------------------------------ value pools

_FIRST_NAMES = _words(
    "Ada Alma Arlo Bea Bruno Cleo Dante Dora Elio Emil Faye Felix Gus Hana Hugo Ines Ivo Jade "
    "Juno Kai Kira Leo Lina Luca Mara Milo Nell Nico Nora Otto Pia Quinn Rafa Rosa Ruby Sami "
    "Sven Tara Theo Uma Vera Wade Wren Yara Yuri Zoe Zane Ivan Olga Mira Boris Lola Enzo Greta "
    "Hector Iris Jonas Karin Lars Maeve Nadia Oscar Petra Rufus Selma Tobias Ursula Viggo Wanda")
_PET_NAMES = _words(
    "Biscuit Pepper Mochi Noodle Waffles Ziggy Pickles Bean Clover Maple Pumpkin Sprout Tofu "
    "Pebble Nugget Olive Button Fudge Juniper Marble Socks Truffle Whiskers Banjo Comet Dusty "
    "Echo Fennel Ginger Hazel Indigo Jasper Kiwi Lemon Mango Nutmeg Oreo Poppy Rocket Sage")
_CITIES = _words(
    "Lisbon Oslo Cairo Lima Quito Hanoi Dakar Porto Seoul Kyoto Perth Tunis Riga Sofia Turin "
    "Delhi Accra Bern Dublin Ghent Havana Izmir Jaipur Kazan Lagos Lyon Malmo Nantes Osaka Padua "
    "Quebec Rabat Split Tokyo Utrecht Vigo Warsaw Xiamen York Zagreb Bremen Cork Dresden Essen "
    "Graz Haifa Lille Minsk Odessa Pune Bilbao Cusco Agra Leeds Tallinn Vilnius Krakow")
_JOBS = ("a nurse", "a baker", "a pilot", "an architect", "a plumber", "a dentist", "a librarian",
         "a carpenter", "a chemist", "a florist", "a journalist", "a lawyer", "a mechanic",
         "a pharmacist", "a translator", "a zookeeper", "an electrician", "a tailor",
         "a geologist", "a paramedic", "a beekeeper", "a locksmith", "a surveyor", "a welder")
_FOODS = ("lasagna", "sushi", "paella", "ramen", "goulash", "falafel", "risotto", "tacos",
          "moussaka", "pierogi", "dumplings", "curry", "ratatouille", "gnocchi", "pho", "kimchi",
          "couscous", "burritos", "pancakes", "chili", "omelettes", "waffles", "schnitzel")
_INSTRUMENTS = ("the cello", "the banjo", "the flute", "the harp", "the trumpet", "the violin",
                "the ukulele", "the oboe", "the accordion", "the drums", "the clarinet",
                "the saxophone", "the piano", "the mandolin", "the tuba", "the harmonica")
_SPORTS = ("rowing", "fencing", "curling", "archery", "bouldering", "badminton", "handball",
           "judo", "squash", "cycling", "surfing", "karate", "lacrosse", "netball", "polo")
_COLOURS = _words("red blue green amber teal olive maroon navy coral ivory lilac mauve ochre "
                  "plum rust sage scarlet tan violet beige cyan gold indigo khaki mint silver")
_MONTHS = _words("January February March April May June July August September October "
                 "November December")


def _name(rng):
    return _pick(rng, _FIRST_NAMES)


# ------------------------------------------------------------------ families

@dataclasses.dataclass(frozen=True)
class _Kind:
    """One fact type: statement templates, question templates, an answer sampler."""
    statements: tuple[str, ...]      # "{v}" is the value
    questions: tuple[str, ...]
    sample: Callable[[Rng], str]


_PERSONAL = {
    "cat": _Kind(("My cat is called {v}.", "We named our cat {v}.", "Our cat's name is {v}."),
                 ("What is my cat called?", "What's the name of my cat?",
                  "Remind me, what did we name our cat?"), lambda r: _pick(r, _PET_NAMES)),
    "dog": _Kind(("My dog is called {v}.", "Our dog answers to {v}.", "I have a dog named {v}."),
                 ("What is my dog called?", "What's my dog's name?",
                  "Do you remember my dog's name?"), lambda r: _pick(r, _PET_NAMES)),
    "sister": _Kind(("My sister's name is {v}.", "My older sister is called {v}.",
                     "I have a sister, {v}."),
                    ("What is my sister's name?", "What's my sister called?",
                     "Who is my sister?"), _name),
    "friend": _Kind(("My best friend is {v}.", "{v} has been my best friend for years.",
                     "My closest friend is called {v}."),
                    ("Who is my best friend?", "What's my best friend's name?",
                     "Remind me who my closest friend is."), _name),
    "boss": _Kind(("My boss is called {v}.", "I report to a manager named {v}.",
                   "My new boss is {v}."),
                  ("Who is my boss?", "What's my manager's name?", "Who do I report to?"), _name),
    "born": _Kind(("I was born in {v}.", "I grew up in {v}.", "My home town is {v}."),
                  ("Where was I born?", "Which city is my home town?", "Where did I grow up?"),
                  lambda r: _pick(r, _CITIES)),
    "trip": _Kind(("Next month I'm flying to {v}.", "I booked a trip to {v} for next month.",
                   "We're going to {v} on holiday soon."),
                  ("Where am I flying next month?", "Where is my trip going?",
                   "Which city is my holiday in?"), lambda r: _pick(r, _CITIES)),
    "job": _Kind(("I work as {v}.", "I'm {v} by profession.", "These days I earn a living as {v}."),
                 ("What do I do for work?", "What is my job?", "What's my profession?"),
                 lambda r: _pick(r, _JOBS)),
    "food": _Kind(("My favourite dish is {v}.", "I could eat {v} every day.",
                   "Nothing beats {v} for me."),
                  ("What is my favourite dish?", "Which food could I eat every day?",
                   "What's my favourite thing to eat?"), lambda r: _pick(r, _FOODS)),
    "instrument": _Kind(("I play {v}.", "I've been learning {v} since spring.",
                         "In the evenings I practise {v}."),
                        ("Which instrument do I play?", "What instrument am I learning?",
                         "What do I practise in the evenings?"), lambda r: _pick(r, _INSTRUMENTS)),
    "sport": _Kind(("My sport is {v}.", "I do {v} twice a week.", "I recently took up {v}."),
                   ("Which sport do I do?", "What sport did I take up?",
                    "What do I do twice a week?"), lambda r: _pick(r, _SPORTS)),
    "car": _Kind(("My car is {v}.", "I drive a {v} car.", "Our car is painted {v}."),
                 ("What colour is my car?", "Which colour is our car?",
                  "Remind me of my car's colour."), lambda r: _pick(r, _COLOURS)),
    "birthday": _Kind(("My birthday is in {v}.", "I was born in the month of {v}.",
                       "I celebrate my birthday in {v}."),
                      ("Which month is my birthday?", "When is my birthday?",
                       "In which month do I celebrate my birthday?"),
                      lambda r: _pick(r, _MONTHS)),
}
_PERSONAL_ACKS = ("Got it.", "Noted.", "Nice, I'll remember that.", "Thanks for telling me.",
                  "Okay!", "Good to know.", "Lovely.")
_PERSONAL_FILLER = (
    ("How are you today?", "I'm well, thanks for asking."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("Is tea better than coffee?", "It is a matter of taste."),
    ("What should I cook tonight?", "Maybe a simple vegetable soup."),
    ("I feel a bit tired.", "A short walk might help."),
    ("Recommend a hobby.", "Try sketching; it only needs a pencil."),
    ("It is raining again.", "Good weather for reading."),
    ("Do you like music?", "I enjoy hearing what people listen to."),
    ("Any weekend ideas?", "A picnic could be nice if it stays dry."),
    ("I watched a great film yesterday.", "That sounds like a good evening."),
    ("Work was busy today.", "I hope tomorrow is calmer."),
)
_PERSONAL_SESSIONS = ("Hi there!", "Hello again.", "Hey, I'm back.", "Good morning!",
                      "Evening! Quick chat?")
_PERSONAL_DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")


_ITEMS = ("the red lamp", "the spare keys", "the passports", "the winter gloves", "the drill",
          "the first-aid kit", "the birthday candles", "the extension cord", "the tent",
          "the blue umbrella", "the sewing kit", "the old photos", "the toolbox", "the yoga mat",
          "the bike pump", "the chess set", "the Christmas lights", "the flashlight",
          "the paint brushes", "the guitar strings", "the tax papers", "the picnic blanket",
          "the hiking boots", "the glue gun", "the spare charger", "the wooden spoons",
          "the fishing rod", "the board games", "the watering can", "the ice skates")
_PLACES = (("in", "bin {n}"), ("in", "drawer {n} in the hallway"), ("in", "box {n} in the attic"),
           ("on", "shelf {n} in the garage"), ("in", "cupboard {n} in the kitchen"),
           ("in", "crate {n} in the basement"), ("in", "locker {n} at the gym"),
           ("in", "basket {n} under the stairs"))
# {to}: the place's preposition ("in" / "on"); {into}: "into" / "onto"
_STORAGE_PUT = ("I put {item} {to} {place}.", "{Item}: {place}, for the record.",
                "I stored {item} {to} {place}.", "Just so you know, {item} went {into} {place}.",
                "I moved {item} to {place} today.")
_STORAGE_ASK = ("Where did I put {item}?", "Where did {item} end up?", "Where can I find {item}?",
                "Which place did {item} go into?")
_STORAGE_ACKS = ("Okay, noted.", "Got it.", "Understood.", "Alright.", "I'll keep track of that.")
_STORAGE_SYSTEM = "You help the user keep track of their belongings."
_STORAGE_SESSIONS = ("Tidying day again.", "Back from the shops.", "More sorting today.",
                     "Hi, another cleaning session.")


def _arithmetic(rng: Rng) -> tuple[str, str]:
    a, b = int(rng.integers(2, 60)), int(rng.integers(2, 40))
    kind = int(rng.integers(4))
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        return f"How much is {a} times {b % 12 + 2}?", f"That makes {a * (b % 12 + 2)}."
    if kind == 2:
        return (f"How many minutes are in {b % 9 + 2} hours?",
                f"There are {(b % 9 + 2) * 60} minutes.")
    return f"If I have {a + b} nails and use {b}, how many are left?", f"You have {a} left."


_DOOR = ("the garage door code", "the alarm code", "the gate code", "the safe combination",
         "the storage unit PIN", "the bike lock code", "the office door code")
_CODE_STATE = ("{thing} is {v}.", "Please note: {thing} is {v}.", "For the record, {thing} is {v}.",
               "I changed {thing} to {v}.")
_CODE_ASK = ("What is {thing}?", "Can you tell me {thing}?", "What did I set {thing} to?",
             "Remind me of {thing}.")
_REFS = ("my parcel tracking number", "my booking reference", "the insurance policy number",
         "my library card number", "the invoice number", "my membership ID")
_TIMES = ("my dentist appointment", "the team call", "my train", "the plumber's visit",
          "my yoga class", "the school pickup")
_CODES_SYSTEM = "You are a concise assistant. Answer briefly."
_CODES_SESSIONS = ("--- new session ---", "(later that week)", "(next day)", "(a few days later)")
_CODES_ACKS = ("Saved.", "Noted.", "Okay.", "Got it, thanks.", "Recorded.")
_CODES_FILLER = (
    ("My laptop is slow, any idea?", "Close unused apps and restart it."),
    ("How far is the Moon?", "About 384,400 km on average."),
    ("How many bones does an adult have?", "206."),
    ("When did the Berlin Wall fall?", "In 1989."),
    ("How do I reset my router?", "Hold the reset button for 10 seconds."),
    ("What is the boiling point of water in Fahrenheit?", "212 degrees."),
    ("My phone battery drains fast.", "Lower the screen brightness and check background apps."),
    ("How tall is Mount Everest?", "8,849 metres."),
    ("How many keys does a piano have?", "88."),
    ("Is 97 a prime number?", "Yes, 97 is prime."),
)


def _code(rng: Rng) -> str:
    style = int(rng.integers(3))
    if style == 0:
        return str(int(rng.integers(1000, 10000)))
    if style == 1:
        letters = "".join(chr(65 + int(x)) for x in rng.choice(26, 2, replace=False))
        return f"{letters}-{int(rng.integers(1000, 10000))}"
    return f"{int(rng.integers(10, 100))}-{int(rng.integers(10, 100))}-{int(rng.integers(10, 100))}"


def _ref(rng: Rng) -> str:
    letters = "".join(chr(65 + int(x)) for x in rng.integers(0, 26, 3))
    return f"{letters}{int(rng.integers(1000, 10000))}"


def _time(rng: Rng) -> str:
    h, m = int(rng.integers(1, 13)), int(rng.choice([0, 15, 20, 30, 40, 45]))
    return f"{h}:{m:02d} {'am' if rng.integers(2) else 'pm'}"


# ------------------------------------------------------------------ assembling chats

@dataclasses.dataclass(frozen=True)
class ChatSetConfig:
    """Which family and how big; ranges are inclusive."""

    dataset: str = "personal"
    n_train: int = 4000
    n_validation: int = 200
    n_test: int = 200
    facts: tuple[int, int] = (2, 4)
    sessions: tuple[int, int] = (1, 3)
    filler_turns: tuple[int, int] = (1, 3)
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"ChatSetConfig.dataset: {self.dataset!r} is not one of "
                             f"{sorted(DATASETS)}")
        for field in ("facts", "sessions", "filler_turns"):
            lo, hi = getattr(self, field)
            if not 0 <= lo <= hi or (field != "filler_turns" and lo < 1):
                raise ValueError(f"ChatSetConfig.{field}: bad range {(lo, hi)}")
        for field in ("n_train", "n_validation", "n_test"):
            if getattr(self, field) < 0:
                raise ValueError(f"ChatSetConfig.{field} must be ≥ 0")


def _distinct(rng: Rng, sample: Callable[[Rng], str], taken: list[str]) -> str:
    """A value that neither equals nor hides inside (or contains) one already used,
    ignoring case (answers are scored case-blind)."""
    for _ in range(100):
        v = sample(rng)
        if not any(v.lower() in t.lower() or t.lower() in v.lower() for t in taken):
            return v
    raise RuntimeError("could not draw a distinct value")


def _spread(rng: Rng, turns: list, n_sessions: int, openers, marker) -> list[dict]:
    """Cut the (user, assistant) turns into ``n_sessions`` sessions; mark each session start."""
    n_sessions = min(n_sessions, len(turns))
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, len(turns)), n_sessions - 1,
                                             replace=False)) if n_sessions > 1 else []
    msgs = []
    for i, (u, a) in enumerate(turns):
        if i == 0 or i in cuts:
            u = marker(rng, len(msgs) // 2, _pick(rng, openers)) + " " + u
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def _interleave(rng: Rng, facts: list, filler: list) -> list:
    """Facts keep their order; filler turns go into random gaps (never after the last fact
    only: the question may come right after a fact or after small talk)."""
    slots = sorted(int(x) for x in rng.integers(0, len(facts) + 1, len(filler)))
    out, j = [], 0
    for i, f in enumerate(facts):
        while j < len(filler) and slots[j] == i:
            out.append(filler[j])
            j += 1
        out.append(f)
    out.extend(filler[j:])
    return out


def _personal(rng: Rng, cfg: ChatSetConfig) -> dict:
    n = int(rng.integers(cfg.facts[0], cfg.facts[1] + 1))
    kinds = [str(k) for k in rng.choice(list(_PERSONAL), size=min(n, len(_PERSONAL)),
                                        replace=False)]
    values: list[str] = []
    facts = []
    for k in kinds:
        v = _distinct(rng, _PERSONAL[k].sample, values)
        values.append(v)
        facts.append((_pick(rng, _PERSONAL[k].statements).format(v=v), _pick(rng, _PERSONAL_ACKS)))
    n_fill = int(rng.integers(cfg.filler_turns[0], cfg.filler_turns[1] + 1))
    filler = [_PERSONAL_FILLER[int(i)] for i in
              rng.choice(len(_PERSONAL_FILLER), min(n_fill, len(_PERSONAL_FILLER)), replace=False)]
    turns = _interleave(rng, facts, filler)
    day = int(rng.integers(7))

    def marker(rng, _, opener):
        nonlocal day
        day = (day + int(rng.integers(1, 3))) % 7
        return f"({_PERSONAL_DAYS[day]}) {opener}"
    msgs = _spread(rng, turns, int(rng.integers(cfg.sessions[0], cfg.sessions[1] + 1)),
                   _PERSONAL_SESSIONS, marker)
    asked = int(rng.integers(len(kinds)))
    msgs.append({"role": "user", "content": _pick(rng, _PERSONAL[kinds[asked]].questions)})
    msgs.append({"role": "assistant", "content": values[asked]})
    return {"messages": msgs}


def _storage(rng: Rng, cfg: ChatSetConfig) -> dict:
    n = int(rng.integers(cfg.facts[0], cfg.facts[1] + 1))
    items = [str(x) for x in rng.choice(_ITEMS, size=min(n, len(_ITEMS)), replace=False)]
    places: list[str] = []
    facts = []
    for item in items:
        prep, template = _PLACES[int(rng.integers(len(_PLACES)))]
        place = _distinct(rng, lambda r, t=template: t.format(n=int(r.integers(1, 40))), places)
        places.append(place)
        text = _pick(rng, _STORAGE_PUT).format(item=item, Item=item[0].upper() + item[1:],
                                               place=place, to=prep, into=prep + "to")
        facts.append((text, _pick(rng, _STORAGE_ACKS)))
    n_fill = int(rng.integers(cfg.filler_turns[0], cfg.filler_turns[1] + 1))
    turns = _interleave(rng, facts, [_arithmetic(rng) for _ in range(n_fill)])
    msgs = [{"role": "system", "content": _STORAGE_SYSTEM}]
    msgs += _spread(rng, turns, int(rng.integers(cfg.sessions[0], cfg.sessions[1] + 1)),
                    _STORAGE_SESSIONS, lambda r, i, opener: opener)
    asked = int(rng.integers(len(items)))
    msgs.append({"role": "user", "content": _pick(rng, _STORAGE_ASK).format(item=items[asked])})
    msgs.append({"role": "assistant", "content": places[asked]})
    return {"messages": msgs}


def _codes(rng: Rng, cfg: ChatSetConfig) -> dict:
    n = int(rng.integers(cfg.facts[0], cfg.facts[1] + 1))
    pools = [(t, _code) for t in _DOOR] + [(t, _ref) for t in _REFS] + \
        [(f"the time of {t}", _time) for t in _TIMES]
    chosen = [pools[int(i)] for i in rng.choice(len(pools), size=min(n, len(pools)),
                                                replace=False)]
    values: list[str] = []
    facts = []
    for thing, sample in chosen:
        v = _distinct(rng, sample, values)
        values.append(v)
        text = _pick(rng, _CODE_STATE).format(thing=thing, v=v)
        facts.append((text[0].upper() + text[1:], _pick(rng, _CODES_ACKS)))
    n_fill = int(rng.integers(cfg.filler_turns[0], cfg.filler_turns[1] + 1))
    filler = [_CODES_FILLER[int(i)] for i in
              rng.choice(len(_CODES_FILLER), min(n_fill, len(_CODES_FILLER)), replace=False)]
    turns = _interleave(rng, facts, filler)
    msgs = [{"role": "system", "content": _CODES_SYSTEM}]
    msgs += _spread(rng, turns, int(rng.integers(cfg.sessions[0], cfg.sessions[1] + 1)),
                    _CODES_SESSIONS, lambda r, i, opener: opener)
    asked = int(rng.integers(len(chosen)))
    q = _pick(rng, _CODE_ASK).format(thing=chosen[asked][0])
    msgs.append({"role": "user", "content": q[0].upper() + q[1:]})
    msgs.append({"role": "assistant", "content": values[asked]})
    return {"messages": msgs}


#: name -> generator ``(rng, config) -> record``
DATASETS: dict[str, Callable[[Rng, ChatSetConfig], dict]] = {
    "personal": _personal, "storage": _storage, "codes": _codes}


def generate_chat(rng: Rng, config: ChatSetConfig = ChatSetConfig()) -> dict:
    """One conversation of ``config.dataset``."""
    return DATASETS[config.dataset](rng, config)


def generate_chat_split(n: int, split: str, config: ChatSetConfig = ChatSetConfig()) -> list[dict]:
    """``n`` conversations of ``split`` (its own seeded stream per dataset and split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    key = sorted(DATASETS).index(config.dataset)
    rng = np.random.default_rng((config.seed, SPLITS.index(split), 1000 + key))
    return [generate_chat(rng, config) for _ in range(n)]


def write_chat_dataset(out_dir: str | os.PathLike, config: ChatSetConfig = ChatSetConfig()
                       ) -> dict[str, str]:
    """Write ``train/validation/test.jsonl`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    sizes = {"train": config.n_train, "validation": config.n_validation, "test": config.n_test}
    paths = {}
    for split in SPLITS:
        path = os.path.join(os.fspath(out_dir), f"{split}.jsonl")
        lines = [json.dumps(r, ensure_ascii=False) for r in
                 generate_chat_split(sizes[split], split, config)]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        paths[split] = path
    return paths
