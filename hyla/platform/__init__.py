"""The training platform: configs, data, checkpoints, tracking and the trainer."""
