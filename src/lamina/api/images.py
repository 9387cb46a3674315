"""containerd's Images service (``containerd.services.images.v1.Images``) over a
root's image records, and its client.

containerd 1.6 keeps its own images in its own database and never calls this
service; it serves lamina's images — to lamina's client (``lamina --address
SOCK image ls|inspect|rm|tag``, :class:`RemoteImageStore`) and to any client
of containerd's API (``ctr --address SOCK images ls``).

* **Namespaces.** lamina keeps its images in containerd's ``default``
  namespace: a call naming another (``containerd-namespace`` metadata, as ctr
  sends it) finds none there and cannot write one.
* **Owners** (:mod:`lamina.api.owner`): every image is the CLI's. lamina's
  client reads and changes them as the CLI does locally; anyone else reads
  them, and a change is FailedPrecondition.
* **Delete** is :func:`lamina.metadata.deletes.delete_image`: with ``sync``, what
  the image alone kept is collected on the server before the answer, as a
  local ``image rm --sync`` does.
* **Checks at the door**, before anything is read or written: a name (at most
  :data:`MAX_NAME` bytes), a target with a valid digest, a media type, a size
  and at most a :data:`MAX_PLATFORM`-byte platform object (lamina's own field
  of the descriptor, which containerd's clients skip), labels within
  :data:`lamina.labels.MAX_LABEL_SIZE`, filters that parse; else InvalidArgument.
"""

from __future__ import annotations

import builtins
from dataclasses import replace

import grpc
from google.protobuf import empty_pb2

from lamina.api.client import RemoteStore, with_update_mask
from lamina.api.convert import image_from_pb, image_to_pb
from lamina.api.errors import rpc_errors, servicer_method
from lamina.api.gen.containerd.services.images.v1 import images_pb2 as impb
from lamina.api.gen.containerd.services.images.v1 import images_pb2_grpc as impb_grpc
from lamina.api.owner import caller_owner
from lamina.content.digest import validate_digest
from lamina.errors import AlreadyExists, Damaged, FailedPrecondition, InvalidArgument, NotFound
from lamina.labels import update_labels, validate_labels
from lamina.metadata.deletes import delete_image
from lamina.metadata.images import Image, ImageStore
from lamina.metadata.root import Root
from lamina.owners import CLI, DEFAULT_NAMESPACE
from lamina.util import filters

__all__ = ["MAX_NAME", "MAX_PLATFORM", "NAMESPACE_KEY", "ImagesService", "RemoteImageStore",
           "add_images_service"]

MAX_NAME = 4096
"""The longest image name the service takes, in bytes (UTF-8)."""

MAX_PLATFORM = 4096
"""The longest platform (JSON, lamina's own descriptor field) a target may carry."""

NAMESPACE_KEY = "containerd-namespace"
"""The call metadata in which containerd's clients name their namespace."""


def _check_name(name: str) -> str:
    if not name:
        raise InvalidArgument("image name must not be empty")
    size = len(name.encode())
    if size > MAX_NAME:
        raise InvalidArgument(f"image name {name[:64]!r}...: {size} bytes, "
                              f"more than the limit of {MAX_NAME}")
    return name


