"""The throwaway PostgreSQL server now lives in the installed pytest plugin: ``softhsm/postgres.py``.

The test modules keep importing these names from here; the ``postgres_server`` fixture comes from
the plugin itself.
"""

from softhsm.postgres import (
    BINDIR_ENV,
    RUN_AS,
    SUPERUSER,
    PostgresServer,
    find_bindir,
    free_port,
    fresh_database,
    start_or_skip,
)

__all__ = [
    "BINDIR_ENV",
    "RUN_AS",
    "SUPERUSER",
    "PostgresServer",
    "find_bindir",
    "free_port",
    "fresh_database",
    "start_or_skip",
]
