"""The package logger: ``ts_qat_pytorch``. The library never prints; applications configure logging."""
import logging

logger = logging.getLogger("ts_qat_pytorch")


def set_log_level(level: int | str) -> None:
    """Accepts logging levels or the manual's 0 (debug) .. 3 (error)."""
    if isinstance(level, int) and 0 <= level <= 3:
        level = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR][level]
    logger.setLevel(level)
