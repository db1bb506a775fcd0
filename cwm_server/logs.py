"""structlog set-up: JSON lines for services, human-readable lines for the CLI.

Logs always go to stderr: stdout belongs to command output (and, for the MCP bridge, to the
protocol itself).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure_logging(style: Literal["json", "human"], level: str = "INFO") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if style == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
