"""One conversation with a registry about one repository.

A :class:`Session` knows the registry's endpoints (see :mod:`.hosts`), the
repository's path, the transport and the authorizer. :meth:`Session.request`
tries the endpoints that have the capability the operation needs, in order;
on each it

- answers a 401 once with the challenge's credentials or token (a second 401
  for a token fetched for that very request is :class:`~.auth.Unauthorized`).
  A challenge binds to the host that sent it: a 401 from a host a redirect
  led to is final, so the registry's credentials never reach another host;
- retries 429 and 5xx responses and network failures with exponential
  backoff (``Retry-After`` honoured, capped at ``max_wait``), ``attempts`` times
  in all, then moves to the next endpoint (a POST or PATCH that failed in the
  network is not sent again: the registry may have applied it);
- moves to the next endpoint on 404 too (a mirror need not have everything);
  a 404 from a mirror with a failed host after it is that failure, not NotFound.

What it returns is a response the caller interprets; the error raised when
every endpoint failed names the host, the request and the last answer.
"""

from __future__ import annotations

import email.utils
import random
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from lamina.errors import NotFound, Unavailable
from lamina.remotes.auth import Authorizer, Unauthorized
from lamina.remotes.hosts import Endpoint
from lamina.remotes.transport import (
    Body,
    ConnectionRefused,
    Response,
    TLSConfig,
    Transport,
    TransportError,
)

