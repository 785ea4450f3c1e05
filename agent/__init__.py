"""The Flux agent: runs on database, Docker and gateway hosts and executes jobs."""

__version__ = "0.1.0"
