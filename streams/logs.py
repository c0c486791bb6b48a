"""One log format for the workers, library lines included, and repeated warnings held back during an outage.

Every line is `<time> level=<LEVEL> logger=<name> event=<name> key=value ...`. The workers' own lines already are
`event=<name> key=value` (streams.metrics.log_kv); a line from Faust, aiokafka, mode or librdkafka becomes
`event=log msg="<its text>"` (JSON-quoted, so it stays one line), with `exc="<traceback>"` when it carries one.

A warning or error whose template (logger, level, text with its numbers masked) was already printed within the
last `every` seconds is counted, not printed; the next one printed says `repeated=<n held back>`. A broker outage
that made aiokafka log 3,260 connection errors prints a few lines a minute.
"""

from __future__ import annotations

import json
import logging
import re
import time

_NUMBERS = re.compile(r"\d+")


class KeyValueFormatter(logging.Formatter):
    """`<time> level=<LEVEL> logger=<name> event=...`: see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if not text.startswith("event="):
            text = f"event=log msg={json.dumps(text, ensure_ascii=False)}"
        if record.exc_info:
            text += f" exc={json.dumps(self.formatException(record.exc_info), ensure_ascii=False)}"
        held = getattr(record, "repeated", 0)
        if held:
            text += f" repeated={held}"
        return f"{self.formatTime(record)} level={record.levelname} logger={record.name} {text}"


class RepeatFilter(logging.Filter):
    """Passes a WARNING-or-above template once per `every` seconds; counts the rest (see the module docstring)."""

    def __init__(self, every: float = 30.0, clock=time.monotonic) -> None:
        super().__init__()
        self.every = every
        self.clock = clock
        self._last: dict[tuple, float] = {}
        self._held: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, _NUMBERS.sub("#", str(record.msg))[:200])
        now = self.clock()
        if now - self._last.get(key, -float("inf")) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        record.repeated = self._held.pop(key, 0)
        if len(self._last) > 10_000:  # templates are few; bound the memory anyway
            self._last.clear()
        return True


def install(every: float = 30.0, logger: logging.Logger | None = None) -> None:
    """Give every handler of `logger` (default: the root logger) the key=value format and the repeat filter.
    Idempotent. Call it after the framework configured its logging (Faust does so when its worker starts)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not isinstance(handler.formatter, KeyValueFormatter):
            handler.setFormatter(KeyValueFormatter())
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter(every))
