"""The boundary agent: one per organization; owns its workers, exports only aggregates."""
