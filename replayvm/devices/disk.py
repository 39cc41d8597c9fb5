"""Disks of 512-byte sectors: an image file that is never modified, or sectors fed from a trace.

Writes go to an in-memory overlay, so a session can be repeated from the same images and a
recording's disk hashes stay true (like QEMU's `-snapshot`). `read_sector` is the disk's one
input door: every sector it hands out is seen by `on_read` (the recorder logs it), and on replay
a `TraceDisk` takes its sectors from the trace instead of an image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

SECTOR_SIZE = 512
MISSING_SECTOR_END = "missing-sector"    # how a live session ends that read a sector no one had


class MissingSector(Exception):
    """A trace-fed disk was asked for a sector neither the trace nor an image can give."""


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
        self.on_read: Callable[[int, bytes], None] | None = None    # (lba, data): the recorder

    def read_sector(self, lba: int) -> bytes:
        if not 0 <= lba < self.sector_count:
            raise IndexError(f"{self.name}: sector {lba} beyond {self.sector_count}")
        data = self._overlay.get(lba)
        if data is None:
            data = self._read_unwritten(lba)
        if self.on_read is not None:
            self.on_read(lba, data)
        return data

    def _read_unwritten(self, lba: int) -> bytes:
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

    def overlay(self) -> dict[int, bytes]:
        """The sectors written so far (a checkpoint keeps them: they are the disk's state)."""
        return dict(self._overlay)

    def restore_overlay(self, overlay: dict[int, bytes]) -> None:
        self._overlay = dict(overlay)

    def sha256(self) -> str:
        """Hash of the original image (what a trace records to identify the disk)."""
        return hashlib.sha256(self._image).hexdigest()


class TraceDisk(Disk):
    """A recorded disk without its image: while replaying, each sector the controller asks for
    comes from the trace (`supply`, which checks it is the sector the recording read); the
    sectors seen so far are remembered by number, so that a session that goes live can go on
    reading them. A sector the recording never read needs the image (`attach_image`)."""

    def __init__(self, name: str, sector_count: int, sha256: str | None) -> None:
        super().__init__(b"", name)
        self.sector_count = sector_count
        self.image_sha256 = sha256
        # replay: (lba, what the guest wrote there or None) -> the trace's sector, or None when
        # the trace does not say (before format 1.2)
        self.supply: Callable[[int, bytes | None], bytes | None] | None = None
        self.known: dict[int, bytes] = {}                           # lba -> data seen in the trace
        self._image_path: Path | None = None

    def read_sector(self, lba: int) -> bytes:
        if self.supply is None:
            return super().read_sector(lba)
        if not 0 <= lba < self.sector_count:
            raise IndexError(f"{self.name}: sector {lba} beyond {self.sector_count}")
        written = self._overlay.get(lba)
        data = self.supply(lba, written)
        if data is None:
            return written if written is not None else bytes(SECTOR_SIZE)
        if written is None:
            self.known[lba] = data
        return data

    def _read_unwritten(self, lba: int) -> bytes:
        known = self.known.get(lba)
        if known is not None:
            return known
        if self._image_path is not None:
            start = lba * SECTOR_SIZE
            return self._image[start:start + SECTOR_SIZE]
        raise MissingSector(f"the guest read sector {lba} of {self.name}, which the recording never "
                            f"read: give its image with --disk (sha256 {self.image_sha256 or 'unknown'})")

    def attach_image(self, path: Path) -> None:
        """The image the recording was made from (checked against the header's hash; a
        ValueError says which is which). Replay goes on taking sectors from the trace."""
        if path == self._image_path:
            return
        data = path.read_bytes()
        if len(data) % SECTOR_SIZE:
            data += bytes(SECTOR_SIZE - len(data) % SECTOR_SIZE)
        digest = hashlib.sha256(data).hexdigest()
        if self.image_sha256 and digest != self.image_sha256:
            raise ValueError(f"{path} is not the image {self.name} was recorded from (sha256 "
                             f"{digest[:16]}..., the trace has {self.image_sha256[:16]}...)")
        self._image = data
        self._image_path = path

    def sha256(self) -> str:
        return self.image_sha256 or ""
