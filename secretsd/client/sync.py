"""Re-exports ``secretsd_client.sync`` (the light client distribution) under its old name."""

from secretsd_client.sync import *  # noqa: F403
