"""Per-customer CSV files of 30-minute data."""
