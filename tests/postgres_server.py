"""A throwaway PostgreSQL server in a temporary directory, for the tests that need a real one.

    with PostgresServer.start() as pg:      # initdb + pg_ctl start (a few seconds)
        url = pg.create_database("t1")      # postgresql://astraea@127.0.0.1:PORT/t1
        pg.pause(); pg.resume()             # a server restart, its data kept

initdb refuses to run as root, so as root the data directory belongs to the `postgres` user
and every server command runs as that user (runuser); as anyone else they run directly.
`find_bin_dir()` returns None where no PostgreSQL binaries are installed: the only case a
test may skip for.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "astraea"  # the superuser initdb creates (-U); trust auth, loopback only


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: Debian's versioned path first, then PATH."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and \
                os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path, root: Path, port: int, as_user: str | None) -> None:
        self.bin_dir, self.root, self.port, self.as_user = bin_dir, root, port, as_user
        self.data = root / "data"
        self.fsync = False  # see start()

    def _run(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\nserver log:\n{self.log()}")
        return done.stdout

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text()[-4000:]
        except OSError:
            return ""

    @classmethod
    def start(cls, bin_dir: Path | None = None, fsync: bool = False) -> PostgresServer:
        """`fsync=False` (tests): commits still reach the server before they are
        acknowledged, so a killed client loses exactly what it would with fsync, but the
        server skips flushing to disk, which only a crash of the machine would show, and
        stops in a second instead of tens on a loaded machine."""
        bin_dir = bin_dir or find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
        # A short path: the server's Unix socket goes in it too (sun_path holds ~107 bytes).
        root = Path(tempfile.mkdtemp(prefix="astraea-pg-"))
        as_user = None
        if os.geteuid() == 0:
            as_user = "postgres"
            pw = pwd.getpwnam(as_user)  # KeyError: no such user, a setup problem worth seeing
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = cls(bin_dir, root, _free_port(), as_user)
        server.fsync = fsync
        try:
            server._run("initdb", "-D", str(server.data), "-A", "trust", "-U", USER,
                        "--no-sync", "-E", "UTF8")
            server.resume()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def pause(self) -> None:
        """Stop the server, keeping its data (its clients' connections are cut)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server (again) on the same port and data."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options + ("" if self.fsync else " -c fsync=off"),
                  "-w", "-t", "120", "start")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
