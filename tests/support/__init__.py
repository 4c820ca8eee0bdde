"""Helpers shared by the test suite (importable as `support.*`: pyproject's pytest `pythonpath`)."""
