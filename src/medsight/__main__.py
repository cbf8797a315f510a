"""``python -m medsight`` runs the command line."""

from medsight.cli import app

app()
