"""Shared pieces of fedq: settings, message schemas, tensor codec, Redis model store, task plugins.

May import only the standard library, numpy, torch and redis: the coordinator and
the worker both build on it and never on each other.
"""
