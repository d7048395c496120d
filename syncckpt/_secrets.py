"""Credentials never leave: one rule for what is a secret, one scrubber that applies it to text for humans or logs.

The rule. A value is a secret when it is at least 4 characters long and is one of:

* a string or number under a ``storage_options`` key (or inside a dict or list under a key) whose name says it
  is a credential (``key``, ``secret``, ``token``, ``password``, ``credential``, ``sas``, ``auth``, ...; ``user``
  and ``username`` too), except the few flag words backends accept there (``token="anon"``);
* the user name, password, query string or a query value of a URL: the store's URL, any URL inside ``storage_options``
  (an ``endpoint_url`` with credentials), or any other text handed in as a URL (command-line arguments);
* a credential a client library reads from the environment by itself (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
  ...), looked up when text is scrubbed, so a variable set later is covered too;
* anything the caller names explicitly (the Hub token).

Each is replaced by ``***``, longest first, and any ``scheme://userinfo@`` left in the text loses its userinfo.
Option values that are not credentials (a region, an endpoint, a project, a bucket) stay readable: they are
what a user needs to fix a configuration.

>>> s = Scrubber({"key": "AKIAEXAMPLE", "secret": "SECRET-DO-NOT-LOG", "client_kwargs": {"region_name": "us-east-1"}},
...              urls=["s3://user:hunter22@bucket/run?X-Amz-Signature=abcd"])
>>> s("denied for AKIAEXAMPLE/SECRET-DO-NOT-LOG in us-east-1")
'denied for ***/*** in us-east-1'
>>> s("GET https://bob:hunter22@host/x?X-Amz-Signature=abcd"), s("signature abcd")
('GET https://host/x?***', 'signature ***')
>>> s.leaks("all clear"), s.leaks("hunter22")
(False, True)
>>> safe_url("s3://AKIA:SECRET@bucket/runs/a/?X-Amz-Signature=abc")
's3://bucket/runs/a'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Scrubber", "safe_url"]

_MIN_LEN = 4  # shorter values are too common in ordinary text to replace, and too short to be a credential
# A key is a credential's when its name contains a hint, or is one of the names.
_KEY_HINTS = "key secret token password passwd credential sas signature auth connection_string conn_str private".split()
_KEY_NAMES = {"user", "username", "login", "pwd"}
# Values backends accept under such keys that are not secret (gcsfs ``token="anon"``).
_NOT_SECRET = {"anon", "google_default", "cache", "cloud", "browser"}
# Credentials client libraries read from the environment on their own.
_ENV = """HF_TOKEN HUGGING_FACE_HUB_TOKEN AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AZURE_STORAGE_KEY
AZURE_STORAGE_SAS_TOKEN AZURE_STORAGE_CONNECTION_STRING""".split()
_USERINFO = re.compile(r"://[^/\s@]*@")


class Scrubber:
    """Replace every secret (see the module's rule) by ``***`` in text; call it like a function.

    ``options``: the storage_options; ``urls``: URLs whose credentials are secret (other strings are ignored, so
    a command line can be passed whole); ``secrets``: more values to hide (None entries are skipped).

    >>> Scrubber(secrets=["hf_abcdefgh"])("401 for token hf_abcdefgh")
    '401 for token ***'
    """

    def __init__(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        urls: Iterable[str] = (),
        secrets: Iterable[str | None] = (),
    ) -> None:
        found: set[str] = set()
        _walk(options or {}, False, found)
        for url in urls:
            found.update(_url_secrets(url))
        found.update(s for s in secrets if isinstance(s, str) and len(s) >= _MIN_LEN)
        self._fixed = frozenset(found)

    def _secrets(self) -> list[str]:
        env = (os.environ.get(name) for name in _ENV)
        found = self._fixed.union(v for v in env if v and len(v) >= _MIN_LEN)
        return sorted(found, key=len, reverse=True)  # longest first, so no secret is left half-replaced

    def __call__(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return _USERINFO.sub("://", text)

    def leaks(self, text: str) -> bool:
        """Whether ``text`` carries anything this scrubber would hide."""
        return self(text) != text

    def safe_cause(self, e: BaseException) -> BaseException | None:
        """``e``, to chain under an error of ours; None when any message in its chain carries a secret (the
        exception would print it with the traceback)."""
        seen: set[int] = set()
        cur: BaseException | None = e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if self.leaks(str(cur) + repr(cur.args)):
                return None
            cur = cur.__cause__ or cur.__context__
        return e


def safe_url(url: str) -> str:
    """The URL without credentials: no userinfo, no query string (SAS tokens), no fragment, no trailing slash.

    >>> safe_url("/content/drive/MyDrive/run/"), safe_url("simplecache::s3://u:p@b/x")
    ('/content/drive/MyDrive/run', 'simplecache::s3://b/x')
    """
    parts = []
    for piece in url.split("::"):
        s = urlsplit(piece)
        if s.scheme and "://" in piece:
            piece = f"{s.scheme}://{s.netloc.rsplit('@', 1)[-1]}{s.path}"
        parts.append(piece.rstrip("/") or piece)
    return "::".join(parts)


def _is_secret_key(key: Any) -> bool:
    k = str(key).lower()
    return k in _KEY_NAMES or any(h in k for h in _KEY_HINTS)


def _walk(obj: Any, secret: bool, found: set[str]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _walk(v, secret or _is_secret_key(k), found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, secret, found)
    elif isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        text = str(obj)
        if secret and len(text) >= _MIN_LEN and text not in _NOT_SECRET:
            found.add(text)
        if isinstance(obj, str):
            found.update(_url_secrets(obj))


def _url_secrets(text: str) -> set[str]:
    found = set()
    for piece in text.split("::") if "://" in text else ():
        try:
            s = urlsplit(piece)
            values = [s.password, s.username, s.query, *(v for _, v in parse_qsl(s.query))]
        except ValueError:  # not a URL after all (an unbalanced "[" in a host)
            continue
        found.update(v for v in values if v and len(v) >= _MIN_LEN)
    return found
