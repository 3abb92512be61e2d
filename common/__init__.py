"""What the coordinator and the worker share (they never import each other):

``settings``  options from flags, FEDQ_* environment and a TOML job file
``wire``      message schemas, the tensor codec and size limits (no torch)
``store``     the Redis model store, one part per concern, every key in ``store.keys``
``tasks``     task plugins: model, local data, local training, evaluation
``obs``       logs, Prometheus metrics, fault-injection points
"""
