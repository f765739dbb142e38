"""DeepSpeed set-up, the train/eval loop, losses, metrics, checkpoints and run logs."""
