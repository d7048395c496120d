"""Data files to S3 through obstore (Rust ``object_store``): each file is read past the page cache into reused
buffers (a save's data files are written past it too: :func:`syncckpt.local.write_file`) and handed to obstore 8 MiB
at a time, which sends from them with no copy and no per-byte Python work.

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
* an ``AWS_*`` variable is set that obstore reads and botocore does not, or the other way round (``AWS_ENDPOINT``,
  ``AWS_SERVER_SIDE_ENCRYPTION``, ...): credentials, region, profile and ``AWS_CA_BUNDLE`` are fine;
* ``obstore`` is not installed, or ``SYNCCKPT_S3_TRANSFER=s3fs`` is set;
* this process was forked from one that had used obstore (its runtime's threads did not come along, and a
  request would hang);
* the store refused it (a 4xx), or it got no answer, and s3fs then uploaded that file
  (:class:`~syncckpt.remote.fsspec.FsspecRemote` drops it for the rest of the session, with one warning). A 5xx,
  408 or 429 (:func:`transient_status`) is the store's passing trouble: the retry policy retries it on this path.

Credentials are the ones s3fs resolved (the options' key and secret, or botocore's chain: environment, profile,
instance role), handed over in memory through obstore's credential provider; they are never logged. The shape of
the upload is s3fs's: a file under 64 MiB is one PUT, a larger one goes in 32 MiB parts. Integrity on the way:
over https, TLS; over plain http (a local MinIO), each request carries ``x-amz-checksum-sha256``, which the store
checks before it accepts the bytes. Either way the manifest's SHA-256 is checked on every download.

>>> plan({"key": "K", "secret": "S", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, {})
>>> plan({"s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}}, {})
'storage_options s3_additional_kwargs'
>>> plan({"config_kwargs": {"proxies": {"https": "http://proxy:3128"}}}, {})
'config_kwargs proxies'
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..local import read_direct
from .base import CHUNK
from .client_options import PART_BYTES  # the parts s3fs sends too: a file under 2 of them is one PUT
from .retry import describe

log = logging.getLogger("syncckpt")

__all__ = ["DirectS3Put", "plan", "summary", "transient_status"]

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


# AWS_* variables that mean the same to botocore and to obstore here (credentials go through the provider, the
# region and endpoint are passed explicitly); any other one set (AWS_ENDPOINT, AWS_CA_BUNDLE, server-side
# encryption, request payer, ...) is read by one client and not the other, so uploads stay on s3fs.
_ENV_SAME = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_EXECUTION_ENV",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CA_BUNDLE",  # read through botocore's session below, as botocore does
}


def plan(options: dict[str, Any], environ: dict[str, str] | None = None) -> str | None:
    """Why uploads with these s3fs ``storage_options`` (and this environment) must stay on s3fs, or None.

    >>> plan({}, {"AWS_SERVER_SIDE_ENCRYPTION": "aws:kms"})
    'environment AWS_SERVER_SIDE_ENCRYPTION'
    """
    env = os.environ if environ is None else environ
    if env.get(ENV, "").strip().lower() == "s3fs":
        return f"{ENV}=s3fs"
    for name in sorted(env):
        if name.startswith("AWS_") and name not in _ENV_SAME and env[name]:
            return f"environment {name}"
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
        host = urlsplit(endpoint).hostname or ""
        # botocore's own AWS endpoint (no endpoint_url given): obstore builds it from the bucket's region, which
        # botocore would reach through a redirect. Any other endpoint (a VPC endpoint, FIPS, dual-stack, MinIO)
        # is passed as it is.
        default = host in ("s3.amazonaws.com", f"s3.{region}.amazonaws.com")
        kwargs: dict[str, Any] = {"unsigned_payload": True}
        if urlsplit(endpoint).scheme == "http":
            kwargs["checksum_algorithm"] = "sha256"  # no TLS to protect the bytes: the store checks them
        if default:
            region = _bucket_region(fs, bucket) or region
        else:
            kwargs["endpoint"] = endpoint
        if (client.meta.config.s3 or {}).get("addressing_style") == "virtual":
            kwargs["virtual_hosted_style_request"] = True
            if not default:
                kwargs["endpoint"] = _with_bucket(endpoint, bucket)
        if fs.anon:
            kwargs["skip_signature"] = True
            provider = None
        else:
            provider = _credentials(fs, sync)
        client_options: dict[str, Any] = {
            "allow_http": True,
            "connect_timeout": _duration(client.meta.config.connect_timeout),
            "read_timeout": _duration(client.meta.config.read_timeout),  # a stalled connection, as botocore's
            "timeout": "6h",  # the whole request: a slow uplink takes long for a part, which is no failure
        }
        verify = (options.get("client_kwargs") or {}).get("verify")
        if verify is None:  # as botocore: then AWS_CA_BUNDLE, then the profile's ca_bundle
            verify = fs.session.get_config_variable("ca_bundle")
        if verify is False:
            client_options["allow_invalid_certificates"] = True
        elif isinstance(verify, (str, Path)):
            # trusted beside the system's roots (botocore trusts the bundle alone): a private CA's store is
            # reached either way, and a bundle that is the system's own changes nothing
            client_options["root_certificate"] = Path(verify).read_bytes()
        global _started_in
        _started_in = _started_in or os.getpid()
        store = S3Store(
            bucket,
            region=region,
            client_options=client_options,
            retry_config={"max_retries": _retries(client.meta.config.retries)},
            credential_provider=provider,
            **kwargs,
        )
        return cls(store, bucket, concurrency=int(options.get("max_concurrency") or 4))

    def put(self, local: Path, key: str, size: int, *, progress: Callable[[int], None] | None = None) -> None:
        """Send the first ``size`` bytes of the file ``local`` to ``key`` in the bucket.

        The file is read here, past the page cache (:func:`syncckpt.local.read_direct`: a save's data files are
        written that way too, so sending one fills no cold page-cache pages), 8 MiB at a time into reused
        buffers that obstore sends from, with no copy. A file that another program truncates meanwhile fails
        this upload. ``progress``: called with each chunk's byte count as obstore takes it (someone watches a bar:
        ``syncckpt push``), so that a 5 GB file's bar moves instead of jumping at its end."""
        import obstore

        shape = {
            "use_multipart": size >= 2 * self.part_bytes,
            "chunk_size": self.part_bytes,
            "max_concurrency": self.concurrency,
        }
        if size == 0:
            obstore.put(self._store, key, b"")
            return
        chunks = read_direct(local, size, CHUNK)
        if progress is not None and shape["use_multipart"]:  # one PUT is sent whole: nothing to show before
            chunks = _reported(chunks, progress)
        obstore.put(self._store, key, chunks, **shape)


