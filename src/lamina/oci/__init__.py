"""The OCI image spec: media types, descriptors and documents, platforms, DiffIDs and
ChainIDs, image references and names."""
