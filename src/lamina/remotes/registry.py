"""The registry client: one transport, one authorizer, the hosts configuration.

A :class:`Registry` is what ``pull`` and ``push`` are given; it opens a
:class:`~.session.Session` per repository. Options are the command line's:
``plain_http``, ``hosts_dirs`` (lamina's ``/etc/lamina/certs.d`` by default;
add ``/etc/containerd/certs.d`` to read containerd's), ``user`` (``--user``
credentials, for the registry of the reference only), ``docker_config``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lamina.oci.reference import Reference
from lamina.remotes.auth import Authorizer, Credentials, DockerConfig
from lamina.remotes.hosts import LAMINA_HOSTS_DIR, endpoints_for
from lamina.remotes.session import RetryPolicy, Session
from lamina.remotes.transport import Transport
from lamina.util.closing import Closing

__all__ = ["Registry"]


class Registry(Closing):
    def __init__(self, *, plain_http: bool = False,
                 hosts_dirs: Sequence[str | os.PathLike[str]] = (LAMINA_HOSTS_DIR,),
                 user: Credentials | None = None, user_host: str = "",
                 docker_config: DockerConfig | None = None,
                 retry: RetryPolicy | None = None,
                 transport: Transport | None = None) -> None:
        self.plain_http = plain_http
        self.hosts_dirs = tuple(hosts_dirs)
        self.retry = retry or RetryPolicy()
        self.transport = transport or Transport()
        self.authorizer = Authorizer(self.transport, user=user, user_host=user_host,
                                     config=docker_config)

    def session(self, ref: Reference) -> Session:
        """A session on ``ref``'s repository."""
        endpoints = endpoints_for(ref.domain, hosts_dirs=self.hosts_dirs,
                                  plain_http=self.plain_http)
        return Session(ref.domain, ref.path, endpoints=endpoints, transport=self.transport,
                       authorizer=self.authorizer, retry=self.retry)

    def close(self) -> None:
        self.transport.close()

