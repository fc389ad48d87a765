"""The names the issues promise users (and tools) keep resolving."""

import importlib

import pytest

PROMISED = [
    "gradsift.per_sample_grads",
    "gradsift.FactorizedGrads",
    "gradsift.adam_preconditioner",
    "gradsift.OnlineTrainer",
    "gradsift.select.filter_then_weight",
    "gradsift.select.alignment_ratio",
    "gradsift.select.get_selector",
    "gradsift.integrations.transformers.GradSiftTrainer",
]


@pytest.mark.parametrize("dotted", PROMISED)
def test_promised_name_is_importable_and_callable(dotted):
    module_name, attr = dotted.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module_name), attr))
