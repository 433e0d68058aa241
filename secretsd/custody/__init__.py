"""Key custody: the barrier, the keyring, the configured key providers, the crypto module."""
