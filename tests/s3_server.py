"""A real S3 API on loopback for object-store checkpoints: moto's server, and a proxy that freezes one upload.

The recipe reaches S3 the way it does on a node, through s3fs/botocore, with the endpoint and
(fake) credentials in the environment; only the cloud is replaced, by moto's S3 server.
"""
from __future__ import annotations

import re
import socket
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never look for a profile, a credentials file or an instance role on this machine.
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"spotune-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


def object_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


class HoldingProxy:
    """A TCP proxy to an S3 endpoint that stops forwarding for good once a request line matches
    `hold` (a regex over the raw bytes): that upload hangs mid-flight, as on a node whose
    network stalls, until the client is killed. Everything before it passes untouched."""

    def __init__(self, upstream: str, hold: bytes):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._hold = re.compile(hold)
        self.held = threading.Event()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            for source, sink, scan in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, sink, scan), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, scan: bool) -> None:
        tail = b""
        source.settimeout(0.2)
        try:
            while not self._closed.is_set():
                try:
                    data = source.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if scan and not self.held.is_set():
                    window = tail + data
                    if self._hold.search(window):
                        self.held.set()
                        self._closed.wait()  # never forward this request; the client waits until killed
                        break
                    tail = window[-512:]  # a request line split across two reads still matches
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
