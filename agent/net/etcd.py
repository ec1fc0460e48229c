"""A small synchronous etcd v3 client over the JSON gateway, with endpoint failover.

Built on ``etcd3gw.client.Etcd3Client`` (Debian's ``python3-etcd3gw`` 2.0.0 on
the terminal, 2.7.0 from PyPI on the desk); only the part of its API both
versions share is used: the constructor, ``.session``, ``get_url``, ``post``
and ``transaction``. Around it, what shared/notes ("Things that change the
plan") says etcd3gw does not do for us:

1. ``api_path='/v3/'`` is always passed: 2.0.0 defaults to ``/v3alpha/``,
   which etcd 3.4 answers with 404.
2. Every request carries a timeout through our own ``requests.Session``
   (``_TimeoutSession``): 2.0.0's ``timeout=`` sets ``session.timeout``,
   which ``requests`` ignores, so a SIGSTOPped member blocks forever.
3. ``trust_env = False``: ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would
   otherwise override the fleet CA and every TLS handshake would fail.
5. etcd3gw talks to one endpoint; ``EtcdClient`` holds one ``Etcd3Client``
   per endpoint and rotates itself.

(4, the silent watch, is ``agent.net.watch``'s business.)

Keys and values are ``bytes`` at this API and base64 on the wire. One
``EtcdClient`` is for one thread at a time (``requests.Session`` is not
thread-safe); the watch has its own sessions (``agent.net.watch``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as gwexc
from etcd3gw.client import Etcd3Client
from etcd3gw.utils import _decode, _encode

API_PATH = "/v3/"  # note pitfall 1: etcd 3.4 has /v3/ and /v3beta/, not /v3alpha/
DEFAULT_PORT = 2379

# gRPC status codes the gateway puts in its error body ("code")
GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11  # both "revision has been compacted" and "is a future revision"
SORT_ASCEND, SORT_BY_CREATE = 1, 2  # RangeRequest.SortOrder.ASCEND, SortTarget.CREATE


class EtcdError(Exception):
    """etcd refused the request; ``code`` is the gRPC status code when the server gave one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdCompacted(EtcdError):
    """The revision asked for has been compacted away: resync from a newer revision.

    ``compact_revision`` is None when etcd did not say (a range's error does not).
    """

    def __init__(self, message: str, *, compact_revision: int | None = None) -> None:
        super().__init__(message, code=GRPC_OUT_OF_RANGE)
        self.compact_revision = compact_revision


class EtcdUnavailable(EtcdError):
    """No endpoint answered; ``attempts`` lists ``(endpoint, why)`` for each one tried."""

    def __init__(self, attempts: Sequence[tuple[str, str]]) -> None:
        self.attempts = list(attempts)
        tried = "; ".join(f"{url}: {why}" for url, why in self.attempts)
        super().__init__(f"no etcd endpoint answered ({tried})")


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KV]
    more: bool
    header_revision: int


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for "every key starting with ``prefix``".

    The prefix with its last byte incremented; trailing 0xff bytes are dropped
    first (b"a\\xff" -> b"b"), and an empty or all-0xff prefix gives b"\\0",
    which etcd reads as "to the end of the keyspace".
    """
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def kv_from_json(item: dict[str, Any]) -> KV:
    """A gateway ``mvccpb.KeyValue``: int64s come as strings, zero fields are left out."""
    return KV(key=_decode(item["key"]), value=_decode(item.get("value", "")),
              create_revision=int(item.get("create_revision", 0)),
              mod_revision=int(item.get("mod_revision", 0)),
              version=int(item.get("version", 0)), lease=int(item.get("lease", 0)))


def _header_revision(result: dict[str, Any]) -> int:
    return int(result.get("header", {}).get("revision", 0))


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout and ignores the environment.

    etcd3gw 2.7.0 passes ``timeout=self.timeout`` (None unless set) on each
    post and 2.0.0 passes none, so an absent or None timeout gets ours.
    """

    def __init__(self, timeout: float | tuple[float, float], *, ca: str | None,
                 cert: str | None, key: str | None) -> None:
        super().__init__()
        self.trust_env = False  # note pitfall 3: env CA bundles would beat verify=ca
        if ca is not None:
            self.verify = ca
        if cert is not None and key is not None:
            self.cert = (cert, key)
        self.default_timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


