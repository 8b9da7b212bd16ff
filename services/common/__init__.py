"""Plumbing shared by every Echelon service: servers, logging, metrics, validation."""
