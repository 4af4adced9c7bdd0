"""Scorers: hand-worked cases (numbers derived by hand in the comments)."""

import math

import pytest

from deltamem_jax.evaluation import scoring as S

# ---------------------------------------------------------------- SQuAD-style

def test_normalize_answer():
    assert S.normalize_answer("  The Cat,  sat on A mat! ") == "cat sat on mat"
    assert S.normalize_answer("An apple") == "apple"
    # articles only as whole words
    assert S.normalize_answer("theatre Anna") == "theatre anna"
    # 'and' is kept by the SQuAD normaliser
    assert S.normalize_answer("salt and pepper") == "salt and pepper"


def test_exact_match():
    assert S.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert S.exact_match("Eiffel Tower", "Eiffel Towers") == 0.0
    assert S.exact_match(2022, "2022") == 1.0


def test_answer_recall_hand_cases():
    # the gold value inside a sentence reply counts; case, punctuation and articles ignored
    assert S.answer_recall("Your locker code is 4821.", "4821") == 1.0
    assert S.answer_recall("The red lamp is in Bin C-14!", "bin C14") == 1.0
    assert S.answer_recall("It is in the blue crate.", "a blue crate") == 1.0
    # whole words only: "14" is not recalled by "140" or "3145"
    assert S.answer_recall("Bin 140.", "14") == 0.0
    assert S.answer_recall("3145", "14") == 0.0
    # a multi-word gold must appear contiguously and in order
    assert S.answer_recall("Milo is a cat named Luna", "Luna Milo") == 0.0
    assert S.answer_recall("Her name is Nora Lee, I think", "nora lee") == 1.0
    # a wrong value, and an empty reply, do not count
    assert S.answer_recall("Your locker code is 4812.", "4821") == 0.0
    assert S.answer_recall("", "4821") == 0.0
    # an empty gold (after normalisation) only matches an empty prediction
    assert S.answer_recall("", "The.") == 1.0
    assert S.answer_recall("anything", "") == 0.0
    # recall ≥ exact match: equal normalised strings always count
    for p, g in [("Eiffel Tower", "the eiffel tower."), ("4821", "4821")]:
        assert S.exact_match(p, g) == S.answer_recall(p, g) == 1.0


def test_token_f1_hand_cases():
    # pred {cat, sat}, gold {cat, sat, down}: P=1, R=2/3 -> F1 = 0.8
    assert S.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # "big red dog" vs "red dog barks loudly": common {red, dog} = 2, P=2/3, R=2/4 -> 4/7
    assert S.token_f1("big red dog", "red dog barks loudly") == pytest.approx(4 / 7)
    # repeated tokens count with multiplicity: pred [x,x,y], gold [x,y,y]: common x1+y1=2 -> P=R=2/3
    assert S.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert S.token_f1("completely different", "nothing shared") == 0.0
    assert S.token_f1("Paris", "paris.") == 1.0


def test_f1_empty_conventions():
    assert S.token_f1("", "") == 1.0
    assert S.token_f1("the", "an") == 1.0  # both normalise to empty
    assert S.token_f1("", "cat") == 0.0
    assert S.token_f1("cat", "") == 0.0


# ---------------------------------------------------------------- LoCoMo-style

def test_locomo_normalisation_drops_commas_and_and():
    assert S.normalize_locomo_answer("Salt, pepper AND the vinegar.") == "salt pepper vinegar"
    # commas are deleted (not turned into spaces): "1,000" -> "1000"
    assert S.normalize_locomo_answer("1,000 dollars") == "1000 dollars"
    # NFD: the accent is decomposed into a combining mark, the base letter survives
    assert S.normalize_locomo_answer("Café").startswith("cafe")


def test_stemming_effect():
    # SQuAD F1 sees no overlap, stemmed LoCoMo F1 sees identical tokens
    assert S.token_f1("running dogs", "run dog") == 0.0
    assert S.locomo_f1("running dogs", "run dog") == 1.0
    assert S.locomo_tokens("Painting sunsets") == ["paint", "sunset"]
    # 'and' removal: pred {salt, pepper} vs gold {salt, pepper}
    assert S.token_f1("salt and pepper", "salt pepper") == pytest.approx(0.8)
    assert S.locomo_f1("salt and pepper", "salt pepper") == 1.0


