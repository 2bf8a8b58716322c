"""Content-addressed PNG storage behind one interface: a local folder or an S3-compatible bucket.

Keys are relative and content-addressed, as the items record them: ``images/ab/cd/abcd....png``
(the SHA-256 of the PNG bytes). Two backends, chosen by ``GENSHOP_IMAGES_URL``:

- ``LocalImageStore`` (the default, no URL or ``file:///folder``): files under ``GENSHOP_HOME``.
  A write goes to a temporary file beside the target and is renamed into place, so a crash
  leaves no partial file under a key.
- ``S3ImageStore`` (``s3://bucket/prefix``): objects in a bucket, through boto3. Endpoint and
  credentials come from the usual AWS variables (``AWS_ENDPOINT_URL`` or
  ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION``, profiles...). A write is one ``PutObject`` of the whole body with its
  ``Content-MD5``: S3 makes an object visible only once the whole request has arrived and its
  checksum matched, so a crash (or a dropped connection) mid-upload never leaves a key that
  points at a partial object. No temporary key and copy is needed. Reads used by code that
  wants a file (the enrich and score stages, exports) go through a local cache under
  ``GENSHOP_HOME/cache/images``: keys are content addresses, so a cached copy never goes stale.

Every store answers ``put(image) -> (sha256, key)``, ``read(key) -> bytes``, ``exists(key)``
and ``path(key) -> Path`` (a local file with the key's bytes).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from PIL import Image


def image_key(digest: str) -> str:
    return f"images/{digest[:2]}/{digest[2:4]}/{digest}.png"


def png_bytes(image: Image.Image) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _write_file_atomically(target: Path, data: bytes) -> None:
    """Write to a temporary file beside ``target`` and rename it into place; a failed write
    (disk full) removes its ``.tmp``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ImageStore(Protocol):
    url: str

    def put(self, image: Image.Image) -> tuple[str, str]: ...
    def put_new(self, image: Image.Image) -> tuple[str, str, bool]: ...
    def put_bytes(self, data: bytes) -> tuple[str, str]: ...
    def remove(self, key: str) -> None: ...
    def read(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def path(self, key: str) -> Path: ...


class LocalImageStore:
    """PNG files addressed by the SHA-256 of their bytes under ``root``: ``images/ab/cd/abcd....png``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def put(self, image: Image.Image) -> tuple[str, str]:
        digest, relative, _ = self.put_new(image)
        return digest, relative

    def put_new(self, image: Image.Image) -> tuple[str, str, bool]:
        """``put``, also saying whether this call created the file (so a failed batch can
        remove exactly what it added)."""
        data, _ = png_bytes(image)
        return self._put(data)

    def put_bytes(self, data: bytes) -> tuple[str, str]:
        digest, relative, _ = self._put(data)
        return digest, relative

    def _put(self, data: bytes) -> tuple[str, str, bool]:
        digest = hashlib.sha256(data).hexdigest()
        relative = image_key(digest)
        target = self.root / relative
        if target.exists():
            return digest, relative, False
        _write_file_atomically(target, data)
        return digest, relative, True

    def remove(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def path(self, key: str) -> Path:
        return self.root / key


class S3ImageStore:
    """PNG objects in ``s3://bucket/prefix``: one whole-body PUT per image (atomic), a local read cache."""

    def __init__(self, url: str, cache_dir: str | Path, client=None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"GENSHOP_IMAGES_URL {url!r}: expected s3://bucket/prefix")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.cache = Path(cache_dir)
        self.client = client or boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                                  max_pool_connections=16))

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, image: Image.Image) -> tuple[str, str]:
        data, _ = png_bytes(image)
        return self.put_bytes(data)

    def put_new(self, image: Image.Image) -> tuple[str, str, bool]:
        """``put``, also saying whether the object was new (asked first: one HEAD request)."""
        data, digest = png_bytes(image)
        key = image_key(digest)
        if self.exists(key):
            _write_file_atomically(self.cache / key, data)
            return digest, key, False
        self.put_bytes(data)
        return digest, key, True

    def remove(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))
        (self.cache / key).unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        key = image_key(digest)
        # The same key always has the same bytes: rewriting an existing object is harmless, and
        # cheaper than asking first. One request, checked by Content-MD5: all of it or nothing.
        self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType="image/png",
                               ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode())
        _write_file_atomically(self.cache / key, data)
        return digest, key

    def read(self, key: str) -> bytes:
        cached = self.cache / key
        if cached.is_file():
            return cached.read_bytes()
        data = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()
        _write_file_atomically(cached, data)
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def path(self, key: str) -> Path:
        cached = self.cache / key
        if not cached.is_file():
            self.read(key)
        return cached


def open_image_store(url: str | None, home: str | Path) -> ImageStore:
    """The store named by ``url`` (``GENSHOP_IMAGES_URL``): none or ``file://`` → a local folder
    (default ``home``), ``s3://bucket/prefix`` → S3 with its read cache under ``home/cache``."""
    if not url:
        return LocalImageStore(home)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalImageStore(Path(parsed.path))
    if parsed.scheme == "s3":
        return S3ImageStore(url, Path(home) / "cache")
    raise ValueError(f"GENSHOP_IMAGES_URL {url!r}: expected s3://bucket/prefix or file:///folder")
