"""Benchmarks for fedq (run from the repository root: ``.venv/bin/python bench/throughput.py``)."""
