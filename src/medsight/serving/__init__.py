"""Serving: prediction from a run directory (and, later, the REST API, web page and worklist)."""
