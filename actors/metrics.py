"""`raycord_*` metrics through `ray.util.metrics`, cheap on the hot path.

Counters are bumped in place; gauges are set from the maintenance loop. Outside Ray
(unit tests, benchmarks of the plain classes) every metric is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class _NoOp:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        return None

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        return None

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        return None


_NOOP = _NoOp()


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def counter(name: str, description: str, tag_keys: Sequence[str] = ()) -> Any:
    if not _ray_ready():
        return _NOOP
    from ray.util.metrics import Counter

    return Counter(f"raycord_{name}", description=description, tag_keys=tuple(tag_keys))


def gauge(name: str, description: str, tag_keys: Sequence[str] = ()) -> Any:
    if not _ray_ready():
        return _NOOP
    from ray.util.metrics import Gauge

    return Gauge(f"raycord_{name}", description=description, tag_keys=tuple(tag_keys))


def histogram(name: str, description: str, boundaries: Sequence[float], tag_keys: Sequence[str] = ()) -> Any:
    if not _ray_ready():
        return _NOOP
    from ray.util.metrics import Histogram

    return Histogram(
        f"raycord_{name}",
        description=description,
        boundaries=list(boundaries),
        tag_keys=tuple(tag_keys),
    )


LATENCY_MS_BOUNDARIES = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
