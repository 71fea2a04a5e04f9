"""The kernel at the bottom of every import: what every part shares. The typed settings, the registry, the slot
grid, meter constants and flags, the typed reading and refusal, certificate making, and waiting for a wake-up.
It imports nothing of the project; every other package may import it."""
