"""Re-exports ``secretsd_client.operations`` (the light client distribution) under its old name."""

from secretsd_client.operations import *  # noqa: F403
