"""The audit log service: a gRPC front for `echelon.audit.TransparencyLog`, and its client."""
