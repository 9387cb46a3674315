"""The filesystem layer: dirfd-relative tree operations, durable files, permissions, walking."""
