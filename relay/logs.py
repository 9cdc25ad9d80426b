"""Logging set-up for `relay serve`: one event per line, text or JSON (`log.format`).

Only the command line calls `configure`; library code just uses `logging.getLogger("relay...")`.
Every line about a message starts with its queue id ("ID: ..."); JSON events carry it as `qid`
too, so a log search for one message finds all of its lines. A traceback stays on its event's
line (newlines written as \n in text, escaped by JSON), so log shippers never split an event.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from relay.config import LogConfig, LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QID = re.compile(r"\b[0-9A-F]{22}\b")  # relay.spool's queue ids


def queue_id(message: str) -> str | None:
    """The first queue id a log message names, if any."""
    m = _QID.search(message)
    return m.group(0) if m else None


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        qid = queue_id(event["message"])
        if qid:
            event["qid"] = qid
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiosmtpd logs every client command at INFO ("mail.log"); keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
