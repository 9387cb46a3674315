"""Fuzz ``lamina serve`` with a hostile gRPC client: the snapshots and content
services containerd uses, called with random keys, parents, labels, filters,
digests, offsets and Write streams, in random order against one real server.

Calls come as containerd's (no metadata) or as the lamina CLI's (its identity
metadata), at random. Property: neither removes a snapshot the other made;
every call ends OK or with one of the codes a refusal of bad input,
a missing or existing object, or a held ingest stands for (:data:`ACCEPTED`);
never INTERNAL or UNKNOWN (how an unexpected exception surfaces) and never a
missed deadline (a hang). The server survives every example, logs no
traceback, and the root it serves stays consistent (``lamina check``).

``LAMINA_FUZZ_EXAMPLES`` examples (default 200) of up to 25 calls each; the
seed is random unless ``LAMINA_FUZZ_SEED`` is set, printed, and named by a
failure (as in ``tests/test_fuzz.py``).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import require_root_user, tmp_base, unmount_all_under
from containerd_peer import Lamina, lamina_serve
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from lamina.api.client import connect
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.owner import CALL_METADATA
from lamina.fs.files import remove_tree

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "200") or 200)
SEED = int(os.environ.get("LAMINA_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
CALL_TIMEOUT = 60.0  # a call that takes longer hangs: DEADLINE_EXCEEDED fails the test

C = grpc.StatusCode
#: what a call may end with: a refusal of bad input, a missing or existing object,
#: a state that forbids it, a held ingest, a limit, a snapshotter that is not there
ACCEPTED = frozenset({C.OK, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION,
                      C.INVALID_ARGUMENT, C.UNAVAILABLE, C.UNIMPLEMENTED,
                      C.RESOURCE_EXHAUSTED})

OUTCOMES: Counter[str] = Counter()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="lamina serve mounts: needs root")

# -- what the client sends ---------------------------------------------------------
_BLOB = b"fuzzed blob\n"
_BLOB_DIGEST = "sha256:" + hashlib.sha256(_BLOB).hexdigest()

# weighted towards names that work, so that snapshots and blobs pile up and later
# calls meet them in every state
keys = st.sampled_from(["a", "b", "c", "d"] * 4 + [
    "ns/1/a", "", " ", "..", "a/../../b", "k" * 300, "\u00e9t\u00e9", "x\x00y", "-rf"])
parents = st.one_of(st.just(""), keys)
snapshotters = st.sampled_from(["overlay"] * 5 + ["native"] * 3 + ["erofs"] * 3
                               + ["", "nope", "../overlay"])
label_keys = st.sampled_from([
    "l", "containerd.io/gc.ref.snapshot.overlay", "containerd.io/gc.ref.content.m",
    "containerd.io/gc.root", "containerd.io/snapshot.ref", "lamina.owner",
    "containerd.io/uncompressed", "", "k" * 5000])
label_values = st.sampled_from(["a", "b", _BLOB_DIGEST, "sha256:0", "", "v" * 5000])
labels: st.SearchStrategy[dict[str, str]] = st.one_of(
    st.just({}), st.dictionaries(label_keys, label_values, max_size=3))
filters = st.lists(st.sampled_from([
    "", "kind==committed", "name~=a", "labels.l", "labels.l==a", 'name~="(a+)+$"',
    "parent==a", "labels.\"l\"!=b", "name==", "==", "labels.", "name~=[", ",,", "(",
    'labels."containerd.io/gc.root"', "digest==" + _BLOB_DIGEST, "x" * 3000]), max_size=3)
digests = st.sampled_from([_BLOB_DIGEST, "sha256:" + "0" * 64, "sha256:abc", "md5:00",
                           "", "sha256:" + "G" * 64, "SHA256:" + "0" * 64,
                           "sha512:" + "0" * 128, "sha256:" + "0" * 64 + "/../x"])
masks = st.lists(st.sampled_from(["labels", "labels.l", "labels.", "name", "kind", "",
                                  "parent", "labels.containerd.io/gc.root"]), max_size=3)
offsets = st.sampled_from([0, 1, 5, len(_BLOB), 1 << 40, -1, -(1 << 62)])
actions = st.sampled_from([cpb.STAT, cpb.WRITE, cpb.COMMIT, 7])


def _write_reqs() -> st.SearchStrategy[list[cpb.WriteContentRequest]]:
    """A whole ingest (stat, writes, commit), perhaps cut short, or random requests."""
    def ingest(ref: str, cut: int, split: int, lab: dict[str, str]) -> list[Any]:
        reqs = [cpb.WriteContentRequest(action=cpb.STAT, ref=ref, total=len(_BLOB),
                                        expected=_BLOB_DIGEST),
                cpb.WriteContentRequest(action=cpb.WRITE, ref=ref, offset=0,
                                        data=_BLOB[:split]),
                cpb.WriteContentRequest(action=cpb.WRITE, ref=ref, offset=split,
                                        data=_BLOB[split:]),
                cpb.WriteContentRequest(action=cpb.COMMIT, ref=ref, total=len(_BLOB),
                                        expected=_BLOB_DIGEST, labels=lab)]
        return reqs[:cut]

    whole = st.builds(ingest, st.sampled_from(["r1", "r2"]), st.integers(1, 4),
                      st.integers(0, len(_BLOB)), labels)
    req = st.builds(
        lambda action, ref, offset, total, expected, data, lab: cpb.WriteContentRequest(
            action=action, ref=ref, offset=offset, total=total, expected=expected,
            data=data, labels=lab),
        actions, st.sampled_from(["r1", "r2", "", "r/../x", "r" * 2000]), offsets,
        st.sampled_from([0, len(_BLOB), 3, 1 << 50, -5]),
        st.sampled_from(["", _BLOB_DIGEST, "sha256:" + "0" * 64, "bad"]),
        st.sampled_from([b"", _BLOB, _BLOB[:5], _BLOB[5:], b"\0" * 4096]), labels)
    return st.one_of(whole, st.lists(req, min_size=1, max_size=4))


class _Client:
    """The stubs, and the identity the next call is made with: containerd's (no
    metadata) or the lamina CLI's (:data:`~lamina.api.owner.CALL_METADATA`)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.sn = spb_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        self.cs = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        self.meta: tuple[tuple[str, str], ...] = ()


