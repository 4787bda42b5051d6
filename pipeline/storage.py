"""Where files live: local paths or `s3://bucket/prefix` URIs, as pyarrow file systems.

Every module that reads the input or writes the output gets its file system here, so local and
object storage take one code path. The S3 endpoint (MinIO, Ceph, a test server) comes from
`storage.s3_endpoint` in the job config or the AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL environment
variables; credentials and region come from the usual AWS environment variables or files. The
driver exports a configured endpoint to the environment (`use_endpoint`), and the objects it ships
to Ray workers (the sink, the datasource's file system) carry it, so workers need no set-up.
"""
from __future__ import annotations

import functools
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_remote(path: str) -> bool:
    """True for a URI (s3://...), False for a local path."""
    return "://" in str(path)


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None = AWS itself)."""
    return next((os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), None)


def use_endpoint(url: str | None) -> None:
    """Make `url` the S3 endpoint of this process (and of subprocesses it starts); None leaves it."""
    if url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url


def filesystem(path: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it): a LocalFileSystem and an absolute path, or an S3FileSystem and
    'bucket/prefix'. Schemes other than s3 go to pyarrow's own URI parsing (gs://, hdfs://).

    A remote path is resolved once per process (per endpoint and region): the checks before Ray, the
    resume scan and the manifest all ask for the output directory's file system, and each would
    otherwise build its own client."""
    path = str(path)
    if not is_remote(path):
        return _LOCAL, os.path.abspath(path)  # the working directory may change: not cached
    return _remote(path, endpoint_url or endpoint(), _region())


_LOCAL = pafs.LocalFileSystem()


@functools.lru_cache(maxsize=64)
def _remote(path: str, url: str | None, region: str | None) -> tuple[pafs.FileSystem, str]:
    scheme, rest = path.split("://", 1)
    if scheme not in ("s3", "s3a"):
        return pafs.FileSystem.from_uri(path)
    return _s3(url, region), rest.strip("/")


def s3(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """An S3FileSystem for the configured endpoint ('http://host:port' or 'host:port' = https)."""
    return _s3(endpoint_url or endpoint(), _region())


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=16)
def _s3(url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        kwargs = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def check_bucket(path: str, field: str) -> None:
    """Refuse an s3:// path whose bucket does not exist (or cannot be reached), naming the field.

    Without this a missing bucket surfaces only when the first part is written, after the model load.
    """
    from pipeline.config import JobConfigError

    if not is_remote(path):
        return
    fs, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise JobConfigError(f"{field}: cannot reach bucket {bucket!r} of {path} ({e}); check the endpoint "
                             "(storage.s3_endpoint or AWS_ENDPOINT_URL) and the credentials") from None
    if info.type == pafs.FileType.NotFound:
        where = endpoint() or "AWS"
        raise JobConfigError(f"{field}: bucket {bucket!r} of {path} does not exist at {where}; create it "
                             "first (the pipeline never creates buckets) or fix the path")


def list_files(path: str) -> list[str]:
    """Visible files under a file or directory path, as paths inside its file system, sorted
    (names starting with '.' or '_' are skipped, at any depth)."""
    fs, base = filesystem(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [base]
    if info.type == pafs.FileType.NotFound:
        return []
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in found if i.type == pafs.FileType.File
                  and not any(p.startswith((".", "_")) for p in i.path[len(base):].strip("/").split("/")))
