"""The router registry: every module of ``usmoe_lp/routers/entries/`` defines one ``ROUTER``.

Adding a router is adding one module there (and its tests): :func:`list_routers` finds it, and the
counterfactual, leakage, margins, analyze, the CLI and the figures read it from here.

>>> from usmoe_lp.routers import list_routers
>>> {"tc", "ec", "usmoe", "capacity_tc"} <= set(list_routers())
True
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from usmoe_lp.errors import InvalidParameter
from usmoe_lp.routers import entries
from usmoe_lp.routers.spec import Router


def _discover() -> Mapping[str, Router]:
    found: dict[str, Router] = {}
    for info in pkgutil.iter_modules(entries.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{entries.__name__}.{info.name}")
        router = getattr(module, "ROUTER", None)
        if not isinstance(router, Router):
            raise TypeError(f"{module.__name__} must define ROUTER = Router(...)")
        if router.name in found:
            raise TypeError(f"two registry modules define router {router.name!r}")
        found[router.name] = router
    ordered = sorted(found.values(), key=lambda r: (r.order, r.name))
    return MappingProxyType({r.name: r for r in ordered})


ROUTERS: Mapping[str, Router] = _discover()
"""name -> :class:`Router`, in registry order (read-only)."""


def list_routers() -> tuple[str, ...]:
    """The names of the registered routers, in registry order (``native`` and ``tc`` first)."""
    return tuple(ROUTERS)


def get_router(name: str) -> Router:
    """The :class:`Router` registered as ``name``, or :class:`InvalidParameter` listing the names."""
    if isinstance(name, Router):
        return name
    try:
        return ROUTERS[name]
    except (KeyError, TypeError):
        raise InvalidParameter(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
