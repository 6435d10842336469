"""Extractive QA's pure parts against hand-worked examples: the official SQuAD v1.1 scores, windows over a long
context with the real MiniLM tokenizer, and span decoding across windows. No Ray, no model weights."""

import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from er_ray.pretrained import PACKAGED_MODELS
from er_ray.tokenizer import qa_tokenizer_for
from er_ray.qa import (QAError, answer_tokens, answers, best_span, exact_match, f1_score, normalize_answer,
                       score_windows, split_by_article, squad_rows, squad_scores, windows)


def test_normalisation_is_the_official_scripts():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("Nov. 5, 1605") == "nov 5 1605"


def test_exact_match_and_f1_take_the_best_reference():
    assert exact_match("the Eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # "in city of paris" vs "paris france": 1 shared token, precision 1/4, recall 1/2 -> F1 1/3;
    # vs "city of paris": 3 shared, precision 3/4, recall 1 -> F1 6/7
    assert f1_score("in the city of Paris", ["Paris, France"]) == pytest.approx(1 / 3)
    assert f1_score("in the city of Paris", ["Paris, France", "the city of Paris"]) == pytest.approx(6 / 7)
    assert f1_score("", ["Paris"]) == 0.0 and f1_score("a", ["the"]) == 0.0  # v1.1: nothing left scores 0
    assert f1_score("Paris Paris", ["Paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets


def test_totals_are_percentages_and_a_missing_answer_scores_zero():
    refs = {"q1": ["Denver Broncos"], "q2": ["Santa Clara, California", "Levi's Stadium"], "q3": ["gold"]}
    preds = {"q1": "the Denver Broncos", "q2": "Levi's Stadium in Santa Clara"}
    s = squad_scores(preds, refs)
    # q1 exact; q2: vs "levis stadium": precision 2/5, recall 1 -> 4/7 (vs "santa clara california": 2/5, 2/3 -> 1/2)
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 4 / 7 + 0) / 3)
    assert s["questions"] == 3


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PACKAGED_MODELS["minilm"].folder(), local_files_only=True)


def qa_tok(max_length, stride):
    return qa_tokenizer_for(str(PACKAGED_MODELS["minilm"].folder()), max_length, stride)


def test_windows_are_transformers_own(tokenizer):
    """er_ray cuts windows with the Rust tokenizer (cache workers do not import transformers); they are the ones
    transformers' fast tokenizer makes for SQuAD (return_overflowing_tokens, only_second, stride)."""
    questions = ["What is it?", "Where?"]
    contexts = [" ".join(f"word{i}" for i in range(300)), "A short context."]
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=64, stride=16,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    wins = windows(qa_tok(64, 16), questions, contexts)
    assert [w.input_ids for w in wins] == enc["input_ids"]
    assert [w.question for w in wins] == enc["overflow_to_sample_mapping"]
    for i, w in enumerate(wins):
        assert w.offsets == [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i],
                                                                          enc.sequence_ids(i))]


def test_a_long_context_becomes_overlapping_windows_that_map_back_to_its_text(tokenizer):
    words = [f"word{i}" for i in range(120)]
    answer = "the golden gate bridge"
    context = " ".join(words[:100]) + f" {answer} " + " ".join(words[100:])
    start = context.index(answer)
    wins = windows(qa_tok(64, 16), ["What is it?", "Short?"], [context, "A short context."], [start, 2],
                   [answer, "short"])
    first = [w for w in wins if w.question == 0]
    assert len(first) > 3 and [w.index for w in first] == list(range(len(first)))
    assert all(len(w.input_ids) <= 64 for w in wins)
    holding = [w for w in first if w.start]
    assert holding, "some window holds the answer"
    for w in holding:  # the answer's tokens map back to exactly its characters
        assert context[w.offsets[w.start][0]:w.offsets[w.end][1]] == answer
    for w in first:  # consecutive windows overlap by about `stride` tokens of context
        assert w.offsets[0] is None and w.input_ids[0] == tokenizer.cls_token_id
    spans = [[o for o in w.offsets if o is not None] for w in first]
    for a, b in zip(spans, spans[1:]):
        assert b[0][0] < a[-1][1], "windows overlap"
    (short,) = [w for w in wins if w.question == 1]
    assert "A short context."[short.offsets[short.start][0]:short.offsets[short.end][1]] == "short"


