"""The unreadable images a loader met, each named once: "name (reason)", the
name relative to the data root (`ImageList.relative_name`), so every backend
and every machine writes the same string for the same file."""

from __future__ import annotations

from iecl.pipeline.folder import ImageList


class BadFileLog:
    """`names` in the order first met; the folder's unlistable entries first."""

    def __init__(self, images: ImageList | None = None) -> None:
        self.names: list[str] = []
        self._seen: set[str] = set()
        for name, reason in (images.bad_entries if images is not None else ()):
            self.add(name, reason)

    def add(self, name: str, reason: str) -> bool:
        """Record file `name` as unreadable for `reason`; False if it was already named."""
        if name in self._seen:
            return False
        self._seen.add(name)
        self.names.append(f"{name} ({reason})")
        return True
