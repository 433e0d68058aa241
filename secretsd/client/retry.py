"""Re-exports ``secretsd_client.retry`` (the light client distribution) under its old name."""

from secretsd_client.retry import *  # noqa: F403
