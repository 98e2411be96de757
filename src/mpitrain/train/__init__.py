"""Training: trainer, steps, models, checkpoints, run folder, the train and bench commands."""
