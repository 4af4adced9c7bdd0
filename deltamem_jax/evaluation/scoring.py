"""Answer normalisation and scorers (pure Python; no JAX, no model code).

Two families:

* SQuAD-style: :func:`normalize_answer`, :func:`exact_match`, :func:`token_f1`, and
  :func:`answer_recall` (the gold answer contained in the reply, MemoryAgentBench-style).
* LoCoMo-style, as used by the LoCoMo paper and the δ-mem authors:
  :func:`normalize_locomo_answer` (also drops commas and the word "and", NFD),
  Porter-stemmed token F1 (:func:`locomo_f1`), the category-1 multi-answer F1
  (:func:`locomo_multi_answer_f1`), the category-3 gold cut at the first ';',
  category 5 (adversarial) not scored unless asked for, prediction
  post-processing (:func:`postprocess_prediction`) and per-category / overall
  (micro) aggregation (:func:`aggregate_by_category`).

Edge case shared by every F1 here: if both token lists are empty the F1 is
1.0, if only one is empty it is 0.0 (SQuAD v2 convention).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "LOCOMO_CATEGORY_NAMES",
    "LOCOMO_SCORED_CATEGORIES",
    "normalize_answer",
    "exact_match",
    "answer_recall",
    "token_f1",
    "f1_from_tokens",
    "normalize_locomo_answer",
    "locomo_tokens",
    "locomo_f1",
    "locomo_multi_answer_f1",
    "locomo_adversarial_score",
    "locomo_gold_answer",
    "postprocess_prediction",
    "score_locomo_answer",
    "score_locomo",
    "aggregate_by_category",
    "locomo_summary_row",
    "canonicalize_locomo_prediction",
    "authors_locomo_f1",
    "authors_locomo_multi_answer_f1",
    "score_locomo_authors",
    "summarize_locomo_authors",
]

#: Category ids of the public LoCoMo file -> reasoning type (LoCoMo paper).
LOCOMO_CATEGORY_NAMES: dict[int, str] = {
    1: "multi_hop",
    2: "temporal",
    3: "open_domain",
    4: "single_hop",
    5: "adversarial",
}
#: The categories the δ-mem authors run and score (category 5 is skipped).
LOCOMO_SCORED_CATEGORIES: tuple[int, ...] = (1, 2, 3, 4)

_PUNCT = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LOCOMO_STOPWORDS = re.compile(r"\b(a|an|the|and)\b")


# --------------------------------------------------------------------------
# SQuAD-style
# --------------------------------------------------------------------------

def _strip_punct(text: str) -> str:
    return "".join(ch for ch in text if ch not in _PUNCT)


def normalize_answer(text: object) -> str:
    """Lowercase, strip ASCII punctuation, drop a/an/the, collapse whitespace."""
    s = _strip_punct(str(text).lower())
    s = _SQUAD_ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: object, gold: object) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_recall(prediction: object, gold: object) -> float:
    """1.0 if the normalised gold answer occurs in the normalised prediction, else 0.0.

    MemoryAgentBench's substring convention (a model that answers "Your locker code
    is 4821." recalled "4821"), matched on whole words: after normalisation both
    sides are padded with a space, so gold "14" is not found in "140" or "3145". An
    empty gold answer counts only against an empty prediction.
    """
    g, p = normalize_answer(gold), normalize_answer(prediction)
    if not g:
        return float(not p)
    return float(f" {g} " in f" {p} ")


def f1_from_tokens(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists."""
    if not pred_tokens or not gold_tokens:
        return float(len(pred_tokens) == len(gold_tokens))
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2.0 * precision * recall / (precision + recall)


def token_f1(prediction: object, gold: object) -> float:
    """SQuAD token F1 on :func:`normalize_answer` tokens."""
    return f1_from_tokens(normalize_answer(prediction).split(), normalize_answer(gold).split())


# --------------------------------------------------------------------------
# LoCoMo-style
# --------------------------------------------------------------------------

_STEMMER = None


def _stem(token: str) -> str:
    global _STEMMER
    if _STEMMER is None:
        from nltk.stem import PorterStemmer  # needs no corpus download

        _STEMMER = PorterStemmer()
    return _STEMMER.stem(token)


