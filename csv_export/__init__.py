"""Per-customer CSV files of 30-minute data (not built yet: issue 4)."""
