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
        if data.get("version") != cls._VERSION:
            raise DefectflowError(f"{cls._WHAT} version {data.get('version')!r} is not "
                                  f"{cls._VERSION}", path)
        for name in cls._TUPLES:
            data[name] = tuple(data[name])
        return cls(**data)