def normalize_locomo_answer(text: object) -> str:
    """LoCoMo normalisation: drop commas, NFD, lowercase, strip punctuation,
    drop the words a/an/the/and, collapse whitespace (no stemming)."""
    s = str(text).replace(",", "")
    s = unicodedata.normalize("NFD", s).lower()
    s = _strip_punct(s)
    s = _LOCOMO_STOPWORDS.sub(" ", s)
    return " ".join(s.split())


def locomo_tokens(text: object) -> list[str]:
    """Porter-stemmed tokens of :func:`normalize_locomo_answer`."""
    return [_stem(t) for t in normalize_locomo_answer(text).split()]


def locomo_f1(prediction: object, gold: object) -> float:
    """Token F1 on LoCoMo-normalised, Porter-stemmed tokens."""
    return f1_from_tokens(locomo_tokens(prediction), locomo_tokens(gold))


def locomo_multi_answer_f1(prediction: object, gold: object) -> float:
    """Category-1 F1: split both on ',', then average over the gold parts of
    the best :func:`locomo_f1` against any predicted part."""
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(locomo_f1(p, g) for p in preds) for g in golds) / len(golds)


def locomo_adversarial_score(prediction: object) -> float:
    """Category-5 rule of the LoCoMo paper: 1.0 if the prediction says the
    information is not available ("not mentioned" / "no information available")."""
    p = str(prediction).lower()
    return float("not mentioned" in p or "no information available" in p)


def locomo_gold_answer(gold: object, category: int) -> str:
    """Gold answer as scored: str(); category 3 keeps the text before the first ';'."""
    g = str(gold)
    if int(category) == 3:
        g = g.split(";")[0].strip()
    return g


_LEADING_MARKER = re.compile(r"^\s*(?:answer\s*:|\(?[ab]\))\s*")


def postprocess_prediction(text: object) -> str:
    """First non-empty line, lowercased, stripped, with leading "answer:" and
    option markers "(a)", "(b)", "a)", "b)" removed (repeatedly)."""
    line = ""
    for candidate in str(text).splitlines():
        if candidate.strip():
            line = candidate
            break
    s = line.strip().lower()
    while True:
        stripped = _LEADING_MARKER.sub("", s, count=1)
        if stripped == s:
            break
        s = stripped
    return s.strip()


def score_locomo_answer(
    prediction: object,
    gold: object,
    category: int,
    *,
    score_adversarial: bool = False,
    postprocess: bool = True,
) -> float | None:
    """Score one LoCoMo prediction. Returns None when the question is not
    scored (category 5 with ``score_adversarial=False``, the authors' default)."""
    category = int(category)
    pred = postprocess_prediction(prediction) if postprocess else str(prediction)
    if category == 5:
        return locomo_adversarial_score(pred) if score_adversarial else None
    if category not in LOCOMO_CATEGORY_NAMES:
        raise ValueError(f"unknown LoCoMo category {category!r} (expected 1-5)")
    g = locomo_gold_answer(gold, category)
    if category == 1:
        return locomo_multi_answer_f1(pred, g)
    return locomo_f1(pred, g)


