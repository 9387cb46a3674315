"""Small helpers every layer may use.

Kill points, bounded JSON documents, containerd's filter syntax, progress
reporting, sqlite and sd_notify.
"""
