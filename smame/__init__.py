"""smame: meter-reading backend for SmaMe II LTE-M communication units."""

__version__ = "0.1.0"
