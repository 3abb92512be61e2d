"""The privacy accountant and settings (common/privacy.py)."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedq.common import privacy
from fedq.common.privacy import PrivacyError, PrivacySettings


def composed_directly(noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(range(2, 257)))
    event = dp_accounting.GaussianDpEvent(noise)
    if rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("noise", "rate", "steps"), [(1.0, 0.1, 100), (3.4, 0.15, 1180), (1.1, 1.0, 15), (20, 1, 967)])
def test_epsilon_is_the_accountants_for_that_many_steps(noise, rate, steps):
    # One step's RDP, computed once and scaled by the steps, is exactly the accountant's composition.
    assert privacy.epsilon(noise, rate, steps, 1e-5) == pytest.approx(composed_directly(noise, rate, steps, 1e-5))


def test_one_steps_rdp_is_computed_once_per_noise_and_rate():
    privacy._rdp_of_one_step.cache_clear()
    for steps in range(1, 50):
        privacy.epsilon(2.0, 0.05, steps, 1e-5)
    assert privacy._rdp_of_one_step.cache_info().misses == 1


def test_epsilon_grows_with_steps_and_shrinks_with_noise_and_sampling():
    assert privacy.epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(1.0, 1.0, 10, 1e-5) < privacy.epsilon(1.0, 1.0, 20, 1e-5)
    assert privacy.epsilon(2.0, 1.0, 10, 1e-5) < privacy.epsilon(1.0, 1.0, 10, 1e-5)
    assert privacy.epsilon(1.0, 0.1, 10, 1e-5) < privacy.epsilon(1.0, 1.0, 10, 1e-5)


@pytest.mark.parametrize(
    ("settings", "sentence"),
    [
        (dict(mode="sideways"), "unknown --dp 'sideways'"),
        (dict(mode="local"), "--dp local needs --dp-clip"),
        (dict(mode="central", clip=1.0, noise_multiplier=0.0), "without noise nothing is private"),
        (dict(mode="central", clip=1.0, delta=1.5), "--dp-delta must lie in (0, 1)"),
        (dict(mode="local", clip=1.0, population=100), "--dp-population is for --dp central"),
        (dict(mode="central", clip=1.0, on_budget="shrug"), "--dp-on-budget must be one of stop, warn"),
    ],
)
def test_settings_that_promise_nothing_are_refused_in_one_sentence(settings, sentence):
    with pytest.raises(PrivacyError, match=sentence.replace("(", r"\(").replace(")", r"\)")):
        PrivacySettings(**settings)


def test_the_sampling_rate_assumes_nothing_without_a_population():
    assert PrivacySettings("central", clip=1.0).sample_rate(10) == 1.0
    assert PrivacySettings("central", clip=1.0, population=100).sample_rate(10) == 0.1
    assert PrivacySettings("central", clip=1.0, population=5).sample_rate(10) == 1.0


def test_the_summary_line_says_mode_epsilon_delta_steps_and_budget():
    config = PrivacySettings("central", clip=0.5, noise_multiplier=1.1, epsilon_budget=8).config()
    line = privacy.summary(config, 3.2104, 120)
    assert line == (
        "central DP, epsilon 3.21 (delta 1e-05) after 120 noised steps; clip 0.5, noise multiplier 1.1; budget 8"
    )
    assert privacy.summary({"algorithm": "fedbuff"}, None, None) is None
