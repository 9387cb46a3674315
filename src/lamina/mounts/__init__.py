"""Mounts: the Mount value, mountinfo, ID-mapped mounts."""
