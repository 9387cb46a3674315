"""Containers: an image plus an active snapshot, run with runc.

* :mod:`lamina.metadata.containers` — container records (metadata only);
* :mod:`lamina.containers.revisions` — create, upgrade, roll back;
* :mod:`lamina.containers.runtime` — OCI runtime specs and runc tasks;
* :mod:`lamina.containers.checkpoint` — CRIU checkpoint and restore.
"""