def test_multi_answer_f1_category_1():
    # gold parts: "london" -> best 1.0 ; "berlin" -> best 0.0  => mean 0.5
    assert S.locomo_multi_answer_f1("Paris, London", "London, Berlin") == pytest.approx(0.5)
    # order does not matter, all gold parts covered
    assert S.locomo_multi_answer_f1("berlin, london", "London, Berlin") == 1.0
    # gold "pottery, camping, painting", pred "camping and painting" (one part):
    # pred tokens {camp, paint}; each gold part has 1 token: pottery 0,
    # camping F1 = 2*(1/2*1)/(3/2)=2/3, painting 2/3
    # mean = (0 + 2/3 + 2/3)/3 = 4/9
    assert (S.locomo_multi_answer_f1("camping and painting", "pottery, camping, painting")
            == pytest.approx(4 / 9))
    # plain F1 on the same pair differs (commas dropped): pred 2 tokens, gold 3, common 2 -> 0.8
    assert S.locomo_f1("camping and painting", "pottery, camping, painting") == pytest.approx(0.8)
    assert (S.score_locomo_answer("camping and painting", "pottery, camping, painting", 1)
            == pytest.approx(4 / 9))


def test_category_3_gold_cut_at_semicolon():
    gold = "Psychology; counseling certification"
    assert S.locomo_gold_answer(gold, 3) == "Psychology"
    assert S.locomo_gold_answer(gold, 4) == gold
    assert S.score_locomo_answer("psychology", gold, 3) == 1.0
    # without the cut (category 4): pred {psycholog} vs gold {psycholog, counsel, certif}:
    # P=1, R=1/3 -> 0.5
    assert S.score_locomo_answer("psychology", gold, 4) == pytest.approx(0.5)


def test_category_5_skipped_by_default_and_optional_rule():
    assert S.score_locomo_answer("Not mentioned in the conversation", "yes", 5) is None
    assert S.score_locomo_answer("(a) Not mentioned in the conversation", "yes", 5,
                                 score_adversarial=True) == 1.0
    assert S.score_locomo_answer("No information available", "yes", 5,
                                 score_adversarial=True) == 1.0
    assert S.score_locomo_answer("(b) yes", "yes", 5, score_adversarial=True) == 0.0


def test_unknown_category_raises():
    with pytest.raises(ValueError, match="category"):
        S.score_locomo_answer("x", "x", 7)


def test_integer_gold():
    assert S.score_locomo_answer("2022", 2022, 2) == 1.0
    assert S.score_locomo_answer("3", 3, 1) == 1.0


def test_postprocess_prediction():
    assert (S.postprocess_prediction("\n  \nAnswer: (a) Not mentioned\nsecond line")
            == "not mentioned")
    assert S.postprocess_prediction("B) 7 May 2023") == "7 may 2023"
    assert S.postprocess_prediction("answer:  (b)  Paris") == "paris"
    assert S.postprocess_prediction("") == ""
    # markers are only removed at the start
    assert S.postprocess_prediction("Plan a) or b)") == "plan a) or b)"
    # the whole prediction is post-processed before scoring: the second line does not count
    assert S.score_locomo_answer("Answer: Paris\nLondon Berlin Rome", "Paris", 4) == 1.0
    assert S.score_locomo_answer("Answer: Paris\nLondon", "Paris", 4, postprocess=False) < 1.0


def test_aggregate_per_category_and_micro_overall():
    recs = [(1, 1.0), (1, 0.0), (2, 0.5), (4, 1.0), (4, 1.0), (4, 0.5), (5, None)]
    agg = S.aggregate_by_category(recs)
    assert agg["per_category"] == {1: 0.5, 2: 0.5, 4: pytest.approx(5 / 6)}
    assert agg["counts"] == {1: 2, 2: 1, 4: 3}
    # micro: (1+0+0.5+1+1+0.5)/6 = 4/6
    # (a macro mean over categories would be (0.5+0.5+5/6)/3 = 11/18)
    assert agg["overall"] == pytest.approx(4 / 6)
    assert agg["n"] == 6
    empty = S.aggregate_by_category([(5, None)])
    assert empty["n"] == 0 and math.isnan(empty["overall"])


def test_score_locomo_end_to_end_and_summary_row():
    out = S.score_locomo(
        ["Answer: Paris, London", "7 May 2023", "psychology", "no", "not mentioned"],
        ["London, Berlin", "7 May 2023", "Psychology; counseling", "yes", "x"],
        [1, 2, 3, 4, 5],
    )
    assert out["scores"] == [pytest.approx(0.5), 1.0, 1.0, 0.0, None]
    assert out["overall"] == pytest.approx(2.5 / 4)
    row = S.locomo_summary_row(out)
    assert list(row) == ["cat1_multi_hop", "cat2_temporal", "cat3_open_domain", "cat4_single_hop",
                         "overall", "n"]
    assert row["n"] == 4
    with_adv = S.score_locomo(["not mentioned"], ["x"], [5], score_adversarial=True)
    assert with_adv["per_category"] == {5: 1.0}
    with pytest.raises(ValueError, match="length"):
        S.score_locomo(["a"], ["a", "b"], [1, 1])
