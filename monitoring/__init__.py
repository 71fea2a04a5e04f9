"""Metrics, detection of missing data, reports and alerts."""
