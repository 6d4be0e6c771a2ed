"""Device maps: a table and a plot of a map, and a pre-flight check before anything loads.

STUB: the signatures below are the agreed interface; the implementation is in progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Finding:
    """One problem found by :func:`preflight`.

    kind: short code, e.g. "unplaced", "tied-split", "tied-missing", "no-split-cut",
          "no-split-unknown", "over-budget", "unknown-device", "absent-device".
    message: what is wrong, naming the parameters/modules/devices.
    fix: what to change.
    """

    kind: str
    message: str
    fix: str


@dataclass
class Report:
    """The result of :func:`preflight`: ``ok`` is True when there are no findings."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def raise_if_problems(self) -> None:
        """Raise ValueError listing every finding (no-op when ok)."""
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


def preflight(model, device_map: dict, max_memory: dict | None = None, *, mode: str = "plan",
              checkpoint=None, no_split_module_classes=None, dtype=None) -> Report:
    """Check a device map against a model (meta or real) before loading. See module doc."""
    raise NotImplementedError


def map_table(model, device_map: dict, dtype=None):
    """A pandas DataFrame: one row per device with modules, parameters and bytes."""
    raise NotImplementedError


def plot_device_map(model, device_map: dict, max_memory: dict | None = None, title: str | None = None, ax=None):
    """Draw which layers sit on which device, and bytes per device against its budget."""
    raise NotImplementedError
