"""The ingest benchmark: ``python -m bench`` (``./dev bench``); see ``bench/README.md``."""
