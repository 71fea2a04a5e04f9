"""Metrics, detection of missing data, reports and alerts (not built yet: issue 6)."""
