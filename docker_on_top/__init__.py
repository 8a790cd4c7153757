"""docker-on-top: a Docker volume plugin giving containers a copy-on-write view of a host folder."""

__version__ = "0.2.0"
