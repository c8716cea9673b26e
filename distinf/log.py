"""One logger, "distinf", writing structured lines to stderr: key=value, or JSON lines.

DISTINF_LOG_LEVEL (default INFO) sets the level, DISTINF_LOG_FORMAT=json switches to JSON lines.
The driver and every actor call `configure()`; an actor's stderr reaches the driver's (and so
`ray job logs`) through Ray's log_to_driver, prefixed with the actor's name and pid. stdout is
left to the command's result (a run's summary), so that a script can read it alone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

logger = logging.getLogger("distinf")

# Attributes every LogRecord has; anything else came in through `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and Ray's workers replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def fields(record: logging.LogRecord) -> dict:
    """time, level, logger, the message, then the fields given with `extra=`."""
    out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
           "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
    out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def _value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    # Quote only what a key=value reader would otherwise split.
    return json.dumps(text) if (not text or any(c in text for c in ' ="\n')) else text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_value(v)}" for k, v in fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record), default=str)


def configure() -> logging.Logger:
    """Give the "distinf" logger its stderr handler once per process, at DISTINF_LOG_LEVEL."""
    level = os.environ.get("DISTINF_LOG_LEVEL", "INFO").upper()
    logger.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        json_lines = os.environ.get("DISTINF_LOG_FORMAT", "").lower() == "json"
        handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
        logger.addHandler(handler)
        logger.propagate = False  # one line per event, whatever the root logger has
    return logger
