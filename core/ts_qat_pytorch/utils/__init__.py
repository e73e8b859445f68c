"""Utilities: state switches (``state``), checkpoints (``utils``), registry and logging."""
