"""SamplingParams validation and the batched Sampler (greedy, seeded, top-k, top-p)."""

from __future__ import annotations

import math

import pytest
import torch

from offramp.engine.sampling import Sampler, SamplingParams

# -- SamplingParams -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "x"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.0),
        ("seed", "x"),
        ("stop", [""]),
        ("stop", [3]),
    ],
)
def test_invalid_sampling_param_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**{field: value})


PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
ONE_HOT = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ONE_HOT),  # the default is greedy
        ({"temperature": 0.0}, ONE_HOT),
        ({"temperature": 1e-6}, ONE_HOT),  # below GREEDY_EPS
        ({"temperature": 1.0}, PROBS),
        ({"temperature": 2}, PROBS.sqrt() / PROBS.sqrt().sum()),  # p ** (1 / T), renormalized
        ({"temperature": 1.0, "top_p": 1.0}, PROBS),
        ({"temperature": 1.0, "top_p": 0.01}, ONE_HOT),
        ({"temperature": 1.0, "top_p": 0.7}, torch.tensor([0.5, 0.25, 0, 0, 0]) / 0.75),
        ({"temperature": 1.0, "top_k": 0}, PROBS),  # 0 disables top-k
        ({"temperature": 1.0, "top_k": 2}, torch.tensor([0.5, 0.25, 0, 0, 0]) / 0.75),
        ({"temperature": 1.0, "top_k": 5}, PROBS),
    ],
)
def test_valid_sampling_params_give_the_distribution_they_describe(kwargs: dict, expected: torch.Tensor) -> None:
    """Each accepted setting, as the sampler applies it to one row whose probabilities are known."""
    params = SamplingParams(**kwargs)
    logits = PROBS.log()
    if params.is_greedy:
        picks = {Sampler()(logits[None, :], [params], [gen(seed)])[0] for seed in range(20)}
        dist = torch.zeros(5).index_fill(0, torch.tensor(sorted(picks)), 1.0 / len(picks))
    else:
        dist = Sampler.probs(logits, params)
    torch.testing.assert_close(dist, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"max_tokens": 1}, {"seed": 0}, {"seed": None}, {"stop": []}])
def test_settings_the_engine_applies_are_accepted(kwargs: dict) -> None:
    """Accepted here; what they do (stop after one token, reproducible draws, no stop strings) is
    tested where they act: test_engine.py and the seeded-draw tests below."""
    SamplingParams(**kwargs)


def test_stop_given_as_a_string_becomes_a_list() -> None:
    assert SamplingParams(stop="END").stop == ["END"]


def test_stop_as_empty_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="^stop:"):
        SamplingParams(stop="")


def test_is_greedy_only_at_zero_temperature() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


# -- Sampler ------------------------------------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits: torch.Tensor, params: SamplingParams, seed: int, n: int) -> list[int]:
    """``n`` draws from one row with one generator."""
    sampler, g = Sampler(), gen(seed)
    return [sampler(logits[None, :], [params], [g])[0] for _ in range(n)]


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor(
        [
            [0.1, 3.0, -1.0, 2.9],
            [5.0, 4.0, 3.0, 2.0],
            [-3.0, -2.0, -1.0, -0.5],
        ]
    )
    greedy = SamplingParams(temperature=0.0, top_k=2, top_p=0.5)  # top-k/top-p do not matter when greedy
    out = Sampler()(logits, [greedy] * 3, [None, gen(0), None])
    assert out == [1, 0, 3]
    assert all(isinstance(t, int) for t in out)


def test_greedy_and_sampled_rows_in_one_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(), SAMPLED]
    out = Sampler()(logits, params, [None, gen(1), None, gen(2)])
    argmax = logits.argmax(-1).tolist()
    assert out[0] == argmax[0] and out[1] == argmax[1] and out[2] == argmax[2]
    assert out[3] == Sampler()(logits[3:4], [SAMPLED], [gen(2)])[0]  # the draw its own generator gives


def test_same_seed_reproduces_the_same_tokens() -> None:
    logits = torch.zeros(100)  # uniform: every draw is a real coin flip
    assert draw(logits, SAMPLED, seed=1234, n=50) == draw(logits, SAMPLED, seed=1234, n=50)


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(100)
    assert draw(logits, SAMPLED, seed=1, n=50) != draw(logits, SAMPLED, seed=2, n=50)


