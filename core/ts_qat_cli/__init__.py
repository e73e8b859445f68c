"""The command-line programs that need only the library, installed with it as console scripts:

    ts-qat-inspect           onnx_inspect.py     an exported file's Q/DQ parameters, ORT int8 against its float QDQ
                                                 reference, which ops run as integer kernels and why not; --profile
    ts-qat-checkpoint        qat_checkpoint.py   info / strip (the DDP 'module.' prefix) / to-float of a checkpoint
    ts-qat-mixed-precision   mixed_precision.py  per-layer sensitivity and the bits an integer LP picks under a budget
    ts-qat-deploy-check      deploy_check.py     an exported file through a deployment toolchain against onnxruntime

Each is ``main(argv=None) -> int``; from a checkout, ``python tools/<module>.py`` runs the same program. The other
programs in tools/ work over the suites and run from a checkout only.
"""
