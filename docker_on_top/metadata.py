"""A volume's metadata.json: what the volume is (its bases, layers, snapshots, origin,
size limit), in the Go plugin's format whenever the volume is one the Go plugin can
mount, and in one the Go plugin refuses to read otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Snapshot:
    """A name a volume gave one of its layers (`snapshot VOLUME@NAME`)."""

    name: str
    layer: str
    created_at: str


@dataclass(frozen=True)
class Metadata:
    """metadata.json. A volume over one base, with no layers and nothing else of ours,
    is written exactly as the Go plugin writes it. Any other is written with
    BaseDirPath as a list (bottom base first), which the Go plugin cannot read: it then
    refuses to mount the volume rather than mount a base without its layers."""

    base_dir: str  # the bottom base, `-o base=`
    volatile: bool
    # Absent in volumes created by the Go plugin.
    created_at: str | None = None
    upper_bases: tuple[str, ...] = ()  # `-o base.1=`, `base.2=`, ..., bottom first
    layers: tuple[str, ...] = ()  # frozen layers over the bases, bottom first (ids)
    snapshots: tuple[Snapshot, ...] = ()  # oldest first
    origin: str | None = None  # VOLUME@NAME a clone was made from
    # Bytes the volume's own changes may hold (`-o size=`): they live in an ext4 image
    # of that size (`size.img`), or for a volatile volume a tmpfs, mounted on `limit/`.
    size_limit: int | None = None

    @property
    def bases(self) -> tuple[str, ...]:
        return (self.base_dir, *self.upper_bases)

    @property
    def in_go_format(self) -> bool:
        return not (
            self.upper_bases
            or self.layers
            or self.snapshots
            or self.origin
            or self.size_limit is not None
        )

    def to_json(self) -> bytes:
        document: dict[str, object] = {
            "BaseDirPath": self.base_dir if self.in_go_format else list(self.bases),
            "Volatile": self.volatile,
        }
        if self.created_at is not None:
            document["CreatedAt"] = self.created_at
        if self.layers:
            document["Layers"] = list(self.layers)
        if self.snapshots:
            document["Snapshots"] = [
                {"Name": s.name, "Layer": s.layer, "CreatedAt": s.created_at}
                for s in self.snapshots
            ]
        if self.origin is not None:
            document["Origin"] = self.origin
        if self.size_limit is not None:
            document["SizeLimit"] = self.size_limit
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Metadata:
        """Parse metadata.json; unknown keys are ignored so newer fields stay compatible."""
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("metadata.json is not a JSON object")
        bases = document.get("BaseDirPath")
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not bases or not all(_is_text(b) for b in bases):
            raise ValueError("metadata.json has no BaseDirPath string or list of strings")
        volatile = document.get("Volatile", False)
        if not isinstance(volatile, bool):
            raise ValueError("metadata.json has a Volatile that is not a boolean")
        created_at = document.get("CreatedAt")
        if created_at is not None and not isinstance(created_at, str):
            raise ValueError("metadata.json has a CreatedAt that is not a string")
        layers = document.get("Layers", [])
        if not isinstance(layers, list) or not all(_is_text(layer) for layer in layers):
            raise ValueError("metadata.json has Layers that are not a list of layer ids")
        snapshots = document.get("Snapshots", [])
        if not isinstance(snapshots, list) or not all(
            isinstance(s, dict) and all(_is_text(s.get(k)) for k in ("Name", "Layer", "CreatedAt"))
            for s in snapshots
        ):
            raise ValueError("metadata.json has Snapshots that are not a list of snapshots")
        origin = document.get("Origin")
        if origin is not None and not _is_text(origin):
            raise ValueError("metadata.json has an Origin that is not a string")
        size_limit = document.get("SizeLimit")
        if size_limit is not None and (
            not isinstance(size_limit, int) or isinstance(size_limit, bool) or size_limit < 1
        ):
            raise ValueError("metadata.json has a SizeLimit that is not a number of bytes")
        return cls(
            base_dir=bases[0],
            volatile=volatile,
            created_at=created_at,
            upper_bases=tuple(bases[1:]),
            layers=tuple(layers),
            snapshots=tuple(Snapshot(s["Name"], s["Layer"], s["CreatedAt"]) for s in snapshots),
            origin=origin,
            size_limit=size_limit,
        )


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def rfc3339(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )
