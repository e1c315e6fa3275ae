"""Units shared by the core and the layers above it."""

from __future__ import annotations

# "MB" in this project means MiB, the unit container limits are given in (memory.max of a 512 MB
# instance is 536870912)
MIB = 1024 * 1024
