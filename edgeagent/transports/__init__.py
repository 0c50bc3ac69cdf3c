"""Transports: the ways in for requests (the Unix socket, MQTT).

Each one frames bytes and talks to the model only through the serving interface
(:class:`edgeagent.serving.ServingClient`); the daemon builds and wires them. They do not
import each other, nor the daemon (import-linter contracts in pyproject.toml).
"""
