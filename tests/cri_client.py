"""CRI v1 from Python, for the CRI tests: stubs compiled from ``cri_api.proto``
(beside this file) with the pinned grpcio-tools once per session, and a client
with the calls the kubelet makes, in the order it makes them.

PyPI's ``container-runtime-interface-api`` has generated stubs too, but pins
protobuf 6, which lamina's protobuf 7 pin excludes.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

__all__ = ["CALL_TIMEOUT", "Cri", "Pod", "api"]

PROTO = Path(__file__).with_name("cri_api.proto")
CALL_TIMEOUT = 180.0
"""Seconds one CRI call may take on a loaded 2-core machine (a pull, a sandbox start)."""


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the _grpc module imports its _pb2 by this name
    spec.loader.exec_module(module)
    return module


@functools.cache
def api() -> tuple[Any, Any]:
    """(messages, services): ``cri_api_pb2`` and ``cri_api_pb2_grpc``."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="lamina-cri-api-"))
    try:
        rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(PROTO)])
        assert rc == 0, f"protoc failed on {PROTO} ({rc})"
        return (_load("cri_api_pb2", out / "cri_api_pb2.py"),
                _load("cri_api_pb2_grpc", out / "cri_api_pb2_grpc.py"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@dataclass
class Pod:
    """A pod sandbox as the kubelet keeps it: its id and the config it was run with."""

    id: str
    config: Any  # PodSandboxConfig, passed again with every CreateContainer


class Cri:
    """The CRI runtime and image services of one containerd socket."""

    def __init__(self, address: str) -> None:
        self.pb, grpc_mod = api()
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = grpc_mod.RuntimeServiceStub(self.channel)
        self.images = grpc_mod.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------------ images

    def pull(self, ref: str) -> str:
        """PullImage; the image's id (its config digest)."""
        resp = self.images.PullImage(self.pb.PullImageRequest(
            image=self.pb.ImageSpec(image=ref)), timeout=CALL_TIMEOUT)
        return str(resp.image_ref)

    def image(self, ref: str) -> Any:
        """ImageStatus's image (an empty message when the image is unknown)."""
        return self.images.ImageStatus(self.pb.ImageStatusRequest(
            image=self.pb.ImageSpec(image=ref)), timeout=CALL_TIMEOUT).image

    def remove_image(self, ref: str) -> None:
        self.images.RemoveImage(self.pb.RemoveImageRequest(
            image=self.pb.ImageSpec(image=ref)), timeout=CALL_TIMEOUT)

    # ------------------------------------------------------------------ pods

    def run_pod(self, name: str, log_dir: Path, *, attempt: int = 0) -> Pod:
        """RunPodSandbox with the metadata and log directory a kubelet gives."""
        log_dir.mkdir(parents=True, exist_ok=True)
        config = self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(name=name, uid=f"uid-{name}",
                                                namespace="lamina-test", attempt=attempt),
            hostname=name, log_directory=str(log_dir),
            labels={"app": name}, linux=self.pb.LinuxPodSandboxConfig())
        resp = self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config),
                                          timeout=CALL_TIMEOUT)
        return Pod(resp.pod_sandbox_id, config)

    def pod_status(self, pod: Pod) -> Any:
        return self.runtime.PodSandboxStatus(self.pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod.id), timeout=CALL_TIMEOUT).status

    def remove_pod(self, pod: Pod) -> None:
        """StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod."""
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                    timeout=CALL_TIMEOUT)
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                      timeout=CALL_TIMEOUT)

    # ------------------------------------------------------------------ containers

    def create(self, pod: Pod, name: str, image: str, command: list[str], *,
               attempt: int = 0) -> str:
        """CreateContainer; its log goes to ``<pod log dir>/<name>/<attempt>.log``."""
        config = self.pb.ContainerConfig(
            metadata=self.pb.ContainerMetadata(name=name, attempt=attempt),
            image=self.pb.ImageSpec(image=image), command=command,
            log_path=f"{name}/{attempt}.log")
        resp = self.runtime.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config),
            timeout=CALL_TIMEOUT)
        return str(resp.container_id)

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=container_id),
                                    timeout=CALL_TIMEOUT)

    def run(self, pod: Pod, name: str, image: str, command: list[str], *,
            attempt: int = 0) -> str:
        """CreateContainer + StartContainer; the container's id."""
        cid = self.create(pod, name, image, command, attempt=attempt)
        self.start(cid)
        return cid

    def status(self, container_id: str) -> Any:
        return self.runtime.ContainerStatus(self.pb.ContainerStatusRequest(
            container_id=container_id), timeout=CALL_TIMEOUT).status

    def exec(self, container_id: str, *cmd: str) -> tuple[int, bytes]:
        """ExecSync: (exit code, stdout); stderr goes into the assertion message."""
        resp = self.runtime.ExecSync(self.pb.ExecSyncRequest(
            container_id=container_id, cmd=list(cmd), timeout=60), timeout=CALL_TIMEOUT)
        return int(resp.exit_code), bytes(resp.stdout)

    def stop(self, container_id: str, *, grace: int) -> None:
        self.runtime.StopContainer(self.pb.StopContainerRequest(
            container_id=container_id, timeout=grace), timeout=CALL_TIMEOUT)

    def remove(self, container_id: str) -> None:
        self.runtime.RemoveContainer(self.pb.RemoveContainerRequest(
            container_id=container_id), timeout=CALL_TIMEOUT)

    def containers(self) -> dict[str, Any]:
        """ListContainers, by id."""
        resp = self.runtime.ListContainers(self.pb.ListContainersRequest(),
                                           timeout=CALL_TIMEOUT)
        return {c.id: c for c in resp.containers}

    def pods(self) -> dict[str, Any]:
        """ListPodSandbox, by id."""
        resp = self.runtime.ListPodSandbox(self.pb.ListPodSandboxRequest(),
                                           timeout=CALL_TIMEOUT)
        return {p.id: p for p in resp.items}
