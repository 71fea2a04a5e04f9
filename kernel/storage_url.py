"""What a storage URL's scheme says, known to the settings and to the writer process alike: this module imports
nothing, so that the writer (which needs no settings) starts without loading pydantic."""

from __future__ import annotations

POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # storage URLs that name a PostgreSQL database
