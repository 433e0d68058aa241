"""Defaults shared by the daemon and the client, kept import-light for the CLI's start-up time."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
DEFAULT_LISTEN = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
DEFAULT_ADDR = f"http://{DEFAULT_LISTEN}"