def test_an_answer_a_window_cuts_is_not_its_answer():
    offsets = [None, None, (0, 5), (6, 11), (12, 17), None]
    assert answer_tokens(offsets, 6, 17) == (3, 4)
    assert answer_tokens(offsets, 7, 9) == (3, 3)  # inside one token
    assert answer_tokens(offsets, 12, 25) == (0, 0)  # runs past the window's context
    assert answer_tokens([None, None], 0, 3) == (0, 0)


def test_the_best_span_over_windows_respects_order_length_and_context():
    context = "alpha beta gamma delta"
    offs_a = [None, (0, 5), (6, 10), (11, 16), None]
    offs_b = [None, (11, 16), (17, 22), None]
    # window a: the best start is the [CLS] position (not context), then "beta"; window b's "gamma delta" beats all
    a_s, a_e = np.array([9.0, 1.0, 3.0, 0.0, 0.0]), np.array([9.0, 0.0, 2.0, 1.0, 0.0])
    b_s, b_e = np.array([0.0, 4.0, 0.0, 0.0]), np.array([0.0, 0.0, 3.5, 0.0])
    assert best_span([a_s, b_s], [a_e, b_e], [offs_a, offs_b], context) == ("gamma delta", 7.5)
    assert best_span([a_s], [a_e], [offs_a], context) == ("beta", 5.0)
    # an end before the start is never taken: "delta" as the only good end and "alpha" after it as the start
    s, e = np.array([0.0, 0.0, 0.0, 5.0, 0.0]), np.array([0.0, 5.0, 0.0, 0.0, 0.0])
    assert best_span([s], [e], [offs_a], context) == ("gamma", 5.0)
    # the length limit: "alpha beta gamma" (3 tokens) is refused at 2, so the best 2-token span wins
    s, e = np.array([0.0, 5.0, 0.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 5.0, 0.0])
    assert best_span([s], [e], [offs_a], context, max_answer_tokens=2) == ("alpha beta", 6.0)
    assert best_span([s], [e], [offs_a], context, max_answer_tokens=3) == ("alpha beta gamma", 10.0)
    text, score = best_span([np.zeros(2)], [np.zeros(2)], [[None, None]], context)
    assert text == "" and math.isinf(score)


def _squad(answer_start=16, question="Where is it?"):
    return json.dumps({"version": "1.1", "data": [
        {"title": "Tower", "paragraphs": [{"context": "The tower is in Paris, by the river.", "qas": [
            {"id": "q1", "question": question, "answers": [{"text": "Paris", "answer_start": answer_start},
                                                            {"text": "in Paris", "answer_start": 13}]},
            {"id": "q2", "question": "What is it by?", "answers": [{"text": "the river", "answer_start": 26}]}]}]},
        {"title": "Bridge", "paragraphs": [{"context": "A bridge.", "qas": [
            {"id": "q3", "question": "What?", "answers": [{"text": "bridge", "answer_start": 2}]}]}]}]}).encode()


def test_squad_files_give_a_row_per_question_and_name_a_bad_row():
    rows = squad_rows(_squad(), "dev.json")
    assert rows["id"] == ["q1", "q2", "q3"] and rows["title"] == ["Tower", "Tower", "Bridge"]
    assert rows["answer_text"][0] == "Paris" and rows["answers"][0] == ["Paris", "in Paris"]
    assert rows["context"][1][rows["answer_start"][1]:].startswith("the river")
    with pytest.raises(QAError, match=r"dev.json, row 1, field 'answer_start': answer 'Paris' is not at character 3"):
        squad_rows(_squad(answer_start=3), "dev.json")
    with pytest.raises(QAError, match=r"dev.json, row 1, field 'question': empty question"):
        squad_rows(_squad(question=" "), "dev.json")


def test_dev_and_test_are_split_by_article_the_same_way_every_time():
    titles = [f"article{i % 10}" for i in range(200)]
    split = split_by_article(titles, seed=0)
    assert split == split_by_article(titles, seed=0) and split != split_by_article(titles, seed=1)
    by_article = {t: {s for tt, s in zip(titles, split) if tt == t} for t in set(titles)}
    assert all(len(s) == 1 for s in by_article.values())  # no article (no context) on both sides
    assert sorted(s for (s,) in by_article.values()).count("dev") == 5


