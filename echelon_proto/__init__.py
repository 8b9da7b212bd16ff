"""Generated protobuf and gRPC code for Echelon; do not edit (make proto)."""
