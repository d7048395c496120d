"""Data files to S3 through obstore (Rust ``object_store``): the bytes go from a read-only mapping of the local
file to the socket, with no Python copy and no per-chunk Python work.

s3fs's ``put_file`` reads each part into a ``bytes``, botocore wraps it in a ``BytesIO`` and CRC32s it, aiohttp
copies it again, and asyncio copies what the socket did not take at once into its buffer: about 2 client CPU-s
per GB uploaded to moto on the CI machine kind. obstore sending the mapped file took 0.2 CPU-s/GB over a plain
PUT and 0.8 with its SHA-256 checksum (126 MB, 4 interleaved rounds; see the README's Performance section).

Only the data files of a checkpoint go this way (:meth:`~syncckpt.remote.fsspec.FsspecRemote._upload`); every
other request (listing, the lease's conditional create, the manifest, LATEST, deletes) stays with s3fs, and so
do uploads whenever this path cannot stand in for s3fs exactly:

* ``storage_options`` holding something it does not translate (server-side encryption or ACLs in
  ``s3_additional_kwargs``, requester pays, a proxy in ``config_kwargs``, a signature setting): :func:`plan` says
  why (a custom CA in ``client_kwargs["verify"]``, a PEM file, is trusted here too; ``verify=False`` skips the
  certificate check, as it does for botocore);
* ``obstore`` is not installed, or ``SYNCCKPT_S3_TRANSFER=s3fs`` is set;
* this process was forked from one that had used obstore (its runtime's threads did not come along, and a
  request would hang);
* it failed on a file that s3fs then uploaded (:class:`~syncckpt.remote.fsspec.FsspecRemote` drops it for the
  rest of the session, with one warning).

Credentials are the ones s3fs resolved (the options' key and secret, or botocore's chain: environment, profile,
instance role), handed over in memory through obstore's credential provider; they are never logged. The shape of
the upload is s3fs's: a file under 64 MiB is one PUT, a larger one goes in 32 MiB parts. Integrity on the way:
over https, TLS; over plain http (a local MinIO), each request carries ``x-amz-checksum-sha256``, which the store
checks before it accepts the bytes. Either way the manifest's SHA-256 is checked on every download.

>>> plan({"key": "K", "secret": "S", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}})
>>> plan({"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}})
'storage_options s3_additional_kwargs'
>>> plan({"config_kwargs": {"proxies": {"https": "http://proxy:3128"}}})
'config_kwargs proxies'
"""

from __future__ import annotations

import datetime as dt
import logging
import mmap
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("syncckpt")

__all__ = ["DirectS3Put", "plan"]

PART_BYTES = 32 << 20  # as put_options gives s3fs: a file under 2 parts is one PUT
ENV = "SYNCCKPT_S3_TRANSFER"  # "s3fs": every upload through s3fs
_started_in: int | None = None  # the process that built an obstore store (its runtime) first

