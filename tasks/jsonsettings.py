"""Frozen settings dataclasses saved as versioned JSON files (scoring and fusion settings)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import DefectflowError


class JsonSettings:
    """Save/load of a frozen settings dataclass as versioned JSON (tuples restored)."""

    _VERSION: int
    _WHAT: str            # for error messages: "scoring settings", "fusion settings"
    _TUPLES: tuple[str, ...]
    _NESTED: dict = {}    # field -> settings dataclass stored as a nested JSON object

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DefectflowError(f"cannot read the {cls._WHAT} ({exc})", path) from None
        data = cls._upgrade(data)
        if data.get("version") != cls._VERSION:
            raise DefectflowError(f"{cls._WHAT} version {data.get('version')!r} is not "
                                  f"{cls._VERSION}", path)
        for name in cls._TUPLES:
            data[name] = tuple(data[name])
        for name, kind in cls._NESTED.items():
            data[name] = kind(**data[name])
        return cls(**data)

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        """The JSON of an older version in the current version's layout (none by default)."""
        return data
