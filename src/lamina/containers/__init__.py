"""Containers: an image plus an active snapshot, run with runc.

Calls in this package go one way, top to bottom; a module uses only those
on the lines below its own, never one on its own line:

0. :mod:`.autoremove` — removes a container when its detached task ends
   (``run -d --rm``), through the service.
1. :mod:`.service` — :class:`~.service.ContainerService`, the one entry point
   (CLI, tests): it composes the services of line 2 and alone sequences
   work across them (start = spec, record, run; remove = task, revisions;
   restore = create, fill, record, restore the task).
2. :mod:`.revisions` — records and revision snapshots (create, upgrade, roll
   back, prune); :mod:`.tasks` — runtime specs, the mounts a task runs on,
   stop, delete; :mod:`.checkpoint` — checkpoint images (write, read, a restore's
   parts, recovery of interrupted ones); :mod:`.network` — a container's
   network (none, host, a CNI bridge) and its /etc/hosts and /etc/resolv.conf.
   None of them imports another.
3. :mod:`.options` — the options record a container keeps (args, env, bind
   mounts, user namespace, working directory, user); :mod:`.taskstate` — a
   container's task: there, live, paused, ended, stopped on purpose;
   :mod:`.logs` — what detached tasks wrote, bounded, kept until the
   container is removed.
4. :mod:`.runtime` — OCI runtime specs and runc/CRIU tasks, knowing nothing
   of containers.

Below the package: :mod:`lamina.metadata.containers` (the records),
:mod:`lamina.metadata.workdirs` (checkpoint work directories),
:mod:`lamina.images`, :mod:`lamina.differ`, :mod:`lamina.snapshots`.
"""
