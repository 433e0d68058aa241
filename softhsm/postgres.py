"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temporary directory.

Part of the pytest plugin users install (moved from ``tests/postgres_fixture.py`` by issue 15): the
``postgres_server`` fixture is registered by ``softhsm.pytest_plugin`` and is opt-in in the only way
that costs nothing: a server starts only in a session where some test asks for it.

* ``PostgresServer.start()`` runs ``initdb`` and ``pg_ctl start`` on a free loopback port (TCP on
  127.0.0.1 only, plus a unix socket inside the temporary directory). The superuser role has a
  password generated for this session; TCP connections must use it (scram-sha-256), connections
  over the private socket are trusted.
* ``postgres_server`` (session fixture) starts one per test session and stops it at the end
  (``pg_ctl stop -m immediate``), removing the directory.
* ``fresh_database(server)`` (an async context manager) creates a database with a unique name and
  drops it afterwards, so each test starts empty.

PostgreSQL refuses to run as root, and CI runs as root: then initdb and pg_ctl run as the
``postgres`` system user through ``runuser``, and the directory is handed to that user. Debian keeps
the server binaries in ``/usr/lib/postgresql/<version>/bin``, off the PATH; ``SECRETSD_TEST_PG_BINDIR``
overrides the search.

Without the binaries the fixture skips, except under CI (``CI`` set), where a missing PostgreSQL is
a broken build and fails loudly.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

BINDIR_ENV = "SECRETSD_TEST_PG_BINDIR"
SUPERUSER = "secretsd_test"
RUN_AS = "postgres"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _ci():
        pytest.fail(f"PostgreSQL is required under CI but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def _version_key(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/postgresql/([\d.]+)/bin", bindir)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def find_bindir() -> Path | None:
    """The directory with initdb and pg_ctl: the override, Debian's newest, or the PATH."""
    override = os.environ.get(BINDIR_ENV)
    candidates: list[str] = [override] if override else []
    if not override:
        debian = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
        candidates += sorted(debian, key=_version_key, reverse=True)
        # A /usr/local/bin/pg_ctl symlink, or a server on the PATH (Homebrew, other distributions).
        for name in ("initdb", "pg_ctl"):
            local = f"/usr/local/bin/{name}"
            found = shutil.which(name) or (local if os.path.exists(local) else None)
            if found:
                candidates.append(os.path.dirname(os.path.realpath(found)))
    for directory in candidates:
        path = Path(directory)
        if all(os.access(path / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    user: str = SUPERUSER
    startup_seconds: float = 0.0
    _as_user: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def dsn(self, database: str = "postgres", *, password: bool = True) -> str:
        """A TCP connection URI, with the password unless told otherwise."""
        auth = f"{self.user}:{quote(self.password, safe='')}" if password else self.user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def socket_dsn(self, database: str = "postgres") -> str:
        """A URI over the private unix socket, where no password is needed."""
        return f"postgresql://{self.user}@/{database}?host={quote(str(self.socket_dir), safe='')}&port={self.port}"

    # -- lifecycle --------------------------------------------------------------------------------
    def _cmd(self, tool: str, *args: str) -> list[str]:
        return [*self._as_user, str(self.bindir / tool), *args]

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True, timeout=timeout,  # noqa: S603
                              cwd=self.root, check=False)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    @classmethod
    def start(cls, bindir: Path) -> PostgresServer:
        """initdb and pg_ctl start in a new temporary directory (as the ``postgres`` user when run as root)."""
        began = time.monotonic()
        root = Path(tempfile.mkdtemp(prefix="secretsd-pg-"))  # mode 0700
        server = cls(bindir=bindir, root=root)
        try:
            server._prepare()
            server._initdb()
            for attempt in range(3):  # the free port may be taken between probe and bind
                server.port = free_port()
                try:
                    server._run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60",
                                "-o", server._server_options(), "start")
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        except BaseException:
            server._remove()
            raise
        server.startup_seconds = time.monotonic() - began
        return server

    def _prepare(self) -> None:
        self.socket_dir.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            # PostgreSQL will not run as root: hand the directory to the postgres system user.
            account = pwd.getpwnam(RUN_AS)
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._as_user = [shutil.which("runuser") or "runuser", "-u", RUN_AS, "--"]

    def _initdb(self) -> None:
        args = ["-D", str(self.data), "-U", self.user, "--pwfile", str(self.root / "pwfile"),
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync",
                "--no-instructions"]
        help_text = subprocess.run([str(self.bindir / "initdb"), "--help"], capture_output=True, text=True,  # noqa: S603
                                   check=False).stdout
        if "--locale-provider" in help_text:
            # A linguistic default collation, as production databases often have: queries that
            # depend on byte order must say so (COLLATE "C") or fail here.
            args += ["--locale-provider=icu", "--icu-locale=en-US", "--locale=C.UTF-8"]
        else:
            args += ["--locale=C.UTF-8"]
        if "--no-instructions" not in help_text:
            args.remove("--no-instructions")
        self._run("initdb", *args, timeout=120)
        (self.root / "pwfile").unlink()

    def _server_options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            # A throwaway server: durability is not what these tests are about.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    def stop(self) -> None:
        """``pg_ctl stop -m immediate`` and remove the directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def start_or_skip() -> PostgresServer:
    """Start a server, or skip (fail under CI) when PostgreSQL is not installed."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("initdb/pg_ctl were not found in /usr/lib/postgresql/*/bin, on the PATH or in "
                     f"${BINDIR_ENV} (apt-get install postgresql)")
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            _unavailable(f"running as root and there is no '{RUN_AS}' user to run the server as")
        if shutil.which("runuser") is None:
            _unavailable("running as root and runuser (util-linux) is missing")
    try:
        return PostgresServer.start(bindir)
    except RuntimeError as exc:
        pytest.fail(f"the throwaway PostgreSQL server did not start: {exc}", pytrace=False)
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway server for the session, started only if a test asks for it.

    Skips without PostgreSQL (fails under CI)."""
    server = start_or_skip()
    try:
        yield server
    finally:
        server.stop()


_counter = iter(range(1, 1 << 30))


@asynccontextmanager
async def fresh_database(server: PostgresServer) -> AsyncIterator[str]:
    """Create an empty database with a unique name; yield its name; drop it afterwards."""
    import asyncpg

    name = f"t_{os.getpid()}_{next(_counter)}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(server.socket_dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield name
    finally:
        admin = await asyncpg.connect(server.socket_dsn())
        try:
            # FORCE: a test that failed half-way may have left connections behind.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
