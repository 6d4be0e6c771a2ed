"""Units: GiB and MiB, and a size written for people.

GiB = 2**30 bytes and MiB = 2**20 bytes (what accelerate's "35GiB" means);
GB = 10**9 bytes ("35GB"). Notebook 00 explains the difference, with the same constants in its own cell.
"""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2


def format_size(n_bytes: float) -> str:
    """``"1.25 GiB"`` from 1 GiB up, else ``"12.3 MiB"``. Used by the device-map table and checks (notebook 02)."""
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB else f"{n_bytes / MiB:.1f} MiB"
