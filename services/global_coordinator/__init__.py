"""The global coordinator: participation windows, secure aggregation, outer optimizer."""