def _info(name: str, lab: dict[str, str]) -> Any:
    return spb.Info(name=name, labels=lab)


Call = tuple[str, tuple[str, ...], Callable[[_Client], Any]]


def _calls() -> st.SearchStrategy[Call]:
    """One call: its name (for the tally), what the ownership oracle needs to know
    of it (snapshotter and key; for Commit, snapshotter, name and key), and how to
    make it."""
    t = CALL_TIMEOUT
    return st.one_of(
        st.builds(lambda s, k, p, lab: ("Prepare", (s, k), lambda c: c.sn.Prepare(
            spb.PrepareSnapshotRequest(snapshotter=s, key=k, parent=p, labels=lab),
            timeout=t, metadata=c.meta)), snapshotters, keys, parents, labels),
        st.builds(lambda s, k, p, lab: ("View", (s, k), lambda c: c.sn.View(
            spb.ViewSnapshotRequest(snapshotter=s, key=k, parent=p, labels=lab),
            timeout=t, metadata=c.meta)), snapshotters, keys, parents, labels),
        st.builds(lambda s, n, k, lab: ("Commit", (s, n, k), lambda c: c.sn.Commit(
            spb.CommitSnapshotRequest(snapshotter=s, name=n, key=k, labels=lab),
            timeout=t, metadata=c.meta)), snapshotters, keys, keys, labels),
        st.builds(lambda s, k: ("Mounts", (), lambda c: c.sn.Mounts(
            spb.MountsRequest(snapshotter=s, key=k), timeout=t, metadata=c.meta)),
                  snapshotters, keys),
        st.builds(lambda s, k: ("Stat", (), lambda c: c.sn.Stat(
            spb.StatSnapshotRequest(snapshotter=s, key=k), timeout=t, metadata=c.meta)),
                  snapshotters, keys),
        st.builds(lambda s, k: ("Usage", (), lambda c: c.sn.Usage(
            spb.UsageRequest(snapshotter=s, key=k), timeout=t, metadata=c.meta)),
                  snapshotters, keys),
        st.builds(lambda s, k: ("Remove", (s, k), lambda c: c.sn.Remove(
            spb.RemoveSnapshotRequest(snapshotter=s, key=k), timeout=t, metadata=c.meta)),
                  snapshotters, keys),
        st.builds(lambda s, k, lab, m: ("Update", (), lambda c: c.sn.Update(
            spb.UpdateSnapshotRequest(snapshotter=s, info=_info(k, lab),
                                      update_mask={"paths": m}), timeout=t, metadata=c.meta)),
                  snapshotters, keys, labels, masks),
        st.builds(lambda s, f: ("List", (), lambda c: list(c.sn.List(
            spb.ListSnapshotsRequest(snapshotter=s, filters=f), timeout=t, metadata=c.meta))),
                  snapshotters, filters),
        st.builds(lambda s: ("Cleanup", (), lambda c: c.sn.Cleanup(
            spb.CleanupRequest(snapshotter=s), timeout=t, metadata=c.meta)), snapshotters),
        st.builds(lambda d: ("Info", (), lambda c: c.cs.Info(
            cpb.InfoRequest(digest=d), timeout=t, metadata=c.meta)), digests),
        st.builds(lambda d, lab, m: ("CUpdate", (), lambda c: c.cs.Update(
            cpb.UpdateRequest(info=cpb.Info(digest=d, labels=lab),
                              update_mask={"paths": m}), timeout=t, metadata=c.meta)),
                  digests, labels, masks),
        st.builds(lambda f: ("CList", (), lambda c: list(c.cs.List(
            cpb.ListContentRequest(filters=f), timeout=t, metadata=c.meta))), filters),
        st.builds(lambda d: ("Delete", (), lambda c: c.cs.Delete(
            cpb.DeleteContentRequest(digest=d), timeout=t, metadata=c.meta)), digests),
        st.builds(lambda d, o, n: ("Read", (), lambda c: list(c.cs.Read(
            cpb.ReadContentRequest(digest=d, offset=o, size=n), timeout=t, metadata=c.meta))),
                  digests, offsets, st.sampled_from([0, 1, 3, 1 << 40, -1])),
        st.builds(lambda r: ("Status", (), lambda c: c.cs.Status(
            cpb.StatusRequest(ref=r), timeout=t, metadata=c.meta)),
                  st.sampled_from(["r1", "r2", "", "zz"])),
        st.builds(lambda f: ("ListStatuses", (), lambda c: c.cs.ListStatuses(
            cpb.ListStatusesRequest(filters=f), timeout=t, metadata=c.meta)), filters),
        st.builds(lambda r: ("Abort", (), lambda c: c.cs.Abort(
            cpb.AbortRequest(ref=r), timeout=t, metadata=c.meta)),
                  st.sampled_from(["r1", "r2", "", "zz"])),
        st.builds(lambda reqs: ("Write", (), lambda c: list(c.cs.Write(
            iter(reqs), timeout=t, metadata=c.meta))), _write_reqs()),
    )


