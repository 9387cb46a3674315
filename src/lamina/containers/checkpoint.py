"""Checkpoints of containers as OCI image indexes, and restore from them.

A checkpoint is an image whose target is an OCI image index; its
``manifests`` are, each with the host platform:

* the CRIU image directory as a tar (``MediaType.CHECKPOINT_CRIU``);
* with ``binds``, one tar per bind mount source (``CHECKPOINT_BINDS``),
  annotated with the mount's destination and source;
* the container's rw layer — the diff of its revision snapshot against the
  image — as a gzip layer (``CHECKPOINT_RW``, annotated with its DiffID);
* a JSON config (``CHECKPOINT_CONFIG``): container id, image name and target,
  options, runtime spec, snapshotter, runtime;
* the container image's own target descriptor (first), so that the index
  reaches the image's manifest, config and layers: exporting the checkpoint
  image exports the image with it, and garbage collection keeps it.

The index is annotated with the runtime (``io.containerd.runtime.v2.runc``,
runc's version) and the snapshotter, and carries containerd's GC reference
labels (``containerd.io/gc.ref.content.m.<i>``). Everything is written while a
lease is held, so a concurrent ``gc`` cannot take blobs before they are
referenced.

A restore (:meth:`Checkpoints.restoring`) registers the checkpoint's image
from the index if this root does not know it (e.g. after ``image import`` of
an exported checkpoint); the container service makes a new container on it,
and the restore then applies the rw layer onto its revision, puts bind mount
contents back (at their original sources, or under a ``bind_root``: only
where the caller asks, since the checkpoint names those paths), unpacks
the CRIU images into a temporary directory and has runc/CRIU restore the
process tree there.

This module works on container records it is handed and on the task manager;
it never creates, removes or starts containers itself
(:mod:`lamina.containers.service` sequences that).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from lamina.archive.apply import apply_layer
from lamina.archive.changes import write_diff
from lamina.containers.options import bind_mounts, options_of, parse_options
from lamina.containers.runtime import TaskInfo, TaskManager, TaskStatus
from lamina.containers.taskstate import Hold, keep, resume_paused, task_of, unkeep
from lamina.content import ContentStore
from lamina.differ import DiffOutcome, apply_diff, create_diff
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LaminaError,
    NotFound,
    printable,
)
from lamina.fs.files import remove_tree, sync_filesystem
from lamina.images.graph import label_references, put_document, read_document
from lamina.images.service import ImageService
from lamina.labels import CHECKPOINT, RESTORED_FROM_ANNOTATION
from lamina.metadata.containers import Container
from lamina.metadata.images import Image
from lamina.metadata.root import Root
from lamina.metadata.workdirs import (
    interrupted,
    mark_stopped,
    paused,
    root_work_dirs,
    unmark_stopped,
    work_dir,
)
from lamina.mounts.mount import Mount
from lamina.oci.types import Descriptor, Index, MediaType, host_platform
from lamina.util import crash
from lamina.util.signals import deferred

__all__ = [
    "ANNOTATION_BIND_DESTINATION",
    "ANNOTATION_BIND_SOURCE",
    "ANNOTATION_RUNTIME",
    "ANNOTATION_SNAPSHOTTER",
    "RUNTIME",
    "Checkpoint",
    "CheckpointResult",
    "Checkpoints",
    "RestoreJob",
    "RestoreResult",
    "default_ref",
]

RUNTIME = "io.containerd.runtime.v2.runc"
ANNOTATION_RUNTIME = "io.containerd.checkpoint.runtime"
ANNOTATION_RUNC_VERSION = "io.containerd.checkpoint.runtime.version"
ANNOTATION_SNAPSHOTTER = "io.containerd.checkpoint.snapshotter"
ANNOTATION_IMAGE = "io.containerd.checkpoint.image.name"
ANNOTATION_CONTAINER = "io.containerd.checkpoint.container"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_BIND_DESTINATION = "lamina.io/checkpoint.bind.destination"
ANNOTATION_BIND_SOURCE = "lamina.io/checkpoint.bind.source"
ANNOTATION_BIND_KIND = "lamina.io/checkpoint.bind.kind"
ANNOTATION_DIFF_ID = "lamina.io/checkpoint.rw.diff-id"

_CONFIG_VERSION = 1
#: where a checkpoint or restore keeps CRIU's images in its work directory
_DUMP = "criu"
_CHUNK = 1 << 20


def default_ref(cid: str) -> str:
    """``checkpoint/<id>:<UTC timestamp with microseconds>``."""
    return f"checkpoint/{cid}:{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


def _runc_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("runc version").strip() or "unknown"


class _BlobWriter:
    """A content-store ingest as a write-only binary file."""

    def __init__(self, content: ContentStore, ref: str) -> None:
        self._content = content
        self._ref = ref
        self._w = content.writer(ref)
        self.size = 0

    def write(self, data: bytes) -> int:
        self._w.write(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def commit(self, media_type: str, annotations: Mapping[str, str] | None = None
               ) -> Descriptor:
        digest = self._w.digest()
        with contextlib.suppress(AlreadyExists):
            self._w.commit(self.size, digest)
        self._w.close()
        return Descriptor(media_type, digest, self.size, dict(annotations or {}),
                          host_platform())

    def abort(self) -> None:
        self._w.close()
        with contextlib.suppress(NotFound):
            self._content.abort(self._ref)


@contextlib.contextmanager
def _ingest(content: ContentStore, what: str) -> Iterator[_BlobWriter]:
    w = _BlobWriter(content, f"checkpoint-{what}-{time.time_ns()}-{secrets.token_hex(4)}")
    try:
        yield w
    except BaseException:
        w.abort()
        raise


def _tar_tree(content: ContentStore, src: Path, media_type: str, what: str,
              annotations: Mapping[str, str] | None = None) -> Descriptor:
    """Tar a directory (its contents, not itself) into a blob."""
    with _ingest(content, what) as w:
        write_diff(None, src, cast(BinaryIO, w), compression="none")
        return w.commit(media_type, annotations)


def _tar_file(content: ContentStore, src: Path, media_type: str, what: str,
              annotations: Mapping[str, str] | None = None) -> Descriptor:
    """Tar one regular file (as the member ``file``) into a blob."""
    with _ingest(content, what) as w:
        with tarfile.open(fileobj=cast(IO[bytes], w), mode="w|",
                          format=tarfile.PAX_FORMAT) as tar:
            info = tar.gettarinfo(str(src), arcname="file")
            with open(src, "rb") as f:
                tar.addfile(info, f)
        return w.commit(media_type, annotations)


def _put_json(content: ContentStore, obj: Any, media_type: str,
              *, platform: bool = True) -> Descriptor:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    digest = put_document(content, data)
    return Descriptor(media_type, digest, len(data), {}, host_platform() if platform else None)


@dataclass(frozen=True)
class _Timed:
    """A result that says how long its phases took (``timings``, seconds by phase)."""

    timings: Mapping[str, float] = field(default_factory=dict, kw_only=True)

    @property
    def seconds(self) -> float:
        return self.timings.get("total", 0.0)


@dataclass(frozen=True)
class CheckpointResult(_Timed):
    """A finished checkpoint: its image, its index descriptor and what it took."""

    ref: str
    index: Descriptor
    container: str


@dataclass(frozen=True)
class RestoreResult(_Timed):
    container: Container
    task: TaskInfo


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint index, read back: its parts by role."""

    ref: str
    index: Descriptor
    annotations: Mapping[str, str]
    config: Mapping[str, Any]
    criu: Descriptor
    rw: Descriptor | None
    binds: tuple[Descriptor, ...]
    image_target: Descriptor | None


