"""Cumulative register readings to exact 30-minute energy, and the store that keeps both."""
