"""lamina: containerd's snapshot-based container filesystem subsystem, in Python."""

__version__ = "0.1.0"
