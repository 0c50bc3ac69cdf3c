"""edgeagent: an LLM daemon for IoT gateways."""
__version__ = "0.1.0"
