"""Compatibility alias: the assembly moved to ``secretsd.runtime.daemon`` (issue 11's layout).

Kept because scripts written against the previous release import it (see ``secretsd.server``).
"""

from secretsd.runtime.daemon import Daemon, InitResult, initialize_store

__all__ = ["Daemon", "InitResult", "initialize_store"]
