"""The image store behind one interface: the local folder and a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from genshop.images import LocalImageStore, S3ImageStore, image_key, open_image_store


def test_local_store_is_the_default_and_file_urls_name_a_folder(tmp_path):
    assert isinstance(open_image_store(None, tmp_path), LocalImageStore)
    store = open_image_store(f"file://{tmp_path / 'shared'}", tmp_path / "home")
    sha, key = store.put(Image.new("RGB", (4, 4), "red"))
    assert (tmp_path / "shared" / key).is_file() and store.exists(key) and key == image_key(sha)
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_image_store("ftp://x/y", tmp_path)


def test_s3_store_round_trips_through_a_real_s3_api(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    writer = open_image_store(f"s3://{s3_server.bucket}/shop-a", tmp_path / "writer")
    reader = open_image_store(f"s3://{s3_server.bucket}/shop-a", tmp_path / "reader")  # another machine: no cache
    assert isinstance(writer, S3ImageStore)
    red = Image.new("RGB", (8, 8), "red")
    sha, key = writer.put(red)
    assert writer.put(red.copy()) == (sha, key)
    raw = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"shop-a/{key}")
    data = raw["Body"].read()
    assert hashlib.sha256(data).hexdigest() == sha and raw["ContentType"] == "image/png"
    assert not (tmp_path / "reader" / "cache" / key).exists()
    assert reader.exists(key) and reader.read(key) == data
    assert Image.open(reader.path(key)).size == (8, 8)  # the file the enrich and score stages open
    assert not reader.exists(image_key("0" * 64))
    with pytest.raises(Exception):
        open_image_store(f"s3://{s3_server.bucket}/shop-b", tmp_path / "other").read(key)  # another prefix


def test_s3_put_sends_the_whole_body_with_its_checksum(tmp_path, s3_server, monkeypatch):
    """One PutObject of the whole body with its Content-MD5 (S3 stores all of it or nothing), no temporary key."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = open_image_store(f"s3://{s3_server.bucket}/atomic", tmp_path)
    calls = []
    original = store.client.put_object
    store.client.put_object = lambda **kw: calls.append(kw) or original(**kw)
    store.put(Image.new("RGB", (4, 4), "blue"))
    assert len(calls) == 1 and "ContentMD5" in calls[0] and len(calls[0]["Body"]) > 0
    assert calls[0]["Key"] == f"atomic/{calls[0]['Key'].split('/', 1)[1]}"
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="atomic/")["Contents"]
    assert [o["Key"] for o in listed] == [calls[0]["Key"]]  # no temporary key beside it