def aggregate_by_category(records: Iterable[tuple[int, float | None]]) -> dict:
    """Aggregate (category, score) pairs; None scores are skipped.

    Returns ``{"overall": micro mean over all scored items (nan if none),
    "n": count, "per_category": {cat: mean}, "counts": {cat: n}}`` with
    categories sorted ascending.
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for category, score in records:
        if score is None:
            continue
        c = int(category)
        sums[c] = sums.get(c, 0.0) + float(score)
        counts[c] = counts.get(c, 0) + 1
    n = sum(counts.values())
    total = sum(sums.values())
    return {
        "overall": total / n if n else math.nan,
        "n": n,
        "per_category": {c: sums[c] / counts[c] for c in sorted(counts)},
        "counts": {c: counts[c] for c in sorted(counts)},
    }


def score_locomo(
    predictions: Sequence[object],
    golds: Sequence[object],
    categories: Sequence[int],
    *,
    score_adversarial: bool = False,
    postprocess: bool = True,
) -> dict:
    """Score aligned lists and aggregate (see :func:`aggregate_by_category`);
    adds ``"scores"``: the per-item scores (None = not scored)."""
    if not (len(predictions) == len(golds) == len(categories)):
        raise ValueError(
            f"length mismatch: {len(predictions)} predictions, {len(golds)} golds, "
            f"{len(categories)} categories"
        )
    scores = [
        score_locomo_answer(p, g, c, score_adversarial=score_adversarial, postprocess=postprocess)
        for p, g, c in zip(predictions, golds, categories)
    ]
    out = aggregate_by_category(zip(categories, scores))
    out["scores"] = scores
    return out


def locomo_summary_row(
    aggregate: Mapping, names: Mapping[int, str] = LOCOMO_CATEGORY_NAMES
) -> dict[str, float]:
    """Flat row for a report table: ``{"cat1_multi_hop": f1, ..., "overall": f1, "n": n}``."""
    row: dict[str, float] = {}
    for c, v in aggregate["per_category"].items():
        c = int(c)
        row[f"cat{c}_{names[c]}" if c in names else f"cat{c}"] = v
    row["overall"] = aggregate["overall"]
    row["n"] = aggregate["n"]
    return row


# --------------------------------------------------------------------------
# LoCoMo, the δ-mem authors' release exactly (locomo_protocol.py); these differ from the
# scorers above in edge cases: an empty prediction or gold scores 0 (not 1 when both are
# empty), category 1 drops empty comma parts, predictions are canonicalised by plain
# substring deletion (which can eat letters inside words: "(samba)" -> "(samb").
# --------------------------------------------------------------------------

def canonicalize_locomo_prediction(raw: str, category: int,
                                   options: Mapping[str, str] | None = None) -> str:
    """The authors' canonical prediction: ``\\"`` -> ``'``, first non-empty line, lowercase,
    category-5 option mapping, then the substrings "(a)", "(b)", "a)", "b)", "answer:"
    deleted in that order."""
    prediction = str(raw).replace('\\"', "'").strip()
    lines = [line.strip() for line in prediction.splitlines() if line.strip()]
    if lines:
        prediction = lines[0]
    lowered = prediction.lower()
    if int(category) == 5 and options is not None:
        if "(a)" in lowered or lowered == "a" or lowered.startswith("a)"):
            return options["a"]
        if "(b)" in lowered or lowered == "b" or lowered.startswith("b)"):
            return options["b"]
        if "no information available" in lowered or "not mentioned" in lowered:
            return "No information available"
    for marker in ("(a)", "(b)", "a)", "b)", "answer:"):
        lowered = lowered.replace(marker, "")
    return lowered.strip()


def authors_locomo_f1(prediction: object, gold: object) -> float:
    """Stemmed token F1; 0.0 if either side has no token (the authors' rule)."""
    p, g = locomo_tokens(prediction), locomo_tokens(gold)
    if not p or not g:
        return 0.0
    return f1_from_tokens(p, g)


def authors_locomo_multi_answer_f1(prediction: object, gold: object) -> float:
    """Category 1: comma parts (stripped, empties dropped); mean over gold parts of the best
    F1 against any predicted part; 0.0 if either list is empty."""
    preds = [p.strip() for p in str(prediction).split(",") if p.strip()]
    golds = [g.strip() for g in str(gold).split(",") if g.strip()]
    if not preds or not golds:
        return 0.0
    return sum(max(authors_locomo_f1(p, g) for p in preds) for g in golds) / len(golds)


def score_locomo_authors(prediction: str, gold: object, category: int) -> float:
    """One question's score as the authors compute it, rounded to 4 places."""
    category = int(category)
    prediction = str(prediction).strip()
    if category == 5:
        low = prediction.lower()
        return float("no information available" in low or "not mentioned" in low)
    answer = str(gold)
    if category == 3:
        answer = answer.split(";")[0].strip()
    if category == 1:
        return round(authors_locomo_multi_answer_f1(prediction, answer), 4)
    return round(authors_locomo_f1(prediction, answer), 4)


def summarize_locomo_authors(records: Iterable[Mapping]) -> dict:
    """``{"overall_score", "num_questions", "category_scores": {"1": {name, score, count}}}``:
    micro means of the per-question (already rounded) scores, rounded to 4 places."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in records:
        c = int(r["category"])
        sums[c] = sums.get(c, 0.0) + float(r["score"])
        counts[c] = counts.get(c, 0) + 1
    n = sum(counts.values())
    return {
        "overall_score": 0.0 if n == 0 else round(sum(sums.values()) / n, 4),
        "num_questions": n,
        "category_scores": {str(c): {"name": LOCOMO_CATEGORY_NAMES.get(c, "unknown"),
                                     "score": round(sums[c] / counts[c], 4), "count": counts[c]}
                            for c in sorted(counts)},
    }
