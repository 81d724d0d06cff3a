"""``edgefed-profiles``: the device planning table (:mod:`profiles.devices`) with this
client's engine registry, so each cell says whether its mode is built or planned.

:mod:`profiles` is torch-free and never imports the engines; this thin entry point does,
and hands their policy rows over.
"""

from __future__ import annotations

from edge_client.engines import engine_policy
from profiles import devices

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return devices.main(argv, built=engine_policy())


if __name__ == "__main__":
    raise SystemExit(main())
