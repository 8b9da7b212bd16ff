"""Echelon's gRPC services: thin shells around the transport-free `echelon` library."""
