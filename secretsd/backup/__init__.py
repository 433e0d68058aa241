"""Backups of a whole store: one file, authenticated by the keyring, restored into an empty store.

``format`` is the file (writer, reader, manifest), ``keys`` the manifest's key, ``create`` the
snapshot written out, ``restore`` the checks and the import. Settings-level assembly (which store,
which providers, the audit record) is in ``secretsd.runtime.backup``; the command in
``secretsd.cli.backup``. docs/backup.md describes the format and the checks.
"""