class _Timer:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t

    def done(self) -> dict[str, float]:
        self.timings["total"] = time.monotonic() - self.started
        return {k: round(v, 4) for k, v in self.timings.items()}


class Checkpoints:
    """Checkpoint images of the containers of one root: write, read, restore's parts.

    It works on a container record it is handed and on the root's task
    manager; making the container a restore runs in, and removing it again,
    is the caller's (:class:`~lamina.containers.service.ContainerService`).
    """

    def __init__(self, root: Root, *, images: ImageService, tasks: TaskManager) -> None:
        self.root = root
        self.images = images
        self.tasks = tasks
        self.content: ContentStore = images.content
        self._work, self._work_lock = root_work_dirs(root.path)

    def _work_dir(self, name: str) -> contextlib.AbstractContextManager[Path]:
        return work_dir(self._work, name, lock=self._work_lock)

    def recover_interrupted(self) -> list[str]:
        """Put right what checkpoints and restores that died left behind: resume a
        task one of them paused, remove their work directories. What was done, in
        sentences (``lamina check --repair`` prints them)."""
        done = []
        for left in interrupted(self._work, lock=self._work_lock):
            if left.paused and resume_paused(self.tasks, left.paused):
                done.append(f"resumed the task of container {left.paused}, paused by "
                            "an interrupted checkpoint")
            info = task_of(self.tasks, left.stopped) if left.stopped else None
            if info is not None and info.status == TaskStatus.STOPPED:
                try:
                    self._restore_in_place(left.stopped, left.path)
                    done.append(f"restored the task of container {left.stopped} from the "
                                "dump of an interrupted checkpoint --exit")
                except LaminaError as exc:  # a dump cut short: nothing to restore
                    done.append(f"could not restore the task of container {left.stopped} "
                                f"from the dump of an interrupted checkpoint --exit: "
                                f"{exc.message}")
            remove_tree(left.path)
            done.append(f"removed the work directory {left.path} of an interrupted "
                        "checkpoint or restore")
        return done

    @contextlib.contextmanager
    def _restored_on_failure(self, cid: str, workdir: Path) -> Iterator[None]:
        """Around an exiting checkpoint: once its dump has stopped the task, a
        failure storing the checkpoint (its images on a full disk) or an
        interruption (SIGTERM) would lose the task, so it is restored from that
        dump, in place, and the error says so — or that the restore failed too."""
        try:
            yield
        except BaseException as exc:
            info = task_of(self.tasks, cid)
            if (info is None or info.status != TaskStatus.STOPPED
                    or not (workdir / _DUMP / "inventory.img").exists()):
                raise  # not dumped: the task is as it was
            try:
                with deferred():  # a second SIGTERM must not cut the restore short
                    self._restore_in_place(cid, workdir)
                outcome = "the task was restored from its dump and runs on"
            except Exception as again:
                why = again.message if isinstance(again, LaminaError) else repr(again)
                outcome = f"restoring the task from its dump failed too: {why}"
            if isinstance(exc, LaminaError):
                raise type(exc)(f"{exc.message} ({outcome})") from exc
            raise
        unmark_stopped(workdir)

    def _restore_in_place(self, cid: str, workdir: Path) -> None:
        """Restore the task an exiting dump in ``workdir`` stopped, as it was."""
        self.tasks.restore(cid, workdir / _DUMP, detach=True, work_dir=workdir / "undo")
        unkeep(self.tasks, cid)

    def interrupted(self) -> list[str]:
        """What :meth:`recover_interrupted` would put right, in sentences."""
        out = []
        for left in interrupted(self._work, lock=self._work_lock):
            paused = (f" (it paused container {left.paused}'s task)" if left.paused else
                      f" (its dump stopped container {left.stopped}'s task)" if left.stopped
                      else "")
            out.append(f"{left.path}: work directory of an interrupted checkpoint or "
                       f"restore{paused}")
        return out

    # -- checkpoint --------------------------------------------------------------

    def checkpoint(self, container: Container, ref: str | None = None, *, exit: bool = False,
                   binds: bool = False) -> CheckpointResult:
        """Checkpoint the running task of ``container`` into image ``ref``.

        The task is paused while its rw layer, (with ``binds``) its bind mounts
        and then its memory are saved, and resumed afterwards — also on failure.
        With ``exit`` the dump stops it; what can fail on the way (a full disk,
        a file that cannot go into a layer) is saved before the dump, so a
        failed checkpoint leaves the task running either way. A dump CRIU
        could not start is tried again after the task ran a moment, its files
        saved again.
        """
        timer = _Timer()
        cid = container.id
        ref = ref or default_ref(cid)
        with contextlib.suppress(NotFound):
            self.images.get(ref)
            raise AlreadyExists(f"image {ref!r} already exists")
        info = task_of(self.tasks, cid)
        if info is None or info.status not in (TaskStatus.RUNNING, TaskStatus.PAUSED):
            state = "no task" if info is None else f"a {info.status} task"
            raise FailedPrecondition(f"container {cid!r} has {state}; nothing to checkpoint")
        tm = self.tasks
        spec = json.loads((info.bundle / "config.json").read_text())
        linux = spec.get("linux") or {}
        if linux.get("cgroupsPath") == tm.cgroups_path(cid):
            del linux["cgroupsPath"]  # lamina's default for this id: a restore gets its own
        spec.get("root", {}).pop("path", None)  # the bundle's business
        options = options_of(container)
        image = self.images.get(container.image)
        name = f"{cid}-{time.time_ns()}-{secrets.token_hex(3)}"
        # once an exiting dump has stopped the task, a failure or an interruption
        # before the checkpoint is stored restores it from that dump
        # (_restored_on_failure)
        with self.root.leases().held(purpose="checkpoint"), \
                self._work_dir(name) as workdir, \
                (self._restored_on_failure(cid, workdir) if exit else contextlib.nullcontext()):
            rw, bind_descs = self._dump(container, options, workdir=workdir,
                                        pause=info.status == TaskStatus.RUNNING,
                                        exit=exit, binds=binds, timer=timer)
            index_desc = self._store(ref, container, image, spec, options, exited=exit,
                                     images_dir=workdir / _DUMP, rw=rw, binds=bind_descs,
                                     timer=timer)
        return CheckpointResult(ref=ref, index=index_desc, container=cid, timings=timer.done())

    def _dump(self, container: Container, options: Mapping[str, Any], *, workdir: Path,
              pause: bool, exit: bool, binds: bool,
              timer: _Timer) -> tuple[DiffOutcome, list[Descriptor]]:
        """Save the task's files — its rw layer, with ``binds`` its bind mounts —
        then dump it into ``workdir``, the task paused (when ``pause``) and let go
        after, also on failure. The files first: a failure there leaves the task
        as it was, which after an exiting dump it could not be. What the files
        were saved as (again after a dump CRIU retried: the task ran meanwhile)."""
        cid, tm = container.id, self.tasks
        saved: list[tuple[DiffOutcome, list[Descriptor]]] = []

        def save_files() -> None:
            bind_descs: list[Descriptor] = []
            if binds:
                with timer.phase("binds"):
                    bind_descs = self._checkpoint_binds(options)
            with timer.phase("rw_diff"):
                saved.append((create_diff(self.images.snapshots, self.content,
                                          container.snapshot_key,
                                          tmpmounts=str(self.root.tmpmounts)), bind_descs))

        def settle(seconds: float) -> None:
            held = hold.paused
            hold.settle(seconds)
            if held:  # it ran meanwhile: its files as they are now
                save_files()

        hold = Hold(tm, cid)
        # a crash between pause and resume leaves a mark that `lamina check
        # --repair` finds (recover_interrupted): the task is resumed then
        with paused(workdir, cid) if pause else contextlib.nullcontext():
            try:
                if pause:
                    with timer.phase("pause"):
                        hold.pause()
                save_files()
                if exit:  # the dump ends the task; the container stays for the image
                    keep(tm, cid)
                    # killed from here until the checkpoint is stored, `check
                    # --repair` restores the task from the dump
                    mark_stopped(workdir, cid)
                with timer.phase("criu_dump"):
                    tm.checkpoint(cid, workdir / _DUMP, leave_running=not exit,
                                  work_dir=workdir / "work", settle=settle)
                crash.point("checkpoint.dumped")
                if exit:
                    hold.ended()
            finally:
                if hold.paused:
                    with timer.phase("resume"):
                        hold.resume()
        return saved[-1]

    def _store(self, ref: str, container: Container, image: Image, spec: dict[str, Any],
               options: dict[str, Any], *, exited: bool, images_dir: Path, rw: DiffOutcome,
               binds: list[Descriptor], timer: _Timer) -> Descriptor:
        """Store a dumped checkpoint: its CRIU images, config and index, and image
        ``ref`` naming it. The index's descriptor."""
        cid = container.id
        with timer.phase("criu_tar"):
            criu_desc = _tar_tree(self.content, images_dir, MediaType.CHECKPOINT_CRIU,
                                  "criu")
        rw_desc = Descriptor(MediaType.CHECKPOINT_RW, rw.descriptor.digest,
                             rw.descriptor.size, {ANNOTATION_DIFF_ID: rw.diff_id},
                             host_platform())
        runc_version = _runc_version(self.tasks.runc.binary)
        config = {
            "version": _CONFIG_VERSION,
            "id": cid,
            "image": container.image,
            "image_target": image.target.to_json(),
            "snapshotter": container.snapshotter,
            "runtime": {"name": RUNTIME, "runc_version": runc_version},
            "options": options,
            "labels": dict(container.labels),
            "spec": spec,
            "exited": exited,
            "created": datetime.now(UTC).isoformat(),
        }
        with timer.phase("index"):
            config_desc = _put_json(self.content, config, MediaType.CHECKPOINT_CONFIG)
            # the image first: tools that pick "the" manifest of an index by
            # platform alone (skopeo) find the image's, not a checkpoint blob
            target = image.target
            annotations = {k: v for k, v in target.annotations.items()
                           if k != "org.opencontainers.image.ref.name"}
            annotations["io.containerd.image.name"] = container.image
            image_desc = Descriptor(target.media_type, target.digest, target.size,
                                    annotations, target.platform or host_platform())
            manifests = [image_desc, criu_desc, *binds, rw_desc, config_desc]
            index = {
                "schemaVersion": 2,
                "mediaType": MediaType.OCI_INDEX,
                "manifests": [d.to_json() for d in manifests],
                "annotations": {
                    ANNOTATION_RUNTIME: RUNTIME,
                    ANNOTATION_RUNC_VERSION: runc_version,
                    ANNOTATION_SNAPSHOTTER: container.snapshotter,
                    ANNOTATION_IMAGE: container.image,
                    ANNOTATION_CONTAINER: cid,
                    ANNOTATION_CREATED: config["created"],
                },
            }
            index_desc = _put_json(self.content, index, MediaType.OCI_INDEX,
                                   platform=False)
            label_references(self.content, index_desc)
            self.images.images.put(Image(
                name=ref, target=index_desc,
                labels={CHECKPOINT: cid}))
        return index_desc

    def _checkpoint_binds(self, options: Mapping[str, Any]) -> list[Descriptor]:
        out = []
        for i, bm in enumerate(bind_mounts(options)):
            src = Path(bm.source)
            ann = {ANNOTATION_BIND_DESTINATION: bm.destination, ANNOTATION_BIND_SOURCE: bm.source}
            if src.is_dir():
                ann[ANNOTATION_BIND_KIND] = "dir"
                out.append(_tar_tree(self.content, src, MediaType.CHECKPOINT_BINDS,
                                     f"bind{i}", ann))
            elif src.is_file():
                ann[ANNOTATION_BIND_KIND] = "file"
                out.append(_tar_file(self.content, src, MediaType.CHECKPOINT_BINDS,
                                     f"bind{i}", ann))
            else:
                raise FailedPrecondition(f"bind mount source {bm.source} is neither a "
                                         "directory nor a regular file; cannot archive it")
        return out

    # -- reading -----------------------------------------------------------------

    def read(self, ref: str) -> Checkpoint:
        """The checkpoint registered as image ``ref``."""
        image = self.images.get(ref)
        if image.target.media_type != MediaType.OCI_INDEX:
            raise InvalidArgument(f"image {ref!r} is not a checkpoint (target is "
                                  f"{image.target.media_type})")
        raw = json.loads(read_document(self.content, image.target))
        index = Index.parse(read_document(self.content, image.target))
        by_type: dict[str, list[Descriptor]] = {}
        for d in index.manifests:
            by_type.setdefault(d.media_type, []).append(d)
        criu = by_type.get(MediaType.CHECKPOINT_CRIU, [])
        cfg = by_type.get(MediaType.CHECKPOINT_CONFIG, [])
        if len(criu) != 1 or len(cfg) != 1:
            raise InvalidArgument(f"image {ref!r} is not a checkpoint: it needs one CRIU "
                                  "blob and one checkpoint config")
        config = json.loads(read_document(self.content, cfg[0]))
        if not isinstance(config, dict):
            raise InvalidArgument(f"{ref}: checkpoint config is not an object")
        _check_config(ref, config)
        rw = by_type.get(MediaType.CHECKPOINT_RW, [])
        image_target: Descriptor | None = None
        if isinstance(config.get("image_target"), dict):
            image_target = Descriptor.from_json(config["image_target"], "checkpoint image")
        return Checkpoint(
            ref=ref, index=image.target, annotations=dict(raw.get("annotations") or {}),
            config=config, criu=criu[0], rw=rw[0] if rw else None,
            binds=tuple(by_type.get(MediaType.CHECKPOINT_BINDS, [])),
            image_target=image_target)

    def list(self) -> list[Checkpoint]:
        """Every image of this root that is a readable checkpoint (others are skipped)."""
        out = []
        for image in self.images.images.list():
            if CHECKPOINT not in image.labels:
                continue
            with contextlib.suppress(LaminaError):
                out.append(self.read(image.name))
        return out

    # -- restore -----------------------------------------------------------------

    def _ensure_image(self, ckpt: Checkpoint) -> str:
        """The checkpoint's image name; registered from the index when missing here."""
        name = str(ckpt.config.get("image") or "")
        if not name:
            raise InvalidArgument(f"{ckpt.ref}: checkpoint names no image")
        try:
            self.images.get(name)
        except NotFound:
            if ckpt.image_target is None:
                raise
            try:
                self.content.info(ckpt.image_target.digest)
            except NotFound:
                raise NotFound(f"image {name!r} of checkpoint {ckpt.ref} is not here, and "
                               "neither is its manifest") from None
            self.images.images.put(Image(name=name, target=ckpt.image_target))
        return name

    @contextlib.contextmanager
    def restoring(self, ref: str, cid: str, *,
                  bind_root: str | os.PathLike[str] | None = None,
                  binds: bool = False) -> Iterator[RestoreJob]:
        """Checkpoint ``ref`` read and checked, its image registered, a lease and a
        work directory held for the block: the :class:`RestoreJob` that restores it
        as container ``cid``, once the caller has made that container.

        Bind mount contents archived with the checkpoint are written only where
        the caller says: with ``binds`` back to the host paths the checkpoint
        records, with ``bind_root`` under ``<bind_root>/<destination>`` (and the
        job's options and spec mount them from there). A checkpoint that carries
        bind contents is refused without either: those paths come from the
        checkpoint, which may have come from a registry.
        """
        timer = _Timer()
        ckpt = self.read(ref)
        if ckpt.annotations.get(ANNOTATION_RUNTIME, RUNTIME) != RUNTIME:
            raise FailedPrecondition(f"{ref}: checkpoint of runtime "
                                     f"{ckpt.annotations[ANNOTATION_RUNTIME]}, not {RUNTIME}")
        options: dict[str, Any] = dict(ckpt.config.get("options") or {})
        spec: dict[str, Any] = json.loads(json.dumps(ckpt.config.get("spec") or {}))
        if not spec:
            raise InvalidArgument(f"{ref}: checkpoint has no runtime spec")
        targets = _bind_targets(ckpt, options, spec, bind_root=bind_root, binds=binds)
        spec.setdefault("annotations", {})[RESTORED_FROM_ANNOTATION] = ref
        name = f"restore-{cid}-{time.time_ns()}-{secrets.token_hex(3)}"
        with self.root.leases().held(purpose="restore"), self._work_dir(name) as workdir:
            yield RestoreJob(self, ckpt, image=self._ensure_image(ckpt),
                             labels={**(ckpt.config.get("labels") or {}), CHECKPOINT: ref},
                             options=options, spec=spec, binds=targets, workdir=workdir,
                             timer=timer)