def _reported(chunks: Iterator[memoryview], progress: Callable[[int], None]) -> Iterator[memoryview]:
    """``chunks``, reporting each one's size as it is handed over."""
    for data in chunks:
        yield data
        progress(len(data))


def summary(e: BaseException) -> str:
    """obstore's failure on one line, without the store's response body: an S3 ``SignatureDoesNotMatch`` body
    echoes the signed request, session token included, and a token from botocore's chain is none the remote's
    scrubber knows.

    >>> summary(Exception("Error performing PUT http://h/b/k - status code: 403 Forbidden: <?xml ...><Error>..."))
    'Exception: Error performing PUT http://h/b/k - status code: 403 Forbidden: (response body left out)'
    """
    text = str(e)
    cut = text.find("<")
    return describe(e, text if cut < 0 else text[:cut] + "(response body left out)")


def transient_status(e: BaseException) -> bool | None:
    """Whether obstore's failure ``e`` was the store's or the network's passing trouble (5xx, 408, 429: True), a
    refusal of the request (another 4xx: False), or neither said (no HTTP status: None).

    >>> transient_status(Exception("Server returned non-2xx status code: 503 Service Unavailable"))
    True
    >>> transient_status(Exception("Server returned non-2xx status code: 403 Forbidden")), transient_status(OSError())
    (False, None)
    """
    found = re.search(r"status code: (\d{3})", str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return code >= 500 or code in (408, 429)


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


def _retries(retries: dict[str, Any] | None) -> int:
    """Retries per request as the botocore client makes them (its resolved ``retries``: ``total_max_attempts``
    counts the first try, ``max_attempts`` only the retries), else its mode's default (legacy 4, standard 2).

    >>> _retries({"total_max_attempts": 3, "mode": "legacy"}), _retries({"mode": "legacy"}), _retries(None)
    (2, 4, 4)
    """
    retries = retries or {}
    if retries.get("total_max_attempts") is not None:
        return max(0, int(retries["total_max_attempts"]) - 1)
    if retries.get("max_attempts") is not None:
        return max(0, int(retries["max_attempts"]))
    return 4 if retries.get("mode", "legacy") == "legacy" else 2


def _duration(seconds: float | None) -> str:
    """botocore's timeout (seconds, maybe fractional) as obstore's duration string."""
    return f"{int(round(1000 * (60 if seconds is None else seconds)))}ms"


def _bucket_region(fs: Any, bucket: str) -> str | None:
    try:
        return fs.call_s3("head_bucket", Bucket=bucket).get("BucketRegion")
    except Exception:  # no permission to look at the bucket: the client's region, as s3fs would use
        return None


def _with_bucket(endpoint: str, bucket: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}"
