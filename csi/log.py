"""Logging set-up: human-readable lines by default, one JSON object a line on request.

Extra fields given with ``extra={...}`` are kept in both formats, so request logs carry the
RPC name and the volume they act on.

The call context: the server's interceptor opens ``call_context`` around each call, and
every line logged in it (by the services, the backends, the subprocess runner) carries
that call's ``request_id``, added by the filter ``setup`` installs. The services name the
backend that serves the call with ``set_backend``, for the call's summary and metrics."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

REQUEST_ID = "request_id"

_request_id: ContextVar[str | None] = ContextVar("cairn_request_id", default=None)
_backend: ContextVar[str] = ContextVar("cairn_backend", default="")


@contextmanager
def call_context(request_id: str) -> Iterator[None]:
    """Lines logged inside carry ``request_id``; the backend starts unknown."""
    id_token = _request_id.set(request_id)
    backend_token = _backend.set("")
    try:
        yield
    finally:
        _backend.reset(backend_token)
        _request_id.reset(id_token)


def request_id() -> str | None:
    """The ID of the call this thread serves, or None outside a call."""
    return _request_id.get()


def set_backend(name: str) -> None:
    """Name the backend serving the current call (no effect outside a call)."""
    if _request_id.get() is not None:
        _backend.set(name)


def backend() -> str:
    """The backend serving the current call, or "" while none is known."""
    return _backend.get()


class RequestIdFilter(logging.Filter):
    """Adds the current call's ``request_id`` to each record logged inside a call."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _request_id.get()
        if current is not None and not hasattr(record, REQUEST_ID):
            setattr(record, REQUEST_ID, current)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    if REQUEST_ID in extras:  # first, so it is easy to find on a long line
        extras = {REQUEST_ID: extras.pop(REQUEST_ID), **extras}
    return extras


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())
        return line


def setup(level: str = "info", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
