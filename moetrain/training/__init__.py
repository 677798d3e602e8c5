"""Training: the LightningModule, data, optimizer schedule, callbacks and checkpoints."""
