"""Real services on loopback for the team tests: a PostgreSQL cluster of our own, moto's S3 server,
an MLflow tracking server backed by both, and a proxy that can cut the line to it.

PostgreSQL refuses to run as root: as root the cluster is made and run as the `postgres` user of
Debian's package (or `nobody`). `.ci/run` installs the package where the machine lacks it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

S3_KEYS = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed (Debian: apt-get install postgresql); "
                           ".ci/run installs it")
    return Path(found[-1]).parent


class Postgres:
    """A throwaway cluster on 127.0.0.1 with trust authentication and one database, `mlflow`."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="captioning-pg-"))
        self.port = free_port()
        self.user = []
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.dir, name)
            self.user = ["runuser", "-u", name, "--"]
        os.chmod(self.dir, 0o700)
        bin_dir = postgres_bin()
        self._run(bin_dir / "initdb", "-D", self.dir / "data", "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        self._run(bin_dir / "pg_ctl", "-D", self.dir / "data", "-l", self.dir / "log", "-w", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}", "start")
        self.bin_dir = bin_dir
        self.create("mlflow")

    def create(self, database: str) -> str:
        """A new database; its SQLAlchemy URI for MLflow."""
        self._run(self.bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", database)
        return self.uri(database)

    def uri(self, database: str = "mlflow") -> str:
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/{database}"

    def _run(self, *args) -> None:
        subprocess.run([*self.user, *map(str, args)], check=True, capture_output=True, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run([*self.user, str(self.bin_dir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class S3:
    """moto's S3 server on loopback, standing in for S3 or MinIO."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL)
        wait_http(f"{self.url}/moto-api/", process=self.process)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        _stop(self.process)


class MlflowServer:
    """`mlflow server` with its backend store in PostgreSQL and artifacts proxied to S3."""

    def __init__(self, backend: str, artifacts: str, env: dict[str, str], log: Path):
        self.backend, self.artifacts, self.env, self.log = backend, artifacts, env, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_http(f"{self.url}/health", process=self.process)

    def stop(self) -> None:
        _stop(self.process)


class Proxy:
    """A TCP proxy to `target` on loopback whose line can be cut: once cut, it drops every new
    connection and the ones open, as a server that went away would. With `cut_after`, it cuts
    itself right after answering the first request whose bytes contain it."""

    def __init__(self, target_port: int, cut_after: bytes | None = None):
        self.target = ("127.0.0.1", target_port)
        self.cut_after, self.armed = cut_after, threading.Event()
        self.down = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.down.set()
        for conn in self.open:
            _close(conn)
        self.open = []

    def restore(self) -> None:
        self.cut_after = None
        self.down.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.down.is_set():
                _close(client)
                continue
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while not self.down.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if from_client and self.cut_after and self.cut_after in data:
                    self.armed.set()
                sink.sendall(data)
                if not from_client and self.armed.is_set():
                    self.armed.clear()
                    self.cut()
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
