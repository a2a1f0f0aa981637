"""RetryPolicy: validation, backoff maths and the retry decision."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sagakit.definition import DEFAULT_COMPENSATION_RETRY, NO_RETRY, RetryPolicy
from sagakit.errors import DefinitionError, InvalidRetryPolicy


def test_defaults_are_valid() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.retry_on == (Exception,)
    assert NO_RETRY.max_attempts == 1
    assert DEFAULT_COMPENSATION_RETRY.max_attempts == 5


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts must be an int >= 1, got 0", id="zero"),
        pytest.param({"max_attempts": -1}, "got -1", id="negative-attempts"),
        pytest.param({"max_attempts": 2.5}, "got 2.5", id="float-attempts"),
        pytest.param({"max_attempts": "3"}, "got '3'", id="str-attempts"),
        pytest.param({"initial_interval": -0.1}, "must be >= 0 seconds", id="initial"),
        pytest.param({"max_interval": -1}, "must be >= 0 seconds", id="max-interval"),
        pytest.param({"backoff": 0.5}, "backoff must be >= 1, got 0.5", id="backoff"),
        pytest.param({"jitter": -0.01}, "jitter must be between 0 and 1", id="jitter-low"),
        pytest.param({"jitter": 1.5}, "got 1.5", id="jitter-high"),
        pytest.param({"jitter": float("nan")}, "jitter", id="jitter-nan"),
        pytest.param({"retry_on": (int,)}, "is not an exception type", id="retry-on-int"),
        pytest.param({"retry_on": ("not a name",)}, "'not a name' in retry_on", id="str"),
        pytest.param({"non_retryable": (ValueError, str)}, "<class 'str'>", id="non-retryable"),
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRetryPolicy) as info:
        RetryPolicy(**kwargs)
    assert reason in info.value.reason
    assert str(info.value) == f"invalid RetryPolicy: {info.value.reason}"
    assert isinstance(info.value, DefinitionError)


def test_bare_exception_class_for_retry_on_is_a_clear_error() -> None:
    with pytest.raises(InvalidRetryPolicy, match="retry_on"):
        RetryPolicy(retry_on=ValueError)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"initial_interval": 0, "max_interval": 0},
        {"backoff": 1},
        {"jitter": 0},
        {"jitter": 1},
        {"retry_on": (OSError, asyncio.CancelledError), "non_retryable": (FileNotFoundError,)},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    policy = RetryPolicy(**kwargs)
    for name, value in kwargs.items():
        assert getattr(policy, name) == value


def test_delay_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(initial_interval=0.1, backoff=2.0, max_interval=100.0, jitter=0)
    delays = [policy.delay(attempt) for attempt in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])


def test_delay_with_other_backoff_and_constant_backoff() -> None:
    triple = RetryPolicy(initial_interval=1.0, backoff=3.0, max_interval=1000.0, jitter=0)
    assert [triple.delay(a) for a in (1, 2, 3, 4)] == pytest.approx([1.0, 3.0, 9.0, 27.0])
    constant = RetryPolicy(initial_interval=0.5, backoff=1.0, jitter=0)
    assert {constant.delay(a) for a in range(1, 20)} == {0.5}


def test_delay_is_capped_at_max_interval() -> None:
    policy = RetryPolicy(initial_interval=0.1, backoff=2.0, max_interval=1.0, jitter=0)
    assert policy.delay(4) == pytest.approx(0.8)
    assert policy.delay(5) == 1.0
    assert policy.delay(6) == 1.0
    assert policy.delay(60) == 1.0


def test_zero_interval_means_no_wait() -> None:
    policy = RetryPolicy(initial_interval=0, max_interval=0, jitter=0.5)
    assert {policy.delay(a, random.Random(a)) for a in range(1, 10)} == {0.0}


def test_delay_for_a_very_late_attempt_is_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5000, max_interval=30.0, jitter=0)
    assert policy.delay(2000) == 30.0


@pytest.mark.parametrize("attempt", range(1, 9))
def test_jitter_stays_within_bounds(attempt: int) -> None:
    policy = RetryPolicy(initial_interval=0.1, backoff=2.0, max_interval=5.0, jitter=0.2)
    base = min(5.0, 0.1 * 2.0 ** (attempt - 1))
    rng = random.Random(1234 + attempt)
    delays = [policy.delay(attempt, rng) for _ in range(500)]
    assert min(delays) >= base * 0.8
    assert max(delays) <= min(base * 1.2, 5.0)
    assert max(delays) - min(delays) > base * 0.1  # it really varies
    if base == 5.0:
        assert max(delays) <= 5.0  # jitter never pushes past the cap


def test_jitter_is_the_documented_formula_for_a_seeded_rng() -> None:
    policy = RetryPolicy(initial_interval=0.2, backoff=2.0, max_interval=100.0, jitter=0.3)
    rng, mirror = random.Random(42), random.Random(42)
    for attempt in range(1, 6):
        base = 0.2 * 2.0 ** (attempt - 1)
        expected = base * (1 + mirror.uniform(-0.3, 0.3))
        assert policy.delay(attempt, rng) == pytest.approx(expected)


def test_seeded_rng_is_reproducible() -> None:
    policy = RetryPolicy(jitter=0.5)
    first = [policy.delay(a, random.Random(7)) for a in range(1, 6)]
    second = [policy.delay(a, random.Random(7)) for a in range(1, 6)]
    assert first == second


def test_full_jitter_is_never_negative() -> None:
    policy = RetryPolicy(initial_interval=1.0, jitter=1.0)
    rng = random.Random(3)
    delays = [policy.delay(1, rng) for _ in range(1000)]
    assert min(delays) >= 0.0
    assert max(delays) <= 2.0


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, True), (2, True), (3, False), (4, False)],
)
def test_should_retry_stops_at_the_last_attempt(attempt: int, expected: bool) -> None:
    assert RetryPolicy(max_attempts=3).should_retry(ValueError("x"), attempt) is expected


def test_no_retry_never_retries() -> None:
    assert NO_RETRY.should_retry(ValueError("x"), 1) is False


def test_should_retry_only_matching_retry_on_including_subclasses() -> None:
    policy = RetryPolicy(max_attempts=5, retry_on=(ConnectionError, TimeoutError))
    assert policy.should_retry(ConnectionResetError("reset"), 1) is True
    assert policy.should_retry(TimeoutError(), 2) is True
    assert policy.should_retry(ValueError("bad input"), 1) is False


def test_non_retryable_wins_over_retry_on() -> None:
    policy = RetryPolicy(max_attempts=5, retry_on=(LookupError,), non_retryable=(KeyError,))
    assert policy.should_retry(IndexError(), 1) is True
    assert policy.should_retry(KeyError("k"), 1) is False


def test_base_exceptions_are_not_retried_by_default() -> None:
    policy = RetryPolicy(max_attempts=5)
    assert policy.should_retry(asyncio.CancelledError(), 1) is False
    assert policy.should_retry(KeyboardInterrupt(), 1) is False


def test_a_name_matches_the_class_name_and_a_remote_handlers_error_type() -> None:
    from sagakit.remote import RemoteStepFailed

    policy = RetryPolicy(max_attempts=3, retry_on=("ServiceUnavailable", TimeoutError))
    glitch = RemoteStepFailed("Pay.Charge", "ServiceUnavailable", "try again")
    declined = RemoteStepFailed("Pay.Charge", "PaymentDeclined", "card declined")
    assert policy.should_retry(glitch, 1)
    assert not policy.should_retry(declined, 1)
    assert policy.should_retry(TimeoutError(), 1)

    class ServiceUnavailable(Exception):
        pass

    assert policy.should_retry(ServiceUnavailable(), 2)
    assert not policy.should_retry(ServiceUnavailable(), 3)  # out of attempts
    never = RetryPolicy(retry_on=(Exception,), non_retryable=("PaymentDeclined",))
    assert not never.should_retry(declined, 1)
    assert never.should_retry(glitch, 1)