def _check_config(ref: str, config: dict[str, Any]) -> None:
    """Check the parts of a checkpoint config a restore reads (it may come from a
    registry): InvalidArgument unless they have the shapes a checkpoint writes.
    The options are made again (:func:`parse_options`)."""
    what = f"{ref}: checkpoint config"
    config["options"] = parse_options(config.get("options"), what)
    labels = config.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
        raise InvalidArgument(f"{what}: its labels are not an object of strings")
    spec = config.get("spec")
    if spec is not None:
        _check_spec(what, spec)
    for key in ("image", "snapshotter"):
        if not isinstance(config.get(key) or "", str):
            raise InvalidArgument(f"{what}: its {key!r} is not a string")


#: each shape a spec part may need to have: how it is told, how it is said
_SHAPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "obj": (lambda v: isinstance(v, dict), "an object"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "a list of strings"),
    "[obj]": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
              "a list of objects"),
}

#: the parts of a runtime spec lamina reads or runc unmarshals strictly, by path,
#: and the shape (of :data:`_SHAPES`) each must have when present
_SPEC_SHAPE: dict[tuple[str, ...], str] = {
    (): "obj", ("annotations",): "obj", ("hostname",): "str", ("root",): "obj",
    ("process",): "obj", ("process", "args"): "[str]", ("process", "env"): "[str]",
    ("process", "cwd"): "str", ("process", "user"): "obj", ("mounts",): "[obj]",
    ("linux",): "obj", ("linux", "namespaces"): "[obj]",
}


