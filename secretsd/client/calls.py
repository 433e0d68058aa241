"""Re-exports ``secretsd_client.calls`` (the light client distribution) under its old name."""

from secretsd_client.calls import *  # noqa: F403
