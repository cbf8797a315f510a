"""Workflows that compose the stages into larger jobs: tuning (Optuna), cross-validation,
ensembles and the demo. Each reads and writes ordinary run directories."""
