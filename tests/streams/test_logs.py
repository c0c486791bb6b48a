"""The workers' log format and the repeat filter (pure logging, no broker)."""

from __future__ import annotations

import io
import logging

from streams.logs import KeyValueFormatter, RepeatFilter, install


def _logger(name: str, clock) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    install(every=30.0, logger=logger)
    handler.filters[0].clock = clock
    return logger, out


def test_library_lines_become_one_key_value_line():
    logger, out = _logger("test.logs.format", clock=lambda: 0.0)
    logger.info("event=batch events=%d", 5)
    logger.info('Unable to connect to "%s":\nretrying', "broker:9092")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("level=INFO logger=test.logs.format event=batch events=5")
    assert lines[1].endswith('event=log msg="Unable to connect to \\"broker:9092\\":\\nretrying"')


def test_repeated_warnings_are_held_back_and_counted():
    now = [0.0]
    logger, out = _logger("test.logs.repeat", clock=lambda: now[0])
    for i in range(100):  # an outage: the same error with another number each time
        logger.error("Unable connect to node with id %d: attempt %d", 1, i)
        logger.info("event=batch events=%d", i)  # info lines are never held back
        now[0] += 1.0
    lines = out.getvalue().splitlines()
    errors = [line for line in lines if "level=ERROR" in line]
    assert len(errors) == 4  # t = 0, 30, 60, 90
    assert "repeated" not in errors[0] and errors[1].endswith("repeated=29")
    assert sum("event=batch" in line for line in lines) == 100


def test_install_is_idempotent():
    logger, _ = _logger("test.logs.twice", clock=lambda: 0.0)
    install(logger=logger)
    [handler] = logger.handlers
    assert isinstance(handler.formatter, KeyValueFormatter)
    assert sum(isinstance(f, RepeatFilter) for f in handler.filters) == 1
