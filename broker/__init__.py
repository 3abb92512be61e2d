"""RabbitMQ plumbing for fedq: connection with bounded reconnect, per-job topology,
confirmed publishing, heartbeat-safe consuming and queue depth. Imports only ``common``.
"""
from fedq.broker.connection import BrokerError, connect
from fedq.broker.topology import Topology

__all__ = ["BrokerError", "Topology", "connect"]
