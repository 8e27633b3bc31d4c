"""A long benchmark's rows, kept by key in one JSON file and written atomically after each new
row, so an interrupted run resumes where it stopped and a finished one prints from the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbpt_guard import atomic


@dataclass
class ResumableRows:
    path: Path | None  # None: rows kept in memory only, nothing written
    rows: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, path: Path | None) -> ResumableRows:
        """The rows already in `path` (none where it does not exist yet, or where `path` is None)."""
        return cls(path, json.loads(path.read_text()) if path is not None and path.is_file() else {})

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> Any:
        return self.rows[key]

    def __len__(self) -> int:
        return len(self.rows)

    def items(self):
        return self.rows.items()

    def ensure(self, key: str, make: Callable[[], Any]) -> Any:
        """The row under `key`, made and written to the file first if it is not there yet."""
        if key not in self.rows:
            self.rows[key] = make()
            if self.path is not None:
                atomic.write_text(self.path, json.dumps(self.rows, indent=1))
        return self.rows[key]
