"""The metadata side of a root (containerd's ``core/metadata``).

The root and the records of its images and containers, the root's format
versions, leases, garbage collection and ``check``.
"""
