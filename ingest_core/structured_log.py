"""Structured JSON-lines logs (structlog) in the log folder, one file per component.

One event per line with an ISO UTC timestamp. Callers pass facts (account, address,
fingerprint, byte counts), never key material, passwords or file contents.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

_configured: dict[str, logging.Logger] = {}
_lock = threading.Lock()


def _stdlib_logger(log_dir: Path, component: str, echo: bool) -> logging.Logger:
    name = f"sis_ingest.{component}"
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"{component}.jsonl", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if echo:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    return logger


def get_logger(log_dir: Path, component: str, echo: bool = False, **bound: Any) -> Any:
    """A structlog logger that writes JSON lines to ``<log_dir>/<component>.jsonl``."""
    key = f"{log_dir}:{component}"
    with _lock:
        std = _configured.get(key)
        if std is None:
            std = _stdlib_logger(log_dir, component, echo)
            _configured[key] = std
    return structlog.wrap_logger(
        std,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        component=component,
        **bound,
    )


def read_events(log_dir: Path, component: str) -> list[dict[str, Any]]:
    """Parse a component's JSON-lines log (for `ingestctl activity` and tests)."""
    import json

    path = log_dir / f"{component}.jsonl"
    events: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return events
