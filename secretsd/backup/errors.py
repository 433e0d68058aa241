"""What a backup file can be found to be: damaged (integrity) or not made by this store's keyring
(authenticity). Both are refused before anything is imported."""

from __future__ import annotations

from secretsd.errors import SecretsdError


class BackupError(SecretsdError):
    """The backup cannot be used."""


class BackupCorruptError(BackupError):
    """The backup file is damaged, truncated or not a secretsd backup (integrity)."""


class BackupForgedError(BackupError):
    """The backup's manifest is not authenticated by the store's keyring (authenticity)."""


class BackupKeyError(BackupError):
    """No configured key provider unwraps the backup's keyring."""
