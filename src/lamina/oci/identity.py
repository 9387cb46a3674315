"""OCI layer identities: DiffIDs name uncompressed layers, ChainIDs name stacks of them.

``ChainID(L0) = DiffID(L0)`` and ``ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " +
DiffID(Ln))``. A snapshot committed under a ChainID holds exactly that stack,
so two images sharing base layers share those snapshots.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["chain_id", "chain_ids"]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The ChainID of every prefix of ``diff_ids`` (same length as the input)."""
    import hashlib  # here: listing images imports this module and hashes nothing

    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            h = hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest()
            out.append(f"sha256:{h}")
    return out


def chain_id(diff_ids: Sequence[str]) -> str:
    """The ChainID of the whole stack; empty for no layers."""
    ids = chain_ids(diff_ids)
    return ids[-1] if ids else ""
