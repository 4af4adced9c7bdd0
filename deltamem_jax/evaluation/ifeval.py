"""IFEval under the authors' protocol, scored by lm-evaluation-harness's own checkers.

Data: the released jsonl (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``). Prompt:
``prompt.strip()``; greedy, 1500 tokens. Checkers: ``lm_eval.tasks.ifeval.utils.
test_instruction_following_strict`` / ``_loose``, loaded from the installed ``lm_eval``
*without* running ``lm_eval/__init__`` or ``lm_eval/tasks/__init__`` (those import the
harness's task manager: sacrebleu, datasets, torch-side code). Two switches:

* ``language_detector``: ``authors`` (their ``ifeval_compat.detect`` heuristic, which the
  authors install in place of langdetect; it changes ``language:response_language``) or
  ``langdetect`` (the real package, seeded for determinism);
* ``nltk``: ``nltk`` (the real package; its ``punkt_tab`` data must be installed — never
  downloaded here) or ``shim`` (the authors' fallback when nltk is absent: sentences split
  after ``.!?`` + whitespace or at newlines, words ``\\w+``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from collections import defaultdict
from functools import lru_cache

import regex

from deltamem_jax.evaluation.decoding import Decoding
from deltamem_jax.evaluation.single_prompt import SinglePromptTask, read_rows, require

__all__ = [
    "IFEvalTask",
    "LangDetectException",
    "detect_language",
    "evaluate_response",
    "ifeval_checkers",
    "summarize_ifeval",
]


class LangDetectException(Exception):
    """Raised for empty text (lm_eval then counts the check as passed)."""


_WORD = re.compile(r"\w+", flags=re.UNICODE)
_SCRIPTS = {lang: regex.compile(rf"\p{{Script={name}}}") for lang, name in (
    ("ar", "Arabic"), ("bn", "Bengali"), ("gu", "Gujarati"), ("hi", "Devanagari"),
    ("kn", "Kannada"), ("ko", "Hangul"), ("pa", "Gurmukhi"), ("ru", "Cyrillic"),
    ("ta", "Tamil"), ("te", "Telugu"), ("th", "Thai"))}
_LATIN_STOPWORDS = {
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "für", "von", "zu"},
    "en": {"the", "and", "is", "are", "this", "that", "with", "for", "from", "not", "have", "you"},
    "fi": {"ja", "on", "ei", "se", "että", "kuin", "olen", "tämä", "mutta", "kun", "oli"},
    "it": {"il", "la", "di", "e", "che", "non", "un", "una", "per", "con", "sono", "del"},
    "pt": {"de", "que", "e", "o", "a", "os", "as", "um", "uma", "não", "para", "com"},
    "sw": {"na", "ya", "kwa", "ni", "katika", "kwamba", "kutoka", "kuwa", "hii", "lakini", "kama"},
    "vi": {"la", "va", "cua", "mot", "nhung", "cac", "cho", "khong", "duoc", "voi", "trong"},
}
_ARABIC_HINTS = (("ur", set("ٹڈڑںھہے")), ("fa", set("گچپژکۍیە")))
_DEVANAGARI_HINTS = (("mr", ("आहे", "आणि", "नाही", "हे", "एक")),
                     ("ne", ("छ", "र", "को", "मा", "यो", "हो")),
                     ("hi", ("है", "और", "नहीं", "यह", "एक")))
_CYRILLIC_HINTS = {"bg": {"и", "в", "не", "се", "за", "че", "с", "на"},
                   "ru": {"и", "в", "не", "что", "это", "на", "я", "с"}}
_FOLD = str.maketrans({**{c: "a" for c in "áàâãäåă"}, "ç": "c", **{c: "e" for c in "éèêë"},
                       **{c: "i" for c in "íìîï"}, "ñ": "n", **{c: "o" for c in "óòôõöơ"},
                       **{c: "u" for c in "úùûüư"}, "ý": "y", "ÿ": "y", "đ": "d"})


def detect_language(text: str) -> str:
    """The authors' language heuristic (``ifeval_compat.detect``): the dominant script
    (ties to the earlier of ar bn gu hi kn ko pa ru ta te th) with Arabic, Devanagari and
    Cyrillic refinements; else stopword hits (ties to the earlier of de en fi it pt sw vi);
    else ``en``."""
    t = str(text or "").strip()
    if not t:
        raise LangDetectException("Cannot detect language from empty text")
    counts = {lang: len(p.findall(t)) for lang, p in _SCRIPTS.items()}
    best, n = max(counts.items(), key=lambda kv: kv[1])
    if n > 0:
        if best == "ar":
            chars = set(t)
            return next((lang for lang, hints in _ARABIC_HINTS if chars & hints), "ar")
        if best == "hi":
            return next((lang for lang, hints in _DEVANAGARI_HINTS
                         if any(h in t for h in hints)), "hi")
        if best == "ru":
            tokens = set(_WORD.findall(t.lower()))
            bg = sum(1 for x in tokens if x in _CYRILLIC_HINTS["bg"])
            ru = sum(1 for x in tokens if x in _CYRILLIC_HINTS["ru"])
            return "bg" if bg > ru else "ru"
        return best
    tokens = _WORD.findall(t.lower().translate(_FOLD))
    if not tokens:
        return "en"
    scores = {lang: sum(1 for x in tokens if x in words)
              for lang, words in _LATIN_STOPWORDS.items()}
    lang, score = max(scores.items(), key=lambda kv: kv[1])
    return lang if score > 0 else "en"


def _shim_module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


class _ShimSentences:
    def tokenize(self, text):
        parts = [p.strip() for p in _SENT_SPLIT.split(text) if p.strip()]
        return parts or ([text.strip()] if text.strip() else [])


class _ShimRegexpTokenizer:
    def __init__(self, pattern):
        self._p = re.compile(pattern, flags=re.UNICODE)

    def tokenize(self, text):
        return self._p.findall(text)


def _nltk_shim() -> types.ModuleType:
    data = types.SimpleNamespace(find=lambda name: name, load=lambda name: _ShimSentences())
    return _shim_module("nltk", data=data, download=lambda *a, **k: True,
                        tokenize=types.SimpleNamespace(RegexpTokenizer=_ShimRegexpTokenizer),
                        word_tokenize=lambda text: _WORD.findall(text))


@lru_cache(maxsize=1)
def _modules():
    """(utils, instructions, instructions_util) of lm_eval's ifeval, loaded alone."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("IFEval needs lm-eval (pip install --no-deps -r requirements-nodeps.txt)")
    root = next(iter(spec.submodule_search_locations))
    stubs = {"lm_eval": root, "lm_eval.tasks": f"{root}/tasks",
             "lm_eval.tasks.ifeval": f"{root}/tasks/ifeval"}
    added, saved_nltk = [], sys.modules.get("nltk")
    for name, path in stubs.items():
        if name not in sys.modules:
            sys.modules[name] = _shim_module(name, __path__=[path])
            added.append(name)
    # importing instructions_util runs nltk.download("punkt_tab") if the data is missing: the
    # shim is in place during the import so that nothing is ever downloaded
    sys.modules["nltk"] = _nltk_shim()
    try:
        utils = importlib.import_module("lm_eval.tasks.ifeval.utils")
        instructions = importlib.import_module("lm_eval.tasks.ifeval.instructions")
        util = importlib.import_module("lm_eval.tasks.ifeval.instructions_util")
    finally:
        if saved_nltk is not None:
            sys.modules["nltk"] = saved_nltk
        else:
            sys.modules.pop("nltk", None)
        for name in ("lm_eval", "lm_eval.tasks"):
            if name in added:
                sys.modules.pop(name, None)
    return utils, instructions, util


