"""Serving: the REST API, the web page and the triage worklist of a trained run (prediction
itself is :mod:`medsight.inference`)."""
