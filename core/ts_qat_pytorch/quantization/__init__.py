"""Quantization machinery shared by the backends: tracing, the operator table, qconfigs."""
from .op_table import OP_TABLE, OpRow, markdown_table
from .qconfig import QConfig
from .tracer import QuantTracer, TraceFailure, trace_model

__all__ = ["OP_TABLE", "OpRow", "markdown_table", "QConfig", "QuantTracer", "TraceFailure", "trace_model"]