def ifeval_checkers(language_detector: str = "authors", nltk_mode: str = "nltk"):
    """lm_eval's ifeval ``utils`` module with the chosen language detector and nltk."""
    utils, instructions, util = _modules()
    if language_detector == "authors":
        instructions.langdetect = _shim_module("langdetect", detect=detect_language,
                                               LangDetectException=LangDetectException)
    else:
        import langdetect

        langdetect.DetectorFactory.seed = 0
        instructions.langdetect = langdetect
    if nltk_mode == "shim":
        util.nltk = _nltk_shim()
    else:
        import nltk

        try:
            nltk.data.find("tokenizers/punkt_tab")
        except LookupError:
            raise RuntimeError(
                "config.ifeval.nltk='nltk' needs NLTK's punkt_tab data (python -m nltk.downloader "
                "punkt_tab on a machine with a network, or NLTK_DATA pointing at a copy); "
                "nothing is downloaded at run time. config.ifeval.nltk='shim' uses the authors' "
                "fallback splitter instead") from None
        util.nltk = nltk
    return utils


def evaluate_response(item: dict, response: str, utils) -> dict:
    """Strict and loose results of one response (the authors' input example: instruction ids
    stripped, empties dropped; kwargs dicts padded with {} or cut to match)."""
    ids = [str(v).strip() for v in item.get("instruction_id_list", []) if str(v).strip()]
    kwargs = [dict(e) if isinstance(e, dict) else {} for e in (item.get("kwargs") or [])]
    kwargs = (kwargs + [{}] * len(ids))[: len(ids)]
    inp = utils.InputExample(key=int(item.get("key", 0)), instruction_id_list=ids,
                             prompt=str(item.get("prompt", "")), kwargs=kwargs)
    strict = utils.test_instruction_following_strict(inp, response)
    loose = utils.test_instruction_following_loose(inp, response)
    return {"prompt_level_strict_acc": bool(strict.follow_all_instructions),
            "inst_level_strict_acc": [bool(x) for x in strict.follow_instruction_list],
            "prompt_level_loose_acc": bool(loose.follow_all_instructions),
            "inst_level_loose_acc": [bool(x) for x in loose.follow_instruction_list]}


