"""The coordinator: staleness weighting, aggregation, server optimizers and the service loop.

The math (``staleness``, ``aggregation``, ``server_optimizers``) is pure functions
on arrays, testable without a broker; ``service`` is the thin loop around it.
"""
