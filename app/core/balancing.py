"""The gateway's balancing policies, by name: what ``SAGELLM_GATEWAY_POLICY`` may say.

The policies themselves are ``app.gateway.balancing``'s; the names live here so that the
settings (which import only ``app.core``) validate against the one list.
"""

from __future__ import annotations

BALANCER_NAMES: tuple[str, ...] = ("least_outstanding", "round_robin")
