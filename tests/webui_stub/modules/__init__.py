"""Stand-in for text-generation-webui's ``modules`` package (see ../README.md)."""
