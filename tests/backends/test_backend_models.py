"""Whole models under ``headint.intervene``: every backend gives the reference backend's logits
(tiny GPT-2 and tiny Llama with GQA, a different intervention in every batch row, a left-padded
row) and the same attribution scan."""

from __future__ import annotations

import pytest

from attention_cases import backends_under_test
from backend_model_checks import check_attribution, check_model
from headint.ops import BackendUnavailable


def _or_skip(check, *args):
    """Run a check; a backend that refuses the model's interventions skips with its own reason."""
    try:
        check(*args)
    except BackendUnavailable as e:
        pytest.skip(f"{args[-1]}: {e}")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_model_logits_match_reference(backend, name):
    _or_skip(check_model, name, backend)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_attribution_scan_matches_reference(backend, name):
    _or_skip(check_attribution, name, backend)
