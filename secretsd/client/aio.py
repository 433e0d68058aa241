"""Re-exports ``secretsd_client.aio`` (the light client distribution) under its old name."""

from secretsd_client.aio import *  # noqa: F403
