"""``lamina config``: configuration snippets for the tools lamina works with."""

from __future__ import annotations

import argparse
import json
import os

from lamina.cli.app import App

__all__ = [
    "DEFAULT_CNI_BIN_DIR",
    "DEFAULT_CNI_CONF_DIR",
    "DEFAULT_SANDBOX_IMAGE",
    "SANDBOX_OOM_SCORE_ADJ",
    "can_lower_oom_score_adj",
    "containerd_snippet",
    "cri_snippet",
    "register",
]

#: The oom_score_adj containerd 1.6's CRI gives every pod sandbox.
SANDBOX_OOM_SCORE_ADJ = -998
#: containerd 1.6's own default; the kubelet's --pod-infra-container-image should match.
DEFAULT_SANDBOX_IMAGE = "registry.k8s.io/pause:3.6"
#: Where Debian's containernetworking-plugins puts them (containerd looks in /opt/cni/bin).
DEFAULT_CNI_BIN_DIR = "/usr/lib/cni"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def _proxy_plugins(address: str, name: str, content: bool) -> str:
    addr = _toml_str(address)
    c = "" if content else "# "
    return f"""\
[proxy_plugins]
  [proxy_plugins.{name}]
    type = "snapshot"
    address = {addr}

  # Optional: lamina's content store as well. containerd's metadata store
  # uses one content plugin, its built-in one unless that is disabled:
  #   disabled_plugins = ["io.containerd.content.v1.content"]
  {c}[proxy_plugins.{name}-content]
  {c}  type = "content"
  {c}  address = {addr}
"""


def containerd_snippet(address: str, *, name: str = "lamina", content: bool = False) -> str:
    """containerd (config version 2) ``[proxy_plugins]`` entries for ``lamina serve``."""
    return f"""\
# lamina as containerd proxy plugins (containerd config version 2).
# Merge into containerd's config.toml, start `lamina serve --address {address}`,
# restart containerd, then e.g. `ctr snapshots --snapshotter {name} ls` or
# `ctr images pull --snapshotter {name} ...`.
version = 2

{_proxy_plugins(address, name, content)}"""


def can_lower_oom_score_adj(score: int = SANDBOX_OOM_SCORE_ADJ) -> bool:
    """Whether a process here may set its oom_score_adj to ``score``.

    Asked by doing it, in a child: a capability set (CapEff) does not tell what
    a user namespace or an LSM allows, and the caller's own score stays as it is.
    """
    pid = os.fork()
    if pid == 0:  # the child only writes and leaves: nothing of the parent runs in it
        code = 1
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(score))
            code = 0
        except OSError:
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _oom_comment(restrict: bool, probed: bool) -> str:
    lines = [
        f"CRI gives a pod sandbox oom_score_adj {SANDBOX_OOM_SCORE_ADJ}. Where a process may "
        "not lower its",
        "score, runc starts no sandbox (containerd reports runc's \"can't get final",
        "child's PID from pipe: EOF\") unless CRI raises such scores to containerd's.",
    ]
    if probed and restrict:
        lines += [f"Found here: a process may not lower its oom_score_adj to "
                  f"{SANDBOX_OOM_SCORE_ADJ}",
                  "(CAP_SYS_RESOURCE is not granted, as in a container or a user namespace)."]
    elif probed:
        lines += [f"Found here: a process may lower its oom_score_adj to "
                  f"{SANDBOX_OOM_SCORE_ADJ}; where it",
                  "may not (no CAP_SYS_RESOURCE: a container, a user namespace) set this true."]
    return "".join(f"  # {line}\n" for line in lines)


