"""The ``medsight`` command line (Typer): commands are thin calls into the library, rendered
with Rich."""

from medsight.cli.main import app

__all__ = ["app"]