def test_seeded_row_does_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    alone = Sampler()(logits[1:2], [SAMPLED], [gen(42)])
    batched = Sampler()(logits, [SAMPLED, SAMPLED, SAMPLED], [gen(7), gen(42), gen(9)])
    assert batched[1] == alone[0]


def test_top_k_1_always_returns_the_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64)
    params = SamplingParams(temperature=5.0, top_k=1)  # hot: without top-k, the argmax would rarely win
    assert set(draw(logits, params, seed=0, n=300)) == {int(logits.argmax())}


def test_top_k_never_returns_a_token_outside_the_k_largest() -> None:
    torch.manual_seed(2)
    logits = torch.randn(50)
    k = 5
    top = set(torch.topk(logits, k).indices.tolist())
    params = SamplingParams(temperature=10.0, top_k=k)
    seen = set(draw(logits, params, seed=3, n=2000))
    assert seen <= top
    assert seen == top  # and all k stay reachable


def test_top_k_larger_than_vocab_keeps_every_token() -> None:
    logits = torch.zeros(6)
    assert set(draw(logits, SamplingParams(temperature=1.0, top_k=100), seed=5, n=500)) == set(range(6))


def test_small_top_p_always_returns_the_top_token() -> None:
    probs = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05])
    logits = probs.log()
    params = SamplingParams(temperature=1.0, top_p=0.1)
    assert set(draw(logits, params, seed=0, n=500)) == {0}


@pytest.mark.parametrize(
    "top_p, support",
    [
        (0.45, {2}),  # 0.5 alone reaches 0.45
        (0.55, {2, 0}),  # 0.5 < 0.55 <= 0.5 + 0.25
        (0.7, {2, 0}),
        (0.8, {2, 0, 4}),  # 0.75 < 0.8 <= 0.9
        (0.95, {2, 0, 4, 1}),  # 0.9 < 0.95 <= 0.97
        (0.99, {2, 0, 4, 1, 3}),  # 0.97 < 0.99
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p: float, support: set[int]) -> None:
    probs = torch.tensor([0.25, 0.07, 0.5, 0.03, 0.15])  # sorted: 2 (0.5), 0, 4, 1, 3
    logits = probs.log()
    seen = set(draw(logits, SamplingParams(temperature=1.0, top_p=top_p), seed=11, n=3000))
    assert seen == support


def test_top_p_order_does_not_depend_on_token_position() -> None:
    # Same distribution as above but permuted: the kept set follows the probabilities, not the ids.
    probs = torch.tensor([0.03, 0.15, 0.07, 0.25, 0.5])
    seen = set(draw(probs.log(), SamplingParams(temperature=1.0, top_p=0.8), seed=4, n=3000))
    assert seen == {4, 3, 1}


def test_top_k_and_top_p_combine() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 leaves 0.4/0.9, 0.3/0.9, 0.2/0.9 -> cumulative 0.44, 0.78, 1.0; top_p=0.7 keeps two.
    seen = set(draw(probs.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.7), seed=8, n=3000))
    assert seen == {0, 1}


def test_temperature_sharpens_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0])
    cold = draw(logits, SamplingParams(temperature=0.05), seed=0, n=500)
    hot = draw(logits, SamplingParams(temperature=1.0), seed=0, n=500)
    assert cold.count(0) == 500
    p = math.e / (math.e + 3)  # ~0.475 at temperature 1
    sigma = math.sqrt(500 * p * (1 - p))  # ~11 draws
    assert abs(hot.count(0) - 500 * p) < 5 * sigma, hot.count(0)


@pytest.mark.parametrize("temperature", [1e-3, 1e-20, 1e-40, 1e-300])
def test_tiny_positive_temperature_acts_like_greedy(temperature: float) -> None:
    # SamplingParams accepts any finite temperature > 0, so the sampler must handle it: as the
    # temperature goes to 0 the distribution collapses onto the argmax.
    params = SamplingParams(temperature=temperature)
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    assert Sampler()(logits, [params], [gen(0)]) == [2]
