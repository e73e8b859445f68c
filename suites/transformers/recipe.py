"""The transformers suite's recipes: the flags' defaults without --data (EMBEDDED: MiniLM on the Jane Austen task),
with it (GENERAL) and under --smoke; evaluate.py's command line reads its defaults from them too."""

EMBEDDED = dict(
    passage_lines=5, max_length=96, train_per_class=600, test_per_class=None,
    # float fine-tune of MiniLM with its new head (cached): one pass over the 3 600 training passages
    float_epochs=1, float_lr=2e-4,
    # QAT: 40 steps of 32, kd from the float model
    epochs=1, qat_steps=40, batch_size=32, lr=1e-5, optim="adamw", weight_decay=0.0, clip_grad_norm=1.0,
    backend="ONNXRuntime", calib_batches=8, distill_method="kd", distill_alpha=0.9, temperature=2.0,
    print_freq=10, workers=0, val_batch_size=64, onnx_batch=8,
)
GENERAL = dict(EMBEDDED, passage_lines=None, max_length=128, train_per_class=None, float_epochs=0, float_lr=2e-5,
               qat_steps=None, lr=2e-5, calib_batches=16, print_freq=50)
SMOKE = dict(train_per_class=8, test_per_class=4, qat_steps=2, calib_batches=1, batch_size=8, float_images=16,
             latency_repeats=2, print_freq=1)
EMBEDDED_MODEL = "all-MiniLM-L6-v2"
