"""What command handlers share: the backend, the chosen snapshotter, output helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.api.backend import Backend, open_backend
from lamina.errors import NotImplementedErr
from lamina.owners import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from lamina.content import ContentStore
    from lamina.metadata.images import ImageRecords
    from lamina.metadata.recover import RecoveredRoot
    from lamina.snapshots import Snapshotter

__all__ = ["App"]


class App:
    """One command's view of its backend (:mod:`lamina.api.backend`): the local root,
    or the server at ``address``; resolved once, opened lazily (a command that needs
    no store opens none). ``command`` names the command in refusals. ``namespace``:
    lamina's own objects are in ``default``; another one shows that containerd
    namespace's snapshots, read-only (:mod:`lamina.snapshots.namespace`), and
    every command on lamina's own records or content refuses it.

    (A plain class: every command makes one, and a dataclass costs ~0.4 ms to define.)"""

    def __init__(self, root: str, snapshotter: str = "overlay", address: str | None = None,
                 command: str = "", namespace: str = DEFAULT_NAMESPACE) -> None:
        self.root = root
        self.snapshotter = snapshotter
        self.address = address
        self.command = command
        self.namespace = namespace
        self._backend: Backend | None = None

    def __repr__(self) -> str:
        return (f"App(root={self.root!r}, snapshotter={self.snapshotter!r}, "
                f"address={self.address!r}, command={self.command!r}, "
                f"namespace={self.namespace!r})")

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(root=self.root, address=self.address,
                                         opened=self._say_recovered)
        return self._backend

    def _say_recovered(self, root: RecoveredRoot) -> None:
        report = root.recovered
        if report is not None and (report.repaired or report.remaining):
            print(f"lamina: {self.root} was last used before the machine restarted; "
                  f"repaired {len(report.repaired)} leftover(s), "
                  f"{len(report.remaining)} problem(s) remain (see lamina check)",
                  file=sys.stderr)

    def _own_namespace(self) -> None:
        if self.namespace != DEFAULT_NAMESPACE:
            raise NotImplementedErr(
                f"{self.command or 'this command'}: lamina keeps its images, containers, "
                f"leases and content in namespace {DEFAULT_NAMESPACE!r} only; in "
                f"namespace {self.namespace!r} the snapshot commands show containerd's "
                "snapshots, read-only")

    @property
    def store_root(self) -> RecoveredRoot:
        """The local root; a command that needs it refuses to run through --address."""
        self._own_namespace()
        return self.backend.root(self.command)

    def snapshots(self) -> Snapshotter:
        """The snapshotter this invocation works on, local or (with --address) remote;
        in a namespace other than lamina's, that namespace's snapshots, read-only."""
        sn = self.backend.snapshotter(self.snapshotter)
        if self.namespace == DEFAULT_NAMESPACE:
            return sn
        from lamina.snapshots.namespace import NamespaceView

        return NamespaceView(sn, self.namespace)

    def content(self) -> ContentStore:
        """The content store: the local root's, or (with --address) a server's."""
        self._own_namespace()
        return self.backend.content()

    def images(self) -> ImageRecords:
        """The image records: the local root's, or (with --address) a server's."""
        self._own_namespace()
        return self.backend.images()

    def delete_image(self, name: str, *, sync: bool = False) -> None:
        """Delete image ``name`` (with ``sync``, collect) where the images are kept."""
        self._own_namespace()
        self.backend.delete_image(name, sync=sync)

    @property
    def tmpmounts(self) -> Path | None:
        """Where this command's temporary mounts go."""
        return self.backend.tmpmounts

    @staticmethod
    def print_json(obj: Any) -> None:
        json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