def make_session(timeout: float | tuple[float, float], *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None) -> requests.Session:
    """The ``requests.Session`` every etcd connection of the agent uses (module docstring)."""
    return _TimeoutSession(timeout, ca=ca, cert=cert, key=key)


def split_endpoint(url: str) -> tuple[str, str, int]:
    """``"https://127.0.0.1:2379"`` -> ``("https", "127.0.0.1", 2379)``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an etcd endpoint URL: {url!r}")
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORT


def _unreachable_reason(exc: gwexc.Etcd3Exception) -> str:
    """Why a connection-class failure happened, from the ``requests`` error etcd3gw wrapped."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, requests.exceptions.Timeout):
        return f"timed out: {cause}"
    if isinstance(cause, requests.exceptions.ConnectionError):
        text = str(cause)
        # etcd answers a client certificate from another CA by closing the
        # handshake (SSLEOFError), a missing one with "alert bad certificate"
        if isinstance(cause, requests.exceptions.SSLError) or "CERTIFICATE" in text.upper():
            return f"TLS refused (is the client certificate or the CA not the fleet's?): {text}"
        return f"connection failed: {text}"
    # 503/504/408 from the gateway itself: e.g. "etcdserver: no leader"
    return f"{type(exc).__name__}: {_server_message(exc)[0]}"


def _server_message(exc: gwexc.Etcd3Exception) -> tuple[str, int | None]:
    """The gateway's error body ``{"error", "message", "code"}`` as (message, code)."""
    text = exc.detail_text or ""
    try:
        body = json.loads(text)
    except ValueError:
        return (text or str(exc) or type(exc).__name__), None
    if not isinstance(body, dict):
        return text, None
    code = body.get("code")
    message = body.get("message") or body.get("error") or text
    return str(message), int(code) if isinstance(code, int) else None


def _server_error(exc: gwexc.Etcd3Exception) -> EtcdError:
    message, code = _server_message(exc)
    # code 11 is also "required revision is a future revision": tell them apart by the text
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        return EtcdCompacted(message)
    return EtcdError(message, code=code)


