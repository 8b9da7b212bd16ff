"""Echelon: cross-organization LoRA adaptation with secure, audited, aggregate-only exchange.

This package holds the transport-free algorithms (configuration, training, secure
aggregation, outer optimization, audit records); the gRPC services wrap it.
"""

__version__ = "0.1.0"
