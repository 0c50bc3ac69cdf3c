"""The test harness: real parts for the tests and the scripts (bench, soak).

``daemon``: ``edgeagent run`` as a subprocess, ready when a real sd_notify socket gets
READY=1, with an httpx client over its Unix socket. ``broker``: a real Mosquitto on a free
port, and an MQTT requester. ``fake_engine``: what the scheduler sees of an engine, without
a model, for in-process tests that take milliseconds.

Nothing in the daemon imports this package; it needs the ``dev`` extra (httpx) and the
``mosquitto`` binaries.
"""
