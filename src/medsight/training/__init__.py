"""Training: optimisers and schedules, the frozen-backbone feature cache, and the Trainer."""