def _check_spec(what: str, spec: object) -> None:
    """InvalidArgument unless each part of ``spec`` in :data:`_SPEC_SHAPE` that is
    there has its shape (a checkpoint's spec is read by the network attachment
    and by runc before any process runs), and unless it has no hooks: commands
    runc would run on the host, outside any container, which lamina never writes."""
    if isinstance(spec, dict) and spec.get("hooks"):
        raise InvalidArgument(f"{what}: its runtime spec has hooks (commands runc runs on "
                              "the host); lamina writes none and restores none")
    for path, shape in _SPEC_SHAPE.items():
        value: Any = spec
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        fits, said = _SHAPES[shape]
        if value is not None and not fits(value):
            where = f"runtime spec's {'.'.join(path)}" if path else "runtime spec"
            raise InvalidArgument(f"{what}: its {where} is not {said}")


def _beneath(base: Path, destination: str, ref: str) -> Path:
    """``base/<destination>`` for an absolute ``destination`` (as options hold):
    InvalidArgument unless it stays below ``base`` (no ``..``, not the root itself)."""
    parts = [p for p in destination.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise InvalidArgument(f"{ref}: bind mount destination {destination!r} would not "
                              "stay under --bind-root")
    return base.joinpath(*parts)


def _bind_targets(ckpt: Checkpoint, options: dict[str, Any], spec: dict[str, Any], *,
                  bind_root: str | os.PathLike[str] | None,
                  binds: bool) -> list[tuple[Descriptor, Path]]:
    """Where each bind archive of ``ckpt`` is written back, checked before anything
    is made; with ``bind_root`` the mounts of ``options`` and ``spec`` are moved there."""
    ref = ckpt.ref
    if bind_root is not None and binds:
        raise InvalidArgument("bind mount contents go either back to their sources "
                              "(binds) or under a bind root, not both")
    if bind_root is not None:
        base = Path(bind_root).absolute()
        moved: dict[str, str] = {}  # destination -> new source
        # both lists were checked as the config was read (parse_options, _check_spec)
        for m in options.get("mounts") or []:
            new = str(_beneath(base, m["destination"], ref))
            moved[m["destination"]] = new
            m["source"] = new
        for m in spec.get("mounts") or []:
            dest = m.get("destination")
            if m.get("type") == "bind" and isinstance(dest, str) and dest in moved:
                m["source"] = moved[dest]
        placed = []
        for desc in ckpt.binds:
            wanted = desc.annotations.get(ANNOTATION_BIND_DESTINATION, "")
            if wanted not in moved:
                raise InvalidArgument(
                    f"{ref}: bind archive {desc.digest} is for {printable(wanted)!r}, "
                    "which no mount of the checkpoint has")
            placed.append((desc, Path(moved[wanted])))
        return placed
    sources = [desc.annotations.get(ANNOTATION_BIND_SOURCE, "") for desc in ckpt.binds]
    for desc, source in zip(ckpt.binds, sources, strict=True):
        if not source or not os.path.isabs(source) or "\0" in source:
            raise InvalidArgument(f"bind archive {desc.digest} names no usable source path")
    if sources and not binds:
        shown = ", ".join(printable(s) for s in sources)
        raise FailedPrecondition(
            f"{ref}: the checkpoint carries the contents of bind mounts ({shown}); "
            "restore with --binds to write them back to those host paths, or with "
            "--bind-root DIR to put them under DIR")
    return [(desc, Path(source)) for desc, source in zip(ckpt.binds, sources, strict=True)]


def _restore_bind(content: ContentStore, desc: Descriptor, target: Path) -> None:
    if desc.annotations.get(ANNOTATION_BIND_KIND, "dir") == "file":
        target.parent.mkdir(parents=True, exist_ok=True)
        with content.reader(desc.digest) as r, \
                tarfile.open(fileobj=r, mode="r|") as tar:
            for member in tar:
                if member.name == "file" and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None
                    _copy_to(f, target, member.mode)
        return
    target.mkdir(parents=True, exist_ok=True)
    with content.reader(desc.digest) as r:
        apply_layer(r, target)


class RestoreJob:
    """A restore under way (see :meth:`Checkpoints.restoring`): what the new
    container is made of, and the steps that fill it and restore its task."""

    def __init__(self, checkpoints: Checkpoints, ckpt: Checkpoint, *, image: str,
                 labels: Mapping[str, str], options: Mapping[str, Any],
                 spec: dict[str, Any], binds: Sequence[tuple[Descriptor, Path]],
                 workdir: Path, timer: _Timer) -> None:
        self._cps = checkpoints
        self._ckpt = ckpt
        self.image = image
        self.labels = dict(labels)
        self.options = dict(options)
        self.spec = spec
        self._binds = list(binds)
        self._images_dir = workdir / _DUMP
        self._work = workdir / "work"
        self._timer = timer

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a step of the restore under ``name``."""
        return self._timer.phase(name)

    def fill(self, mounts: Sequence[Mount]) -> None:
        """Put the checkpoint's rw layer onto the new revision's ``mounts``, bind mount
        contents back, and the CRIU images into the work directory."""
        cps, ckpt = self._cps, self._ckpt
        if ckpt.rw is not None:
            with self.phase("rw_apply"):
                apply_diff(cps.content, ckpt.rw, mounts,
                           diff_id=ckpt.rw.annotations.get(ANNOTATION_DIFF_ID),
                           tmpmounts=cps.root.tmpmounts)
        with self.phase("binds"):
            for desc, target in self._binds:
                _restore_bind(cps.content, desc, target)
        # what the checkpoint's rw layer wrote into the new revision reaches the
        # disk before the task runs on it (as an upgrade's copied writes do)
        sync_filesystem(cps.root.path)
        self._images_dir.mkdir()
        with self.phase("criu_untar"), cps.content.reader(ckpt.criu.digest) as r:
            apply_layer(r, self._images_dir)

    def restore(self, cid: str, mounts: Sequence[Mount], *, detach: bool) -> TaskInfo:
        """Have runc/CRIU restore the process tree as ``cid``'s task on ``mounts``."""
        with self.phase("criu_restore"):
            return self._cps.tasks.restore(cid, self._images_dir, mounts=mounts,
                                           spec=self.spec, detach=detach, work_dir=self._work)

    def done(self) -> dict[str, float]:
        """The timings of the restore, with its total."""
        return self._timer.done()


def _copy_to(src: IO[bytes], dest: Path, mode: int) -> None:
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
    os.chmod(tmp, mode & 0o7777)
    os.replace(tmp, dest)