# What the direct path reproduces exactly; anything else in storage_options keeps uploads on s3fs.
_TOP = {
    "key",
    "secret",
    "token",
    "anon",
    "endpoint_url",
    "profile",
    "client_kwargs",
    "config_kwargs",
    "max_concurrency",
    "use_listings_cache",
    "listings_expiry_time",
    "default_block_size",
    "default_fill_cache",
    "skip_instance_cache",
    "cache_regions",
    "use_ssl",
}
_CLIENT = {"endpoint_url", "region_name", "verify", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
_CONFIG = {
    "s3",
    "retries",
    "read_timeout",
    "connect_timeout",
    "max_pool_connections",
    "request_checksum_calculation",
    "response_checksum_validation",
}
_CONFIG_S3 = {"payload_signing_enabled", "addressing_style"}


def plan(options: dict[str, Any]) -> str | None:
    """Why uploads with these s3fs ``storage_options`` must stay on s3fs (a few words), or None."""
    if os.environ.get(ENV, "").strip().lower() == "s3fs":
        return f"{ENV}=s3fs"
    for key in options:
        if key not in _TOP:
            return f"storage_options {key}"
    for group, allowed in (("client_kwargs", _CLIENT), ("config_kwargs", _CONFIG)):
        for key in options.get(group) or {}:
            if key not in allowed:
                return f"{group} {key}"
    s3 = (options.get("config_kwargs") or {}).get("s3") or {}
    for key in s3:
        if key not in _CONFIG_S3:
            return f"config_kwargs s3 {key}"
    if s3.get("payload_signing_enabled"):  # an endpoint that wants signed payloads: s3fs signs them
        return "config_kwargs s3 payload_signing_enabled"
    if _started_in is not None and _started_in != os.getpid():
        return "this process was forked from one that used obstore"
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore is not installed"
    return None


class DirectS3Put:
    """Uploads of local files to one bucket of an s3fs filesystem ``fs``, through obstore.

    Build it with :meth:`for_filesystem` (None when :func:`plan` says no); :meth:`put` sends one file.
    """

    def __init__(self, store: Any, bucket: str, *, part_bytes: int = PART_BYTES, concurrency: int = 4):
        self._store, self.bucket = store, bucket
        self.part_bytes, self.concurrency = part_bytes, concurrency

    @classmethod
    def for_filesystem(cls, fs: Any, bucket: str, options: dict[str, Any]) -> DirectS3Put | None:
        """The direct path to ``bucket`` with the client s3fs built from ``options``, or None (with the reason at
        debug level) when uploads must stay on s3fs."""
        why = plan(options)
        if why is not None:
            log.debug("S3 uploads go through s3fs: %s", why)
            return None
        from fsspec.asyn import sync
        from obstore.store import S3Store

        client = fs.connect()
        endpoint = client.meta.endpoint_url
        region = client.meta.region_name or "us-east-1"
        config = dict(options.get("config_kwargs") or {})
        aws = urlsplit(endpoint).hostname is not None and urlsplit(endpoint).hostname.endswith(".amazonaws.com")
        kwargs: dict[str, Any] = {"unsigned_payload": True}
        if urlsplit(endpoint).scheme == "http":
            kwargs["checksum_algorithm"] = "sha256"  # no TLS to protect the bytes: the store checks them
        if aws:
            region = _bucket_region(fs, bucket) or region  # botocore follows a region redirect; obstore does not
        else:
            kwargs["endpoint"] = endpoint
        if (config.get("s3") or {}).get("addressing_style") == "virtual":
            kwargs["virtual_hosted_style_request"] = True
            if not aws:
                kwargs["endpoint"] = _with_bucket(endpoint, bucket)
        if fs.anon:
            kwargs["skip_signature"] = True
            provider = None
        else:
            provider = _credentials(fs, sync)
        read_timeout = config.get("read_timeout", 60)
        client_options: dict[str, Any] = {
            "allow_http": True,
            "connect_timeout": f"{int(config.get('connect_timeout', 60))}s",
            "read_timeout": f"{int(read_timeout)}s",  # a stalled connection, as botocore's read_timeout
            "timeout": "6h",  # the whole request: a slow uplink takes long for a part, which is no failure
        }
        verify = (options.get("client_kwargs") or {}).get("verify")
        if verify is False:
            client_options["allow_invalid_certificates"] = True
        elif isinstance(verify, (str, Path)):
            client_options["root_certificate"] = Path(verify).read_bytes()
        global _started_in
        _started_in = _started_in or os.getpid()
        store = S3Store(
            bucket,
            region=region,
            client_options=client_options,
            retry_config={"max_retries": _retries(config)},
            credential_provider=provider,
            **kwargs,
        )
        return cls(store, bucket, concurrency=int(options.get("max_concurrency") or 4))

    def put(self, local: Path, key: str, size: int) -> None:
        """Send the file ``local`` (``size`` bytes, not changed meanwhile) to ``key`` in the bucket."""
        import obstore

        if size == 0:
            obstore.put(self._store, key, b"")
            return
        with open(local, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as data:
            view = memoryview(data)
            try:
                obstore.put(
                    self._store,
                    key,
                    view,
                    use_multipart=size >= 2 * self.part_bytes,
                    chunk_size=self.part_bytes,
                    max_concurrency=self.concurrency,
                )
            finally:
                view.release()


def _credentials(fs: Any, sync: Any) -> Any:
    """obstore's credential provider: the key s3fs was given, or what botocore's chain resolves (refreshed by
    botocore, asked again every few minutes)."""
    given = fs.client_kwargs or {}
    key = fs.key or given.get("aws_access_key_id")
    secret = fs.secret or given.get("aws_secret_access_key")
    if key and secret:
        token = fs.token or given.get("aws_session_token")
        static = {"access_key_id": key, "secret_access_key": secret, "token": token, "expires_at": None}
        return lambda: static

    def resolve() -> dict[str, Any]:
        async def frozen() -> Any:
            creds = await fs.session.get_credentials()
            return None if creds is None else await creds.get_frozen_credentials()

        got = sync(fs.loop, frozen)
        if got is None:
            raise PermissionError("no AWS credentials found (storage_options, environment, profile or role)")
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
        return {
            "access_key_id": got.access_key,
            "secret_access_key": got.secret_key,
            "token": got.token,
            "expires_at": soon,
        }

    return resolve


def _retries(config: dict[str, Any]) -> int:
    """Retries per request, as botocore would make them (``retries`` in ``config_kwargs``), 3 by default."""
    retries = config.get("retries") or {}
    attempts = retries.get("total_max_attempts", retries.get("max_attempts"))
    return 3 if attempts is None else max(0, int(attempts) - 1)


def _bucket_region(fs: Any, bucket: str) -> str | None:
    try:
        return fs.call_s3("head_bucket", Bucket=bucket).get("BucketRegion")
    except Exception:  # no permission to look at the bucket: the client's region, as s3fs would use
        return None


def _with_bucket(endpoint: str, bucket: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}"
