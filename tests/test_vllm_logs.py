"""route_ucm_logs: ucm's records through vLLM's logger, unless vLLM or the user says otherwise."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from ucm.integration.vllm.logs import route_ucm_logs, routed


@pytest.fixture
def loggers():
    """The ucm and vllm loggers, restored after the test (routing is process-wide)."""
    ucm, vllm = logging.getLogger("ucm"), logging.getLogger("vllm")
    saved = [(lg, lg.parent, lg.level, list(lg.handlers), lg.propagate) for lg in (ucm, vllm)]
    ucm.handlers.clear()
    ucm.setLevel(logging.NOTSET)
    ucm.propagate, ucm.parent = True, logging.getLogger()
    captured: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = captured.append
    vllm.handlers[:] = [handler]
    vllm.setLevel(logging.INFO)
    vllm.propagate = False
    yield ucm, captured
    for lg, parent, level, handlers, propagate in saved:
        lg.parent, lg.handlers[:], lg.propagate = parent, handlers, propagate
        lg.setLevel(level)


def config(configure: bool = True, path: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(configure_logging=configure, pylogging_config_file=path)


def test_records_reach_vllms_handlers_at_vllms_level(loggers):
    ucm, captured = loggers
    assert route_ucm_logs(config()) and routed()
    child = logging.getLogger("ucm.integration.vllm.connector")
    child.info("ucm request r: 5 tokens")
    child.debug("not at vLLM's level")
    assert [r.getMessage() for r in captured] == ["ucm request r: 5 tokens"]
    logging.getLogger("vllm").setLevel(logging.DEBUG)  # vLLM reconfigured later: followed
    child.debug("now shown")
    assert captured[-1].getMessage() == "now shown"


def test_repeated_calls_are_harmless(loggers):
    ucm, captured = loggers
    assert route_ucm_logs(config()) and route_ucm_logs(config())
    logging.getLogger("ucm.x").warning("once")
    assert len(captured) == 1


def test_vllm_not_configuring_logging_leaves_it_alone(loggers):
    assert not route_ucm_logs(config(configure=False)) and not routed()


def test_env_switch_is_read_without_a_config(loggers, monkeypatch):
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")
    assert not route_ucm_logs() and not routed()
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "1")
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    assert route_ucm_logs() and routed()


@pytest.mark.parametrize("setup", ["handler", "level", "no_propagate"])
def test_a_users_own_ucm_config_wins(loggers, setup):
    ucm, captured = loggers
    if setup == "handler":
        ucm.addHandler(logging.NullHandler())
    elif setup == "level":
        ucm.setLevel(logging.DEBUG)
    else:
        ucm.propagate = False
    assert not route_ucm_logs(config()) and not routed()


def test_a_logging_file_naming_ucm_wins(loggers, tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"version": 1, "loggers": {"ucm.integration": {"level": "DEBUG"}}}))
    assert not route_ucm_logs(config(path=str(own))) and not routed()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"version": 1, "loggers": {"vllm": {"level": "DEBUG"}}}))
    assert route_ucm_logs(config(path=str(other))) and routed()
