"""The stages of the one pipeline, one file each, in the order suites/common/runner.py ``run`` calls them; each is a
function of ``(run, suite, ...)`` (suites/common/run.py) and tells the suite when it is done
(``run.stage_end(stage, result)`` -> ``Suite.on_stage_end``):

    checks.py            1. checks before long work (--resume, --model-path, --deploy, the quantization plan)
    float_model.py       2. the float model: built, its weights, the fine-tune (cached) or --not-qat training
    evaluate.py          3. evaluation in PyTorch (float, QAT) and of post-training steps
    teacher.py           4. the distillation teacher
    float_tools.py       5. --cle, --smoothquant on the float model
    mixed_precision.py   6. --mixed-precision: sensitivity search, bit allocation
    prepare.py           7. prepare_by_platform with the run's quantization plan
    calibrate.py         8. calibration
    bias_correction.py   9. --bias-correction
    ptq_recon.py        10. --ptq-recon: PTQ reconstruction
    qat.py              11. QAT epochs (train, evaluate, checkpoint, export)
    checkpoint.py       12. the checkpoint files of an epoch
    export.py           13. the QDQ ONNX export
    accuracy_control.py 14. --max-drop
    analysis.py         15. --profile, --sensitivity
    ort_eval.py         16. onnxruntime evaluation, --deploy targets
"""
