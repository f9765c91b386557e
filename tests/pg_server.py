"""A throwaway PostgreSQL server for the PostgreSQL pass (``OPSBOT_TEST_BACKEND=postgresql``,
see tests/conftest.py), started once per test session.

``OPSBOT_TEST_POSTGRES_URL`` (a server URL whose user may create databases) is used when set.
Otherwise the server binaries (Debian's ``postgresql`` package: /usr/lib/postgresql/*/bin, or
``initdb`` on PATH) start a private server in a temporary folder, reachable only through a unix
socket in that folder. Without either, the tests that need it skip with the reason; with
``CI=true`` they fail instead (a CI run must test both backends).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_user() -> list[str]:
    """initdb refuses root: run the server as ``postgres`` (or ``nobody``) then."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
        except KeyError:
            continue
    return []


class Server:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.bindir: Path | None = None
        self.prefix: list[str] = []

    def start(self) -> str:
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries (install Debian's postgresql "
                               "package, or set OPSBOT_TEST_POSTGRES_URL)")
        self.bindir, self.prefix = bindir, _as_user()
        self.dir = Path(tempfile.mkdtemp(prefix="opsbot-pg-"))
        os.chmod(self.dir, 0o777)
        data = self.dir / "data"
        run = dict(check=True, capture_output=True, text=True)
        subprocess.run([*self.prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], **run)
        subprocess.run([*self.prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l",
                        str(self.dir / "log"), "-w", "-t", "60", "-o",
                        f"-c listen_addresses='' -k {self.dir} -c fsync=off "
                        f"-c synchronous_commit=off -c full_page_writes=off", "start"], **run)
        return f"postgresql://postgres@/postgres?host={quote(str(self.dir), safe='')}"

    def stop(self) -> None:
        if self.dir is None:
            return
        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def server_url(request) -> str:
    """The server's URL for this session (started once), or skip/fail when there is none."""
    cached = getattr(request.config, "_opsbot_pg", None)
    if cached is None:
        url = os.environ.get("OPSBOT_TEST_POSTGRES_URL", "")
        error = ""
        if not url:
            server = Server()
            try:
                url = server.start()
                request.config.add_cleanup(server.stop)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                server.stop()
                detail = getattr(exc, "stderr", "") or ""
                error = f"PostgreSQL not available: {exc} {detail}".strip()
        cached = request.config._opsbot_pg = (url, error)
    url, error = cached
    if error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(error + " (CI=true: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(error)
    return url


TEMPLATE = "opsbot_template"


def _url_of(server: str, name: str) -> str:
    base, _, query = server.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


def migrated_template(request, server: str) -> str:
    """The name of a database on ``server`` holding every migration, made once per session
    (an empty database that the store's own ``open_db`` migrated, then closed: a template
    must have no open connection while it is copied)."""
    name = getattr(request.config, "_opsbot_pg_template", None)
    if name is None:
        import psycopg

        from storage.db import open_db
        name = f"{TEMPLATE}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        db = open_db(_url_of(server, name))
        db.conn.close()
        request.config._opsbot_pg_template = name
    return name


def fresh_database(server: str, template: str | None = None) -> str:
    """Create a database on ``server``; return its URL. Empty without ``template``; else a copy
    of that database (PostgreSQL copies its files: faster than migrating an empty one)."""
    import psycopg
    name = "opsbot_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return _url_of(server, name)
