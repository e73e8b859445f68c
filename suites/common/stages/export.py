"""Stage 13 of the pipeline: convert_export of the prepared model: QDQ ONNX + qparams JSON, checked in onnxruntime
(the suite adds its files in ``on_stage_end(run, "export", result)``: a float twin, metadata, latency)."""
from __future__ import annotations

import os

from suites.common import distributed as D


def export(run, suite, q):
    """Rank 0; returns the core's ExportResult."""
    from ts_qat_pytorch.convert_export import convert_export
    cfg, m = run.config, run.metrics
    out = os.path.join(cfg.out_dir, f"{cfg.arch}_onnx_quantization.onnx")
    qp = os.path.join(cfg.out_dir, f"{cfg.arch}_onnx_quantization_qparams.json")
    with m.timed("export"):
        r = convert_export(getattr(q, "module", q).cpu(), run.data.example, out, opset_version=cfg.opset_version,
                           batch_size=cfg.onnx_batch, qparams_path=qp, **suite.export_options)
        getattr(q, "module", q).to(run.device)
        m.record_export(r, cfg.onnx_batch)
        D.say(f"=> exported {r.onnx_path} ({r.exporter}, opset {r.opset_version}): "
              f"{r.quantized_layers} quantized layers, integer kernels {r.integer_kernels}, "
              f"max |ORT - PyTorch| {r.max_abs_diff}")
        run.stage_end("export", r)
    return r
