"""Fine-tuning: training data, the Trainer run with its checkpoints, and the runner that owns a fine-tune job."""
