"""Training: the loop (trainer), its handlers, optimisers and schedules, the frozen-backbone
feature cache and optional experiment loggers."""
