"""``--log-format json``: one JSON object per line, the same fields as the text lines.

A connection line (``trio_tproxy.conn``) or a refusal carries its fields in
``record.conn`` (set by :mod:`.proxy`); they become the object's keys next to
``time``, ``level``, ``logger`` and ``message`` (the text line, so nothing is
lost for a reader that only shows messages).  Any other line has the four
common keys only.  Every connection's object names it: ``direction``,
``src`` (the peer address accept() gave) and ``dst`` (the original
destination).
"""

from __future__ import annotations

import datetime as dt
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        conn = getattr(record, "conn", None)
        if isinstance(conn, dict):
            obj.update(conn)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)
