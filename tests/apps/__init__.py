"""Celery apps of the test suite: the suite never depends on the example handlers in ``tasks/``."""
