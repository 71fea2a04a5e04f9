"""Simulated fleets of LTE-M units."""
