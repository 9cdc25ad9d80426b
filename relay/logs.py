"""Logging set-up for `relay serve`: one event per line, text or JSON (`log.format`).

Only the command line calls `configure`; library code just uses `logging.getLogger("relay...")`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from relay.config import LogConfig, LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def configure(config: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiosmtpd logs every client command at INFO ("mail.log"); keep only its warnings.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
