"""Whole models under headint.intervene: native CPU kernel == reference backend."""

import pytest

from backend_model_checks import check_attribution, check_model


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_model_logits_match_reference(name):
    check_model(name, "cpu")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_attribution_scan_matches_reference(name):
    check_attribution(name, "cpu")
