"""Checks of deploy/: Prometheus configurations and alert rules, the Grafana dashboard."""
