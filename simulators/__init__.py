"""Simulated fleets of LTE-M units (not built yet: issue 3)."""
