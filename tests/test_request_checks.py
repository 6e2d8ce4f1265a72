"""ucm_blend_ratio checked at admission (ucm.integration.vllm.request_checks), no engine."""

from types import SimpleNamespace

import pytest

from ucm.integration.vllm.request_checks import check_request_params, ratio_error


@pytest.mark.parametrize("value", [1.5, -0.1, "abc", "0.5", True, None, [0.5]])
def test_unusable_ratios_are_named(value):
    assert "ucm_blend_ratio must be a number in [0, 1]" in ratio_error({"ucm_blend_ratio": value})
    with pytest.raises(Exception, match="ucm_blend_ratio"):
        check_request_params(SimpleNamespace(extra_args={"ucm_blend_ratio": value}))


@pytest.mark.parametrize("extra", [None, {}, {"other": 1}, {"ucm_blend_ratio": 0}, {"ucm_blend_ratio": 1.0}])
def test_usable_or_absent_ratios_pass(extra):
    assert ratio_error(extra) is None
    check_request_params(SimpleNamespace(extra_args=extra))