def summarize_ifeval(records: list[dict]) -> dict:
    n = len(records)
    ps = sum(1 for r in records if r["prompt_level_strict_acc"])
    pl = sum(1 for r in records if r["prompt_level_loose_acc"])
    pairs = [(i, bool(s), bool(lo)) for r in records for i, s, lo in
             zip(r["instruction_id_list"], r["inst_level_strict_acc"], r["inst_level_loose_acc"])]
    m = len(pairs)
    si, li = sum(p[1] for p in pairs), sum(p[2] for p in pairs)
    grouped = defaultdict(list)
    for i, s, lo in pairs:
        grouped[i].append((s, lo))
    by = {i: {"inst_level_strict_acc": round(sum(s for s, _ in v) / len(v), 4),
              "inst_level_loose_acc": round(sum(lo for _, lo in v) / len(v), 4),
              "num_instructions": len(v), "num_strict_correct": sum(s for s, _ in v),
              "num_loose_correct": sum(lo for _, lo in v)} for i, v in sorted(grouped.items())}
    r4 = lambda a, b: round(a / b, 4) if b else 0.0
    return {"prompt_level_strict_acc": r4(ps, n), "prompt_level_loose_acc": r4(pl, n),
            "inst_level_strict_acc": r4(si, m), "inst_level_loose_acc": r4(li, m),
            "num_samples": n, "num_prompt_strict_correct": ps, "num_prompt_loose_correct": pl,
            "num_instructions": m, "num_instruction_strict_correct": si,
            "num_instruction_loose_correct": li, "by_instruction_id": by}


class IFEvalTask(SinglePromptTask):
    name = "ifeval"
    title = "IFEval (lm-eval checkers), authors' protocol"
    default_decoding = Decoding(1500)

    def __init__(self, s, em):
        super().__init__(s, em)
        rows = read_rows(s.data.path, "IFEval")
        for n, r in enumerate(rows):
            require(r, ("key", "prompt", "instruction_id_list", "kwargs"), "IFEval", f"row {n}")
        self.items = rows[: s.data.limit] if s.data.limit else rows
        self.utils = ifeval_checkers(s.ifeval.language_detector, s.ifeval.nltk)

    def key(self, i):
        return str(self.items[i]["key"])

    def prompt(self, item):
        return str(item.get("prompt", "")).strip()

    def score(self, item, prediction):
        return {"key": int(item.get("key", 0)),
                "instruction_id_list": [str(v) for v in item.get("instruction_id_list", [])],
                **evaluate_response(item, prediction, self.utils)}

    def summarize(self, records):
        return summarize_ifeval(records)

    def report_row(self, summary):
        return {k: summary[k] for k in ("prompt_level_strict_acc", "prompt_level_loose_acc",
                                        "inst_level_strict_acc", "inst_level_loose_acc")} | {
            "n": summary["num_samples"]}
