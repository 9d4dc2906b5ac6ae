"""The procedural VQA generator: determinism, disjoint splits, question types, scoring, baseline."""

import hashlib

import numpy as np
import pytest

from backends.tiny import (QUESTION_TYPES, generate_split, make_sample, normalize_answer, question_only_baseline,
                           score_answer)
from backends.tiny.data import COLORS, IMAGE_SIZE, SHAPES


def _fingerprint(sample):
    return hashlib.sha1(sample.image.tobytes() + sample.question.encode()).hexdigest()


def test_generator_is_deterministic_by_seed():
    first, second = generate_split("test", 50), generate_split("test", 50)
    for a, b in zip(first, second):
        assert a.question == b.question and a.reference == b.reference and a.question_type == b.question_type
        np.testing.assert_array_equal(a.image, b.image)
    other_seed = generate_split("test", 50, seed=1)
    assert sum(_fingerprint(a) == _fingerprint(b) for a, b in zip(first, other_seed)) == 0


def test_sample_is_a_pure_function_of_split_index_seed():
    s = generate_split("validation", 10, start=5)[3]
    again = make_sample("validation", 8)
    assert s.sample_id == again.sample_id == 8
    np.testing.assert_array_equal(s.image, again.image)


def test_splits_are_disjoint():
    prints = {split: {_fingerprint(s) for s in generate_split(split, n)}
              for split, n in (("train", 1500), ("validation", 500), ("test", 1000))}
    assert len(prints["validation"]) == 500 and len(prints["test"]) == 1000
    assert not prints["train"] & prints["validation"]
    assert not prints["train"] & prints["test"]
    assert not prints["validation"] & prints["test"]


def test_samples_are_well_formed_and_cover_every_question_type():
    samples = generate_split("test", 400)
    assert {QUESTION_TYPES[s.question_type] for s in samples} == set(QUESTION_TYPES)
    words = set(COLORS) | set(SHAPES) | {"yes", "no"} | {str(i) for i in range(6)}
    for s in samples:
        assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert s.split == "test" and s.reference
        assert set(s.reference.split()) <= words
    lengths = {len(s.reference.split()) for s in samples}
    assert lengths >= {1, 2}, "some answers must take several tokens"


def test_answers_match_the_scene():
    for s in generate_split("train", 300):
        objects = s.meta["objects"]
        qtype = QUESTION_TYPES[s.question_type]
        if qtype == "count" and "objects" in s.question:
            colour = s.question.split()[2]
            assert int(s.reference) == sum(o["color"] == colour for o in objects)
        elif qtype == "exists":
            _, _, _, colour, shape = s.question.rstrip("?").split()
            present = any(o["color"] == colour and o["shape"] == shape for o in objects)
            assert s.reference == ("yes" if present else "no")
        elif qtype == "color":
            shape = s.question.rstrip("?").split()[-1]
            assert [o["color"] for o in objects if o["shape"] == shape] == [s.reference]


def test_normalize_and_score_answers():
    assert normalize_answer("  Two. ") == "2"
    assert normalize_answer("A red Circle!") == "red circle"
    assert normalize_answer("the circle, square") == "circle square"
    assert score_answer("Yes", "yes") == 1.0
    assert score_answer("three", "3") == 1.0
    assert score_answer("red", "red circle") == 0.0
    assert score_answer("", "no") == 0.0


def test_question_only_baseline_is_well_below_perfect():
    result = question_only_baseline(generate_split("train", 2000), generate_split("test", 500))
    assert 0.2 < result["overall"] < 0.5
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    assert result["per_type"]["color"] < 0.4  # four colours, balanced: the image is needed


@pytest.mark.parametrize("bad", [dict(split="dev"), dict(split="test", n=-1), dict(split="test", n=2.5)])
def test_bad_inputs_raise(bad):
    with pytest.raises(ValueError):
        generate_split(**bad)
    with pytest.raises(ValueError):
        make_sample("test", -3)


def test_expected_answer_length_follows_the_question_type(tiny_backend):
    from backends.tiny.data import QUESTION_TYPES

    by_type = tiny_backend.expected_new_tokens_by_type
    largest, count = QUESTION_TYPES.index("largest"), QUESTION_TYPES.index("count")
    assert by_type[largest] == 2 and by_type[count] == 1  # "red circle" versus "3"
    samples = tiny_backend.samples("validation")[:40]
    full = tiny_backend.knob_space.full()
    for s in samples:
        expected = tiny_backend.expected_token_counts(s, full).new_tokens
        assert expected == by_type[s.question_type]  # from the question type, never the reference
