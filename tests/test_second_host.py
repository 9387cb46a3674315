"""Two "second hosts" (``registry_peer.second_host``) at once in one process, as the CRI
benchmark's two nodes have them: each namespace has its own addresses and reaches
this side over its own veth pair."""

from __future__ import annotations

import socket
import subprocess
import sys

from conftest import require_root_user
from registry_peer import second_host


def test_two_second_hosts_at_once() -> None:
    require_root_user()
    with second_host() as (ns_a, host_a, there_a), second_host() as (ns_b, host_b, there_b):
        assert ns_a != ns_b
        assert len({host_a, host_b, there_a, there_b}) == 4
        for ns, host in ((ns_a, host_a), (ns_b, host_b)):
            with socket.create_server((host, 0)) as listener:
                port = listener.getsockname()[1]
                done = subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, "-c",
                     f"import socket; socket.create_connection(({host!r}, {port}), timeout=5)"],
                    capture_output=True, text=True, timeout=60, check=False)
                assert done.returncode == 0, done.stderr
