"""The runtime's sampler on hand-made logits: greedy without a copy picks what float64 would, the
penalty and the filters work in the sampler's own buffer and never change the caller's logits."""

import numpy as np

from hovle_edge.runtime.sampling import Sampler, SamplingParams


def test_greedy_picks_the_first_of_equal_maxima_as_float64_would():
    logits = np.array([0.5, 3.25, -1.0, 3.25], dtype=np.float32)
    assert Sampler(SamplingParams())(logits, []) == 1 == int(np.argmax(logits.astype(np.float64)))


def test_repetition_penalty_changes_the_choice_but_not_the_callers_logits():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    before = logits.copy()
    assert Sampler(SamplingParams(repetition_penalty=1.1))(logits, [0]) == 1  # 2.0 / 1.1 < 1.9
    assert Sampler(SamplingParams(repetition_penalty=1.1))(logits, [2]) == 0  # -1.0 * 1.1 changes nothing
    np.testing.assert_array_equal(logits, before)


def test_top_k_keeps_only_the_k_best_and_leaves_the_logits_alone():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    before = logits.copy()
    best = set(np.argsort(-logits)[:3].tolist())
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=1))
    drawn = {sampler(logits, []) for _ in range(200)}
    assert drawn <= best and len(drawn) > 1  # a high temperature reaches beyond the first, never past the third
    np.testing.assert_array_equal(logits, before)
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=2))(logits, []) == int(np.argmax(logits))
