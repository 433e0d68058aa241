"""Re-exports ``secretsd_client.settings_source`` (the light client distribution) under its old name."""

from secretsd_client.settings_source import *  # noqa: F403
