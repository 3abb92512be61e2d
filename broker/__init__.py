"""RabbitMQ plumbing for fedq: connection with bounded reconnect, per-job topology,
confirmed publishing, heartbeat-safe consuming and queue depth. Imports only ``common``.
"""
from broker.connection import BrokerError, connect
from broker.topology import Topology

__all__ = ["BrokerError", "Topology", "connect"]
