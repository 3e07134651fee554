"""One module per registry router, each defining ``ROUTER`` (see :mod:`usmoe_lp.routers.spec`)."""
