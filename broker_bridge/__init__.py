"""Telegrams from the MQTT broker into the store, acknowledged only after commit."""
