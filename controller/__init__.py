"""The Flux controller: catalog, HTTP API for the CLI, and the agents' gRPC service."""

__version__ = "0.1.0"
