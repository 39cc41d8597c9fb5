"""A disk of 512-byte sectors backed by an image file that is never modified.

Writes go to an in-memory overlay, so a session can be repeated from the same images and a
recording's disk hashes stay true (like QEMU's `-snapshot`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SECTOR_SIZE = 512


class Disk:
    def __init__(self, image: bytes | Path, name: str) -> None:
        self.name = name
        self.path = image if isinstance(image, Path) else None
        data = image.read_bytes() if isinstance(image, Path) else bytes(image)
        if len(data) % SECTOR_SIZE:
            data += bytes(SECTOR_SIZE - len(data) % SECTOR_SIZE)
        self._image = data
        self._overlay: dict[int, bytes] = {}
        self.sector_count = len(data) // SECTOR_SIZE

    def read_sector(self, lba: int) -> bytes:
        if not 0 <= lba < self.sector_count:
            raise IndexError(f"{self.name}: sector {lba} beyond {self.sector_count}")
        written = self._overlay.get(lba)
        if written is not None:
            return written
        start = lba * SECTOR_SIZE
        return self._image[start:start + SECTOR_SIZE]

    def write_sector(self, lba: int, data: bytes) -> None:
        if not 0 <= lba < self.sector_count:
            raise IndexError(f"{self.name}: sector {lba} beyond {self.sector_count}")
        if len(data) != SECTOR_SIZE:
            raise ValueError("a sector is 512 bytes")
        self._overlay[lba] = bytes(data)

    def written_sectors(self) -> list[int]:
        return sorted(self._overlay)

    def sha256(self) -> str:
        """Hash of the original image (what a trace records to identify the disk)."""
        return hashlib.sha256(self._image).hexdigest()
