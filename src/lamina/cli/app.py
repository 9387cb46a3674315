"""What command handlers share: the root, the chosen snapshotter, output helpers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.metadata.recover import RecoveredRoot

if TYPE_CHECKING:
    from lamina.content import ContentStore
    from lamina.snapshots import Snapshotter

__all__ = ["App"]


@dataclass
class App:
    """Opened lazily: a command that needs no store opens none."""

    root: str
    snapshotter: str = "overlay"
    address: str | None = None
    _root: RecoveredRoot | None = field(default=None, repr=False)
    _remote: Any = field(default=None, repr=False)
    _remote_content: Any = field(default=None, repr=False)

    @property
    def store_root(self) -> RecoveredRoot:
        if self._root is None:
            self._root = RecoveredRoot(self.root)
            report = self._root.recovered
            if report is not None and (report.repaired or report.remaining):
                print(f"lamina: {self.root} was last used before the machine restarted; "
                      f"repaired {len(report.repaired)} leftover(s), "
                      f"{len(report.remaining)} problem(s) remain (see lamina check)",
                      file=sys.stderr)
        return self._root

    def snapshots(self) -> Snapshotter:
        """The snapshotter this invocation works on, local or (with --address) remote."""
        if self.address:
            if self._remote is None:
                from lamina.api.client import RemoteSnapshotter

                self._remote = RemoteSnapshotter(self.address, self.snapshotter)
            sn: Snapshotter = self._remote
            return sn
        return self.store_root.snapshotter(self.snapshotter)

    def content(self) -> ContentStore:
        """The content store: the local root's, or (with --address) a server's."""
        if self.address:
            if self._remote_content is None:
                from lamina.api.client import RemoteContentStore

                self._remote_content = RemoteContentStore(self.address)
            store: ContentStore = self._remote_content
            return store
        return self.store_root.content()

    @staticmethod
    def print_json(obj: Any) -> None:
        json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")

    def close(self) -> None:
        for remote in (self._remote, self._remote_content):
            if remote is not None:
                remote.close()
        if self._root is not None:
            self._root.close()