def test_windows_decoded_back_give_the_answers_and_full_marks(tokenizer):
    """Windows -> logits that point at each window's labelled answer tokens -> answers -> EM and F1 of 100: the
    pieces fit (offsets, the windows' labels, decoding across windows and the scores)."""
    filler = " ".join(f"filler{i}" for i in range(150))
    contexts = [f"{filler} The capital of France is Paris. {filler}", "Ottawa is the capital of Canada."]
    refs = [("Paris", contexts[0].index("Paris")), ("Ottawa", 0)]
    wins = windows(qa_tok(96, 32), ["What is the capital of France?", "Which city is Canada's capital?"], contexts,
                   [s for _, s in refs], [t for t, _ in refs])
    assert len(wins) > 4
    starts, ends = [], []
    for w in wins:
        s, e = np.zeros(len(w.input_ids)), np.zeros(len(w.input_ids))
        s[w.start] += 5.0  # a window without the answer points at its first token ([CLS], not context)
        e[w.end] += 5.0
        starts.append(s), ends.append(e)
    got = answers(wins, starts, ends, ["fr", "ca"], contexts)
    assert got == {"fr": "Paris", "ca": "Ottawa"}
    assert squad_scores(got, {"fr": ["Paris"], "ca": ["Ottawa", "Ottawa, Ontario"]})["exact_match"] == 100.0
    # Scored as training scores them, beside the trivial answer (the context's first five words): "Ottawa is the
    # capital of" against "Ottawa" is 1 of 4 tokens once "the" goes (F1 0.4); the fillers share nothing with "Paris".
    ids, ctx = ["fr", "ca"], dict(zip(["fr", "ca"], contexts))
    refs_ = {"fr": ["Paris"], "ca": ["Ottawa", "Ottawa, Ontario"]}
    scored = score_windows([(ids[w.question], w.offsets, ctx[ids[w.question]], refs_[ids[w.question]], s, e)
                            for w, s, e in zip(wins, starts, ends)])
    assert scored == {"f1": 1.0, "exact_match": 1.0, "examples": 2, "baseline_f1": 0.2}


def test_a_cache_shard_of_questions_is_a_row_per_window(tmp_path):
    """The cache build's first stage on real SQuAD questions (no Ray: the stage is a plain function): a row per
    window, ids `<question id>#<window>`, each token's context characters, the question's hash on each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from er_ray.cache_build import plan_shards
    from er_ray.corpus import Corpus, doc_hashes, read_ids
    from er_ray.shard_encoder import tokenize_shard
    from er_ray.tasks import load_task

    dev = load_task("squad").splits["dev"].slice(0, 20)
    pq.write_table(dev, tmp_path / "q.parquet")
    corpus = Corpus([str(tmp_path / "q.parquet")], "id", "question", False, "context")
    (plan,) = plan_shards(read_ids(corpus), set(), 64)
    t = tokenize_shard(pa.Table.from_pylist([plan]), folder=str(PACKAGED_MODELS["minilm"].folder()), max_length=96,
                       id_column="id", text_column="question", token_classification=False, skip_bad_rows=False,
                       context_column="context")
    assert set(t.column("question_id").to_pylist()) == set(dev.column("id").to_pylist()) and t.num_rows > 20
    hashes = doc_hashes(corpus)
    contexts = dict(zip(dev.column("id").to_pylist(), dev.column("context").to_pylist()))
    for r in t.to_pylist():
        q, w = r["id"].rsplit("#", 1)
        assert q == r["question_id"] and r["doc_sha256"] == hashes[q] and r["planned"] == 20
        assert len(r["offset_start"]) == len(r["input_ids"]) <= 96
        inside = [(a, b) for a, b in zip(r["offset_start"], r["offset_end"]) if a >= 0]
        assert inside and r["offset_start"][0] == -1 and all(0 <= a < b <= len(contexts[q]) for a, b in inside)
    # the windows of a question are the ones er_ray.qa cuts for training from text
    first = [r for r in t.to_pylist() if r["question_id"] == dev.column("id")[0].as_py()]
    wins = windows(qa_tok(96, 32), [dev.column("question")[0].as_py()], [dev.column("context")[0].as_py()])
    assert [r["input_ids"] for r in first] == [w.input_ids for w in wins]
