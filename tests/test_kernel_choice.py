"""KernelChoice: one reading of an implementation switch, its lazy kernel and its give-up."""

from __future__ import annotations

import logging

import pytest

from ucm.config_checks import UcmConfigError
from ucm.kernel_choice import KernelChoice, triton_unavailable


def _choice(**kw) -> KernelChoice:
    return KernelChoice("UCM_TEST_KERNEL", ("auto", "torch", "triton"), **kw)


def test_values_are_validated_and_default_to_the_first(monkeypatch):
    choice = _choice()
    monkeypatch.delenv("UCM_TEST_KERNEL", raising=False)
    assert choice.mode() == "auto" and not choice.forced()
    monkeypatch.setenv("UCM_TEST_KERNEL", " Torch ")
    assert choice.mode() == "torch"
    monkeypatch.setenv("UCM_TEST_KERNEL", "banana")
    with pytest.raises(UcmConfigError, match=r"UCM_TEST_KERNEL: must be one of auto, torch, triton, got 'banana'"):
        choice.mode()
    with pytest.raises(ValueError, match="banana"):  # the start check says the same
        choice.check("cpu")
    monkeypatch.setenv("UCM_TEST_KERNEL", "triton")
    assert choice.forced()


def test_a_forced_kernel_that_cannot_run_is_refused_at_start(monkeypatch):
    choice = _choice(label="test kernel")
    monkeypatch.setenv("UCM_TEST_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in triton_unavailable("cpu")
    with pytest.raises(UcmConfigError, match=r"UCM_TEST_KERNEL: 'triton' asks for the test kernel.*auto, torch"):
        choice.check("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs it on CPU (triton is a test dependency)
    choice.check("cpu")
    monkeypatch.setenv("UCM_TEST_KERNEL", "torch")
    monkeypatch.delenv("TRITON_INTERPRET")
    choice.check("cpu")  # the torch path needs no Triton


def test_the_module_is_imported_once_and_a_missing_one_warns_once(caplog):
    assert _choice(module_name="ucm.kernel_choice").module().__name__ == "ucm.kernel_choice"
    missing = _choice(module_name="ucm.no_such_kernel", label="test kernel")
    with caplog.at_level(logging.WARNING, logger="ucm.kernel_choice"):
        assert missing.module() is None and missing.module() is None
    assert caplog.text.count("test kernel unavailable") == 1


def test_give_up_is_for_the_process_and_warned_once(caplog):
    choice = _choice(label="test kernel", fallback="torch ops")
    with caplog.at_level(logging.WARNING, logger="ucm.kernel_choice"):
        choice.give_up(RuntimeError("no compiler"))
        choice.give_up(RuntimeError("again"))
    assert choice.broken == "RuntimeError: no compiler"
    assert caplog.text.count("test kernel failed") == 1 and "torch ops from now on" in caplog.text
    choice.reset()
    assert choice.broken is None
