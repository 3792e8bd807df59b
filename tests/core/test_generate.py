"""generate(): the KV-cache loop against the uncached forward, sampling, stopping and bad arguments (tiny model)."""

import numpy as np
import pytest

import reffuse
from reffuse.errors import ReffuseError
from reffuse.core.generate import generate, next_token


def test_greedy_with_cache_equals_argmax_of_full_forward(tiny64):
    prompt = [5, 17, 42, 7]
    new = generate(tiny64, prompt, 12)
    ids = list(prompt)
    for _ in range(12):  # no cache: the whole sequence again at every step
        ids.append(int(np.argmax(reffuse.forward(tiny64, ids)[-1])))
    assert new == ids[len(prompt):]


def test_tokens_are_streamed_in_order(tiny32):
    seen = []
    new = generate(tiny32, [1, 2, 3], 6, on_token=seen.append)
    assert seen == new and len(new) == 6


def test_stops_after_a_stop_token(tiny32):
    free = generate(tiny32, [1, 2, 3], 8)
    stop = free[3]
    new = generate(tiny32, [1, 2, 3], 8, stop_ids=[stop])
    assert new == free[:free.index(stop) + 1]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny32):
    a = generate(tiny32, [9, 8, 7], 10, temperature=1.0, seed=3)
    b = generate(tiny32, [9, 8, 7], 10, temperature=1.0, seed=3)
    assert a == b
    assert generate(tiny32, [9, 8, 7], 10, temperature=0.7, top_k=1, seed=5) == generate(tiny32, [9, 8, 7], 10)


def test_top_k_only_samples_the_k_best():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.5, -1.0])
    picks = {next_token(logits, 5.0, 2, rng) for _ in range(200)}
    assert picks == {1, 3}


def test_zero_new_tokens(tiny32):
    assert generate(tiny32, [1, 2], 0) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 4, "temperature": -0.5}, "temperature must be >= 0"),
    ({"max_new_tokens": 4, "temperature": 1.0, "top_k": 0}, "top_k must be >= 1"),
])
def test_bad_arguments(tiny32, kwargs, message):
    with pytest.raises(ReffuseError, match=message):
        generate(tiny32, [1, 2], **kwargs)


def test_token_ids_out_of_range(tiny32):
    with pytest.raises(ReffuseError, match=r"token id 99999 at position 1 is out of range"):
        generate(tiny32, [1, 99999], 4)
