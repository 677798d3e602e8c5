"""Training: the LightningModule, data, callbacks and checkpoints (the optimizer config, schedule and dense
AdamW live in :mod:`moetrain.optim`)."""
