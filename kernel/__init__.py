"""The kernel at the bottom of every import: settings, the registry, the slot grid, meter constants and the
typed reading. It imports nothing of the project; every other package may import it."""
