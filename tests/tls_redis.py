"""A TLS-only redis-server with a password and a self-signed certificate, as Heroku Redis hands
out: made in a temp dir with ``openssl``, on a free port, for the deploy tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from ingest.testing.processes import free_port

PASSWORD = "tls-test-password"


class TlsRedis:
    """``rediss://`` only (``--port 0``); clients need no certificate of their own."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="di-tls-", dir="/tmp"))
        self.port = free_port()
        self.cert = self.dir / "cert.pem"
        self.key = self.dir / "key.pem"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, query: str = "") -> str:
        return f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0{query}"

    def start(self) -> None:
        # Self-signed, valid for the address the tests dial, so verifying with it as the CA
        # file passes and verifying without it fails, as with Heroku's certificate.
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(self.cert),
                "--tls-key-file",
                str(self.key),
                "--tls-ca-cert-file",
                str(self.cert),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.RedisError, OSError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"TLS redis-server did not start:\n{log}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        """A verifying client (the certificate is its own CA)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=PASSWORD,
            ssl=True,
            ssl_ca_certs=str(self.cert),
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
