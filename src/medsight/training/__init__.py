"""Training: the loop (trainer), its plan (budget: epochs, validation cadence, time budget), its
handlers, optimisers and schedules, the frozen-backbone feature cache and optional experiment
loggers."""