__all__ = ["RetryPolicy", "Session"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base: float = 0.5
    cap: float = 10.0
    max_wait: float = 30.0

    def delay(self, attempt: int, retry_after: str = "") -> float:
        if retry_after:
            wait: float | None = None
            seconds = retry_after.strip()
            if seconds.isascii() and seconds.isdigit():
                wait = float(seconds)  # 10**400 is inf: capped below
            else:
                try:
                    wait = email.utils.parsedate_to_datetime(retry_after).timestamp() \
                        - time.time()
                except (TypeError, ValueError, OverflowError, IndexError):
                    wait = None  # neither seconds nor an HTTP date: back off as usual
            if wait is not None:
                return max(0.0, min(wait, self.max_wait))
        return float(min(self.cap, self.base * (2 ** attempt)) * (0.5 + random.random() / 2))


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def tls_of(ep: Endpoint) -> TLSConfig:
    return TLSConfig(ca=ep.ca, client=ep.client, skip_verify=ep.skip_verify)


class Session:
    """Requests about repository ``path`` of registry ``namespace`` (see the module docs)."""

    def __init__(self, namespace: str, path: str, *, endpoints: Sequence[Endpoint],
                 transport: Transport, authorizer: Authorizer,
                 retry: RetryPolicy | None = None) -> None:
        self.namespace = namespace
        self.path = path
        self.endpoints = list(endpoints)
        self.transport = transport
        self.authorizer = authorizer
        self.retry = retry or RetryPolicy()

    def scope(self, actions: str = "pull", *, extra: Sequence[str] = ()) -> str:
        return " ".join([f"repository:{self.path}:{actions}", *extra])

    def endpoints_for(self, capability: str) -> Iterator[Endpoint]:
        found = False
        for ep in self.endpoints:
            if ep.can(capability):
                found = True
                yield ep
        if not found:
            raise Unavailable(f"{self.namespace}: no configured host may {capability}")

    def send(self, ep: Endpoint, method: str, url: str, *, scope: str,
             headers: Mapping[str, str] | None = None, body: Body = None,
             retry_status: bool = True) -> Response:
        """One request to ``url`` on endpoint ``ep``, with auth and retries.

        A ``url`` on another scheme or host (an upload ``Location``) gets
        neither the endpoint's Authorization nor its client certificate."""
        tls = tls_of(ep)
        own = _origin(url) == (ep.scheme, ep.host)
        if not own:
            tls = TLSConfig(ca=ep.ca, skip_verify=ep.skip_verify)
        # a mirror gets its own credentials only, never the registry's it stands in for
        creds_of = "" if ep.namespace else self.namespace
        fresh_token = False
        attempt = 0
        last = ""
        while True:
            hdrs = {k: ", ".join(v) for k, v in ep.headers.items()}
            hdrs.update(headers or {})
            auth = self.authorizer.header(ep.host, scope, creds_of) if own else ""
            if auth:
                hdrs["Authorization"] = auth
            try:
                resp = self.transport.request(method, url, headers=hdrs, body=body, tls=tls,
                                              proxy=ep.proxy)
            except TransportError as exc:
                last = exc.message
                attempt += 1
                if method in ("POST", "PATCH"):  # it may have been applied: not again
                    raise
                if isinstance(exc, ConnectionRefused):  # nothing listens: not worth a retry
                    raise
                if attempt >= self.retry.attempts:
                    raise TransportError(f"{last} (after {attempt} attempts)") from exc
                time.sleep(self.retry.delay(attempt - 1))
                continue
            if resp.status == 401 and _origin(resp.url) != (ep.scheme, ep.host):
                resp.close()
                raise Unauthorized(f"{resp.host}: {method} {self._short(url)}: a host "
                                   f"{ep.host} redirected to asks for authorization "
                                   f"(credentials go only to {ep.host})")
            if resp.status == 401:
                challenges = resp.headers.get_all("WWW-Authenticate") or []
                resp.close()
                if fresh_token:
                    raise Unauthorized(f"{ep.host}: {method} {self._short(url)}: unauthorized "
                                       "with the credentials and token it asked for")
                self.authorizer.challenged(ep.host, [str(c) for c in challenges], scope,
                                           creds_of, tls=tls, sent=auth,
                                           secure=ep.scheme == "https")
                fresh_token = True
                continue
            if resp.status == 403:
                resp.close()
                raise Unauthorized(f"{ep.host}: {method} {self._short(url)}: access denied "
                                   f"(403) for {scope}")
            if retry_status and resp.status in RETRY_STATUS:
                attempt += 1
                last = f"{resp.status} {resp.reason}"
                retry_after = resp.header("Retry-After")
                resp.close()
                if attempt >= self.retry.attempts:
                    raise Unavailable(f"{ep.host}: {method} {self._short(url)}: {last} "
                                      f"(after {attempt} attempts)")
                time.sleep(self.retry.delay(attempt - 1, retry_after))
                continue
            return resp

    def request(self, capability: str, method: str, suffix: str, *, scope: str,
                headers: Mapping[str, str] | None = None, body: Body = None,
                query: Sequence[tuple[str, str]] = ()) -> tuple[Endpoint, Response]:
        """``method`` on API path ``suffix`` of the first endpoint that answers."""
        errors: list[Exception] = []
        not_found: tuple[Endpoint, Response] | None = None
        for ep in self.endpoints_for(capability):
            try:
                resp = self.send(ep, method, ep.url(suffix, query), scope=scope,
                                 headers=headers, body=body)
            except (Unavailable, Unauthorized) as exc:
                errors.append(exc)
                continue
            if resp.status == 404:
                if not_found is not None:
                    not_found[1].close()
                not_found = (ep, resp)
                continue
            if not_found is not None:
                not_found[1].close()
            return ep, resp
        # a mirror's 404 says only that the mirror lacks it: a host after it that
        # failed (the registry down) is the answer, not "not found"
        if not_found is not None and not (errors and not_found[0].namespace):
            return not_found
        if not_found is not None:
            not_found[1].close()
        if len(errors) == 1:
            raise errors[0]
        raise Unavailable("; ".join(str(e) for e in errors) or
                          f"{self.namespace}: no host answered")

    @staticmethod
    def _short(url: str) -> str:
        return url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def not_found(what: str, resp: Response) -> NotFound:
    resp.close()
    return NotFound(f"{resp.host}: {what} not found")