def _checked(msg: impb.Image) -> Image:
    """The image ``msg`` asks for, its name, labels and target checked as
    containerd checks them (module docs)."""
    _check_name(msg.name)
    validate_labels(dict(msg.labels))
    what = f"image {msg.name[:256]!r} target"
    if not msg.HasField("target"):
        raise InvalidArgument(f"{what}: a target descriptor is required")
    try:
        validate_digest(msg.target.digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None
    if not msg.target.media_type:
        raise InvalidArgument(f"{what}: the media type must be set")
    if msg.target.size <= 0:
        raise InvalidArgument(f"{what}: the size must be above zero, not {msg.target.size}")
    if len(msg.target.lamina_platform_json) > MAX_PLATFORM:
        raise InvalidArgument(f"{what}: the platform is more than {MAX_PLATFORM} bytes")
    return image_from_pb(msg)


def _namespace(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_KEY:
            return str(value)
    return DEFAULT_NAMESPACE


def _fields(image: Image) -> filters.Lookup:
    """containerd's filter fields of an image: name, target.digest,
    target.mediatype, labels.<key>."""
    plain = filters.make_lookup({"name": image.name}, image.labels)
    target = {"digest": image.target.digest, "mediatype": image.target.media_type}

    def lookup(path: tuple[str, ...]) -> str | None:
        if path[:1] == ("target",):
            return target.get(path[1]) if len(path) == 2 else None
        return plain(path)

    return lookup


class ImagesService(impb_grpc.ImagesServicer):
    """``containerd.services.images.v1.Images`` over ``root``'s image records."""

    def __init__(self, root: Root) -> None:
        self._root = root

    def _reader(self, context: grpc.ServicerContext) -> ImageStore | None:
        """The records the caller reads; None in a namespace that holds none."""
        if _namespace(context) != DEFAULT_NAMESPACE:
            return None
        return self._root.images()

    def _writer(self, name: str, context: grpc.ServicerContext) -> ImageStore:
        """The records, for a change to image ``name`` the caller must be allowed."""
        namespace = _namespace(context)
        if namespace != DEFAULT_NAMESPACE:
            raise FailedPrecondition(
                f"image {name!r}: lamina keeps its images in namespace "
                f"{DEFAULT_NAMESPACE!r}, not {namespace!r}")
        if caller_owner(context) != CLI:
            raise FailedPrecondition(
                f"image {name!r}: lamina's images belong to its CLI, which alone may "
                "change them (lamina --address ... image)")
        return self._root.images()

    @servicer_method
    def Get(self, request: impb.GetImageRequest,
            context: grpc.ServicerContext) -> impb.GetImageResponse:
        name = _check_name(request.name)
        store = self._reader(context)
        if store is None:
            raise NotFound(f"image {name!r} does not exist")
        return impb.GetImageResponse(image=image_to_pb(store.get(name)))

    @servicer_method
    def List(self, request: impb.ListImagesRequest,
             context: grpc.ServicerContext) -> impb.ListImagesResponse:
        matcher = filters.parse(list(request.filters))
        store = self._reader(context)
        found = [] if store is None else [i for i in store.list() if matcher(_fields(i))]
        return impb.ListImagesResponse(images=[image_to_pb(i) for i in found])

    @servicer_method
    def Create(self, request: impb.CreateImageRequest,
               context: grpc.ServicerContext) -> impb.CreateImageResponse:
        image = _checked(request.image)
        created = self._writer(image.name, context).create(image)
        return impb.CreateImageResponse(image=image_to_pb(created))

    @servicer_method
    def Update(self, request: impb.UpdateImageRequest,
               context: grpc.ServicerContext) -> impb.UpdateImageResponse:
        name = _check_name(request.image.name)
        wanted = dict(request.image.labels)
        validate_labels(wanted)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        label_paths = [p for p in paths if p == "labels" or p.startswith("labels.")]
        new_target = not paths or "target" in paths
        unknown = set(paths) - set(label_paths) - {"target"}
        if unknown:
            raise InvalidArgument(f"cannot update field {sorted(unknown)[0]!r} of image "
                                  f"{name!r}: only target, labels and labels.<key> can change")
        target = _checked(request.image).target if new_target else None
        store = self._writer(name, context)
        current = store.get(name)
        labels = (update_labels(current.labels, wanted, label_paths, what=f"image {name!r}")
                  if label_paths or not paths else dict(current.labels))
        updated = store.put(replace(current, target=target or current.target, labels=labels))
        return impb.UpdateImageResponse(image=image_to_pb(updated))

    @servicer_method
    def Delete(self, request: impb.DeleteImageRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        name = _check_name(request.name)
        self._writer(name, context)
        delete_image(self._root, name, sync=request.sync)
        return empty_pb2.Empty()


def add_images_service(server: grpc.Server, root: Root) -> None:
    """Register the Images service for ``root``'s image records."""
    impb_grpc.add_ImagesServicer_to_server(  # type: ignore[no-untyped-call]
        ImagesService(root), server
    )


class RemoteImageStore(RemoteStore):
    """The image records of the server on ``address``
    (:class:`~lamina.metadata.images.ImageRecords`), and deleting them there.

    ``timeout`` (seconds) bounds each call; None waits as long as the call takes.
    """

    _noun = "image"

    def __init__(self, address: str, *, timeout: float | None = None,
                 channel: grpc.Channel | None = None,
                 connect_timeout: float | None = None) -> None:
        super().__init__(address, timeout=timeout, channel=channel,
                         connect_timeout=connect_timeout)
        self._stub = impb_grpc.ImagesStub(self._calls)  # type: ignore[no-untyped-call]

    def get(self, key: str) -> Image:
        with rpc_errors(self._what("get", key)):
            resp = self._stub.Get(impb.GetImageRequest(name=key), timeout=self._timeout)
        return image_from_pb(resp.image)

    def list(self, *filters: str) -> list[Image]:
        """The server's images (those ``filters``, in containerd's language, select),
        sorted by name."""
        with rpc_errors(self._what("list")):
            resp = self._stub.List(impb.ListImagesRequest(filters=list(filters)),
                                   timeout=self._timeout)
        return sorted((image_from_pb(i) for i in resp.images), key=lambda i: i.name)

    def readable(self) -> tuple[builtins.list[Image], builtins.list[Damaged]]:
        """:meth:`list`: the server tells of its damaged records itself."""
        return self.list(), []

    def create(self, image: Image) -> Image:
        with rpc_errors(self._what("create", image.name)):
            resp = self._stub.Create(impb.CreateImageRequest(image=image_to_pb(image)),
                                     timeout=self._timeout)
        return image_from_pb(resp.image)

    def update(self, image: Image, *fieldpaths: str) -> Image:
        """Change ``fieldpaths`` (``target``, ``labels``, ``labels.<key>``; none:
        the target and every label) of image ``image.name``."""
        req = with_update_mask(impb.UpdateImageRequest(image=image_to_pb(image)), fieldpaths)
        with rpc_errors(self._what("update", image.name)):
            resp = self._stub.Update(req, timeout=self._timeout)
        return image_from_pb(resp.image)

    def put(self, image: Image) -> Image:
        try:
            return self.update(image)
        except NotFound:
            pass
        try:
            return self.create(image)
        except AlreadyExists:  # created meanwhile: replace it, as put does
            return self.update(image)

    def delete(self, name: str, *, sync: bool = False) -> None:
        """Delete image ``name`` on the server; with ``sync``, the server collects
        what it alone kept before answering."""
        with rpc_errors(self._what("delete", name)):
            self._stub.Delete(impb.DeleteImageRequest(name=name, sync=sync),
                              timeout=self._timeout)

    def __repr__(self) -> str:
        return f"RemoteImageStore({self.address!r})"