def cri_snippet(address: str, *, restrict_oom_score_adj: bool, probed: bool = False,
                name: str = "lamina", content: bool = False,
                sandbox_image: str = DEFAULT_SANDBOX_IMAGE,
                cni_bin_dir: str = DEFAULT_CNI_BIN_DIR,
                cni_conf_dir: str = DEFAULT_CNI_CONF_DIR) -> str:
    """containerd 1.6 (config version 2) for a Kubernetes node: lamina's proxy
    plugins and the CRI plugin with lamina as its snapshotter.

    ``probed``: ``restrict_oom_score_adj`` is what `can_lower_oom_score_adj`
    found on this machine (the comment says so).
    """
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    restrict = "true" if restrict_oom_score_adj else "false"
    return f"""\
# A Kubernetes node on lamina: containerd 1.6's CRI plugin (what the kubelet
# talks to) keeps every pod's image layers and writable layers in lamina.
# Start `lamina serve --address {address}` before containerd. containerd
# replaces a plugin's whole table with an imported file's: this file holds all
# the CRI settings a node needs, so its [plugins] tables go into config.toml
# or an `imports` file, not beside another CRI table.
version = 2

{_proxy_plugins(address, name, content)}
{cri}
  # The image each pod sandbox runs (the kubelet's --pod-infra-container-image).
  sandbox_image = {_toml_str(sandbox_image)}
{_oom_comment(restrict_oom_score_adj, probed)}\
  restrict_oom_score_adj = {restrict}

  [plugins."io.containerd.grpc.v1.cri".containerd]
    # Images are unpacked into, and containers run on, lamina's snapshots
    # (namespace k8s.io: they are containerd's; the lamina CLI lists them and
    # never changes them).
    snapshotter = {_toml_str(name)}

  # A pod network needs the CNI plugins (bridge, host-local, loopback, ...) in
  # bin_dir and a network list (*.conflist) in conf_dir.
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {_toml_str(cni_bin_dir)}
    conf_dir = {_toml_str(cni_conf_dir)}
"""


def cmd_containerd(args: argparse.Namespace, app: App) -> int:
    from lamina.api import default_address

    address = args.config_address or app.address or default_address()
    if not args.cri:
        print(containerd_snippet(address, name=args.name, content=args.content), end="")
        return 0
    probed = args.restrict_oom_score_adj == "auto"
    restrict = (not can_lower_oom_score_adj() if probed
                else args.restrict_oom_score_adj == "true")
    print(cri_snippet(address, restrict_oom_score_adj=restrict, probed=probed,
                      name=args.name, content=args.content,
                      sandbox_image=args.sandbox_image, cni_bin_dir=args.cni_bin_dir,
                      cni_conf_dir=args.cni_conf_dir), end="")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "config", help="print configuration for other tools",
        description="Print configuration snippets for the tools lamina works with.",
    )
    sub = group.add_subparsers(dest="config_command", metavar="TOOL", required=True)
    p = sub.add_parser(
        "containerd",
        help="containerd's [proxy_plugins] for 'lamina serve'",
        description="Print containerd config v2 [proxy_plugins] entries for lamina "
        "(with --cri: the configuration of a Kubernetes node's containerd).",
    )
    p.add_argument(
        "--address",
        dest="config_address",
        metavar="PATH",
        default=None,
        help="the socket 'lamina serve' listens on (default: the global --address, "
        "$LAMINA_ADDRESS or /run/lamina/lamina.sock)",
    )
    p.add_argument("--name", default="lamina", help="proxy plugin name (default lamina)")
    p.add_argument(
        "--content",
        action="store_true",
        help="enable the content proxy entry (commented out by default)",
    )
    p.add_argument("--cri", action="store_true",
                   help="also the CRI plugin's settings, with lamina as its snapshotter")
    p.add_argument("--sandbox-image", metavar="REF", default=DEFAULT_SANDBOX_IMAGE,
                   help=f"with --cri: the pod sandbox image (default {DEFAULT_SANDBOX_IMAGE})")
    p.add_argument("--restrict-oom-score-adj", choices=("auto", "true", "false"),
                   default="auto",
                   help="with --cri: restrict_oom_score_adj (default auto: true when a "
                   "process here cannot lower its oom_score_adj)")
    p.add_argument("--cni-bin-dir", metavar="DIR", default=DEFAULT_CNI_BIN_DIR,
                   help=f"with --cri: CNI plugin binaries (default {DEFAULT_CNI_BIN_DIR})")
    p.add_argument("--cni-conf-dir", metavar="DIR", default=DEFAULT_CNI_CONF_DIR,
                   help=f"with --cri: CNI network lists (default {DEFAULT_CNI_CONF_DIR})")
    p.set_defaults(handler=cmd_containerd)
