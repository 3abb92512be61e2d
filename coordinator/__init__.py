"""The coordinator, in three rooms:

``algorithms``  the math (staleness, aggregation, server optimizers, the server step): pure, no I/O
``service``     the loop around it: validation, scheduling, dispatch, commit, its CLI
``ops``         operator tools that run anywhere: status, monitor, report, history, replay, rollback, demo
"""
