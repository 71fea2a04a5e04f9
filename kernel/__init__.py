"""The kernel at the bottom of every import: what every part shares. The typed settings, the registry and the
emission factors, the slot grid, meter constants and flags, CO2 arithmetic, the typed reading and refusal, how a
file's bad lines are told, certificate making, and waiting for a wake-up.
It imports nothing of the project; every other package may import it."""
