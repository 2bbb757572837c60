"""One structured logging style for every process.

``AGENTMESH_LOG_FORMAT=json`` writes one JSON object per line (time, level,
logger, event, and any ``extra`` fields); ``text`` writes the same fields as
``key=value`` pairs. Secrets never reach a log call: keys are represented by
``SigningKey`` whose repr shows only the DID.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from agentmesh.settings import Settings

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={v}" for k, v in fields.items())


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(settings.log_format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # One line per outgoing HTTP request is noise at INFO; keep their warnings.
    for noisy in ("httpx", "httpcore", "mcp.server.streamable_http_manager"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