class EtcdClient:
    """KV, txn, lease, election and maintenance calls against a list of endpoints.

    Each call tries the endpoint that last answered, then the others in
    order, each at most once; a connection error, a timeout or the gateway's
    503/504 ("no leader") moves on, a server's refusal does not. Retrying a
    write on another endpoint after a timeout can apply it twice (the first
    may have committed): ``put`` is harmless twice, ``create`` and
    ``campaign`` say below how they cope.
    """

    def __init__(self, endpoints: Sequence[str], *, ca: str | None = None,
                 cert: str | None = None, key: str | None = None,
                 timeout_s: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints: list[str] = []
        self.timeout_s = timeout_s
        self._tls = (ca, cert, key)
        self._clients: list[Etcd3Client] = []
        for url in endpoints:
            self.add_endpoint(url)
        self._current = 0

    def add_endpoint(self, url: str) -> None:
        """One more member to fail over to (a voting terminal added at run time); the list
        only grows, so a call in another thread sees it whole or not at all."""
        if url in self.endpoints:
            return
        ca, cert, key = self._tls
        protocol, host, port = split_endpoint(url)
        client = Etcd3Client(host=host, port=port, protocol=protocol, ca_cert=ca,
                             cert_key=key, cert_cert=cert, api_path=API_PATH)
        client.session = make_session(self.timeout_s, ca=ca, cert=cert, key=key)
        self._clients.append(client)
        self.endpoints.append(url)

    @property
    def endpoint(self) -> str:
        """The endpoint the next call tries first: the last one that answered."""
        return self.endpoints[self._current]

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------

    def _call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``path`` on the first endpoint that answers (class docstring)."""
        attempts: list[tuple[str, str]] = []
        n = len(self._clients)
        for step in range(n):
            index = (self._current + step) % n
            client = self._clients[index]
            try:
                if path == "/kv/txn":
                    result = client.transaction(payload)
                else:
                    result = client.post(client.get_url(path), json=payload)
            except (gwexc.ConnectionFailedError, gwexc.ConnectionTimeoutError) as exc:
                attempts.append((self.endpoints[index], _unreachable_reason(exc)))
                continue
            except gwexc.Etcd3Exception as exc:
                self._current = index  # it answered, even if with a refusal
                raise _server_error(exc) from exc
            except (OSError, ValueError) as exc:
                # not JSON, or a requests error etcd3gw did not wrap (RequestException is OSError)
                attempts.append((self.endpoints[index], f"{type(exc).__name__}: {exc}"))
                continue
            self._current = index
            return dict(result)
        raise EtcdUnavailable(attempts)

    # -- key-value ---------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes | None, int, int]:
        """``(value or None, mod_revision, header_revision)``; mod_revision 0 when absent."""
        result = self.range(key, b"")
        if not result.kvs:
            return None, 0, result.header_revision
        kv = result.kvs[0]
        return kv.value, kv.mod_revision, result.header_revision

    def range(self, start: bytes, end: bytes, *, limit: int = 0, revision: int = 0,
              sort_by_create: bool = False) -> RangeResult:
        """Keys in ``[start, end)`` (``end`` b"" means just ``start``), at ``revision`` or now.

        Raises ``EtcdCompacted`` when ``revision`` has been compacted.
        """
        payload: dict[str, Any] = {"key": _encode(start)}
        if end:
            payload["range_end"] = _encode(end)
        if limit:
            payload["limit"] = limit
        if revision:
            payload["revision"] = revision
        if sort_by_create:
            payload["sort_order"] = SORT_ASCEND
            payload["sort_target"] = SORT_BY_CREATE
        result = self._call("/kv/range", payload)
        return RangeResult([kv_from_json(kv) for kv in result.get("kvs", [])],
                           bool(result.get("more", False)), _header_revision(result))

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Store ``value`` at ``key``; the new header revision."""
        payload: dict[str, Any] = {"key": _encode(key), "value": _encode(value)}
        if lease:
            payload["lease"] = lease
        return _header_revision(self._call("/kv/put", payload))

    def create(self, key: bytes, value: bytes, *, lease: int = 0,
               fence: tuple[bytes, int] | None = None) -> bool:
        """Put ``key`` only if it does not exist (and, with ``fence``, the fence still holds).

        ``fence=(fence_key, create_revision)``: the txn also compares
        ``create_revision(fence_key)`` with the one given, so a proposer whose
        election key was lost and re-created by someone else cannot write.
        After a failover retry a True create can come back False; a caller
        that must know reads the key back and compares the value.
        """
        compare = [{"key": _encode(key), "result": "EQUAL", "target": "VERSION", "version": 0}]
        if fence is not None:
            fence_key, fence_revision = fence
            compare.append({"key": _encode(fence_key), "result": "EQUAL", "target": "CREATE",
                            "create_revision": fence_revision})
        put: dict[str, Any] = {"key": _encode(key), "value": _encode(value)}
        if lease:
            put["lease"] = lease
        result = self._call("/kv/txn", {"compare": compare,
                                        "success": [{"request_put": put}], "failure": []})
        return bool(result.get("succeeded", False))

    def delete_range(self, start: bytes, end: bytes) -> int:
        """Delete ``[start, end)`` (``end`` b"" means just ``start``); how many were deleted."""
        payload = {"key": _encode(start)}
        if end:
            payload["range_end"] = _encode(end)
        return int(self._call("/kv/deleterange", payload).get("deleted", 0))

    # -- leases and election -----------------------------------------------

    def lease_grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        return int(self._call("/lease/grant", {"TTL": ttl_s, "ID": 0})["ID"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh the lease; its TTL in seconds, 0 or less when it is gone.

        The gateway leaves TTL out of the reply for an unknown lease (a zero
        field is not serialised), hence the default 0.
        """
        result = self._call("/lease/keepalive", {"ID": lease_id})
        return int(result.get("result", result).get("TTL", 0))

    def lease_revoke(self, lease_id: int) -> None:
        """End the lease and delete its keys; a lease already gone is not an error.

        A revoke that committed but whose reply was lost is retried on another
        endpoint and then finds no lease: that is success too.
        """
        try:
            self._call("/lease/revoke", {"ID": lease_id})
        except EtcdError as exc:
            if exc.code != GRPC_NOT_FOUND:
                raise

    def campaign(self, key: bytes, value: bytes, lease_id: int) -> tuple[bool, bytes | None, int]:
        """Try to become the holder of ``key``: ``(won, holder_value, holder_create_revision)``.

        Whoever created the key holds it until its lease ends (revoked or
        expired deletes the key). The create_revision is the holder's fencing
        token for ``create(..., fence=(key, revision))``. A failover retry of
        our own winning txn finds the key held under our lease: that is a win.
        """
        ekey = _encode(key)
        result = self._call("/kv/txn", {
            "compare": [{"key": ekey, "result": "EQUAL", "target": "CREATE",
                         "create_revision": 0}],
            "success": [{"request_put": {"key": ekey, "value": _encode(value),
                                         "lease": lease_id}}],
            "failure": [{"request_range": {"key": ekey}}],
        })
        if result.get("succeeded", False):
            return True, value, _header_revision(result)
        kvs = result.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
        if not kvs:  # the holder's lease ended between compare and range: cannot happen in a txn
            return False, None, 0
        holder = kv_from_json(kvs[0])
        return holder.lease == lease_id, holder.value, holder.create_revision

    # -- maintenance and membership ----------------------------------------

    def compact(self, revision: int, physical: bool = True) -> None:
        """Drop history before ``revision``; ``physical`` waits until it is gone from disk."""
        self._call("/kv/compaction", {"revision": revision, "physical": physical})

    def status(self) -> dict[str, Any]:
        """The answering member's status (``endpoint`` says which one answered)."""
        result = self._call("/maintenance/status", {})
        header = result.get("header", {})
        return {"endpoint": self.endpoint, "version": result.get("version", ""),
                "member_id": int(header.get("member_id", 0)),
                "leader": int(result.get("leader", 0)),
                "raft_term": int(result.get("raftTerm", header.get("raft_term", 0))),
                "raft_index": int(result.get("raftIndex", 0)),
                "db_size": int(result.get("dbSize", 0)),
                "revision": _header_revision(result)}

    def member_list(self) -> list[dict[str, Any]]:
        """The members: ``id``, ``name`` ("" until started), ``peer_urls``, ``client_urls``."""
        return [_member(m) for m in self._call("/cluster/member/list", {}).get("members", [])]

    def member_add(self, peer_urls: Sequence[str]) -> dict[str, Any]:
        """Announce a new member (start it afterwards with initial-cluster-state existing)."""
        return _member(self._call("/cluster/member/add", {"peerURLs": list(peer_urls)})["member"])

    def member_remove(self, member_id: int) -> None:
        self._call("/cluster/member/remove", {"ID": member_id})


def _member(m: dict[str, Any]) -> dict[str, Any]:
    return {"id": int(m.get("ID", 0)), "name": m.get("name", ""),
            "peer_urls": list(m.get("peerURLs", [])), "client_urls": list(m.get("clientURLs", []))}
