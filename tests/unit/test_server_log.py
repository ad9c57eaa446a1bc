"""uvicorn's own log records become ops lines: JSON, and what a client causes counted, not repeated (t153)."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
from collections.abc import Iterator

import msgspec
import pytest

from gateway.services import server_log
from gateway.services.server_log import ServerLogHandler, say_unsaid, uvicorn_log_config


@pytest.fixture
def uvicorn_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """``uvicorn.error`` configured as serve configures it, with a window of 1 s."""
    monkeypatch.setattr(server_log, "CLIENT_CAUSED_EVERY_S", 1.0)
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    before = [(logger.handlers, logger.level, logger.propagate) for logger in loggers]
    logging.config.dictConfig(uvicorn_log_config())
    logger = logging.getLogger("uvicorn.error")
    logger.setLevel(logging.WARNING)  # serve's log_level
    yield logger
    for handler in loggers[0].handlers:
        handler.close()
    for each, (handlers, level, propagate) in zip(loggers, before, strict=True):
        each.handlers, each.propagate = handlers, propagate
        each.setLevel(level)


def _said(capfd: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    lines = [msgspec.json.decode(line) for line in capfd.readouterr().err.splitlines()]
    for line in lines:
        assert line.pop("pid") == os.getpid() and line.pop("ts")
    return lines


async def test_malformed_requests_are_said_once_a_window_with_their_count(
    uvicorn_logger: logging.Logger, capfd: pytest.CaptureFixture[str]
) -> None:
    for _ in range(50):
        uvicorn_logger.warning("Invalid HTTP request received.")
    uvicorn_logger.warning("Unsupported upgrade request.")
    assert _said(capfd) == [
        {"event": "http_invalid_request", "level": "warning", "count": 1},
        {"event": "http_unsupported_upgrade", "level": "warning", "count": 1},
    ]
    said: list[dict[str, object]] = []
    for _ in range(100):  # the window ends (its timer, late on a busy runner): the 49 since are said
        await asyncio.sleep(0.05)
        said = _said(capfd)
        if said:
            break
    assert said == [{"event": "http_invalid_request", "level": "warning", "count": 49}]
    uvicorn_logger.warning("Invalid HTTP request received.")
    uvicorn_logger.warning("Invalid HTTP request received.")
    assert _said(capfd) == []
    say_unsaid()  # a worker's end
    assert _said(capfd) == [{"event": "http_invalid_request", "level": "warning", "count": 2}]
    await asyncio.sleep(1.2)
    assert _said(capfd) == []  # nothing twice


def test_other_records_are_json_and_name_an_exception_without_its_text(
    uvicorn_logger: logging.Logger, capfd: pytest.CaptureFixture[str]
) -> None:
    uvicorn_logger.info("Started server process")  # below serve's level
    uvicorn_logger.error("Application startup failed. Exiting.")
    try:
        raise ValueError("sk-secret quoted by a client")
    except ValueError:
        uvicorn_logger.exception("Exception in ASGI application\n")
    said = _said(capfd)
    assert said[0] == {
        "event": "server_log", "level": "error", "logger": "uvicorn.error",
        "message": "Application startup failed. Exiting.",
    }  # fmt: skip
    assert said[1]["error"] == "ValueError" and said[1]["where"]
    assert len(said) == 2 and "sk-secret" not in str(said)
    assert isinstance(logging.getLogger("uvicorn").handlers[0], ServerLogHandler)