def _code(call: Callable[[_Client], Any], client: _Client) -> grpc.StatusCode:
    try:
        call(client)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        code = err.code()
        assert code in ACCEPTED, f"{code.name}: {err.details()}"
        return code
    return C.OK


@pytest.fixture(scope="module")
def served() -> Iterator[Lamina]:
    require_root_user()
    base = Path(tempfile.mkdtemp(prefix="fuzz-grpc-", dir=tmp_base()))
    sock = Path(f"/tmp/lamina-fuzz-{os.getpid()}.sock")
    try:
        with lamina_serve(base / "root", sock) as server:
            yield server
    finally:  # erofs layers stay mounted when serve stops, as after a restart
        unmount_all_under(base)
        remove_tree(base)


def test_fuzz_grpc_services(served: Lamina, capsys: pytest.CaptureFixture[str]) -> None:
    channel = connect(str(served.sock))
    client = _Client(channel)
    ran = Counter[str]()

    # the ownership oracle: who made each snapshot the server still has (as far as
    # this client can tell), by (snapshotter, key); a removal by anyone else is a bug
    made: dict[tuple[str, str], str] = {}

    @given(st.lists(st.tuples(st.sampled_from(["containerd", "lamina"]), _calls()),
                    min_size=1, max_size=25))
    def run(calls: list[tuple[str, Call]]) -> None:
        ran["examples"] += 1
        for who, (name, facts, call) in calls:
            client.meta = CALL_METADATA if who == "lamina" else ()
            code = _code(call, client)
            OUTCOMES[f"{name} {code.name}"] += 1
            assert served.proc.poll() is None, f"lamina serve exited:\n{served.log_tail()}"
            if code is not C.OK or not facts:
                continue
            # as containerd's proxy names it: any name but these is serve's default
            facts = (facts[0] if facts[0] in ("native", "erofs") else "overlay", *facts[1:])
            if name in ("Prepare", "View"):
                made[facts[0], facts[1]] = who
            elif name == "Commit":
                made[facts[0], facts[1]] = made.pop((facts[0], facts[2]), who)
            elif name == "Remove":
                owner = made.pop((facts[0], facts[1]), "nobody this client saw")
                assert owner == who, f"{who} removed {facts}, which {owner} made"

    fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])
    try:
        fuzz(seed(SEED)(run))()
    except BaseException as exc:
        exc.add_note(f"replay: LAMINA_FUZZ_SEED={SEED} LAMINA_FUZZ_EXAMPLES={EXAMPLES}")
        raise
    finally:
        channel.close()
        with capsys.disabled():
            codes = Counter[str]()
            for k, v in OUTCOMES.items():
                codes[k.split()[1]] += v
            print(f"\ngrpc: {ran['examples']} examples, seed {SEED}: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
            if os.environ.get("LAMINA_FUZZ_VERBOSE"):
                for k, v in sorted(OUTCOMES.items()):
                    print(f"  {k}: {v}")
    assert ran["examples"] >= EXAMPLES
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log.lower(), log[-3000:]
    check = subprocess.run([sys.executable, "-m", "lamina", "--root", str(served.root),
                            "check"], capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and check.stdout.strip().endswith("consistent"), \
        check.stdout + check.stderr
