"""The math of aggregation: staleness functions, aggregators, server optimizers and the
server step, as pure functions of their inputs. No I/O, no broker or store, and no
process-wide state changed on import (the service sets torch's thread count itself).
"""
