"""Whole models under headint.intervene: Triton kernels (interpreted) == reference backend."""

import pytest

from backend_model_checks import check_attribution, check_model


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_model_logits_match_reference(name):
    check_model(name, "triton")


def test_attribution_scan_matches_reference():
    check_attribution("gpt2", "triton")
