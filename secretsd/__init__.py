"""jarvis-secretsd: a self-hosted secrets daemon whose master key can live in an HSM."""

__version__ = "0.1.0"
