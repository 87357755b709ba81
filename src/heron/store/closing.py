"""`Closing`: a resource that closes on leaving a `with` block (no database import, so
layers that open a store only on first use can share it)."""
from __future__ import annotations

from typing import Self


class Closing:
    """`close()` on leaving a `with` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
