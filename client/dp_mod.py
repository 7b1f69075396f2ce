"""Client-side clipping for central differential privacy (run config ``dp = "client-fixed"``).

The server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper (``server/strategy.py``) puts the clipping norm
into every train message's config; Flower's ``fixedclipping_mod`` then clips the site's update
:math:`\\Delta = w_{site} - w_{global}` to :math:`\\|\\Delta\\|_2 \\le C` before it leaves the site. Flower's mod
refuses a message without that key, so :func:`dp_clipping_mod` applies it only when the server asked for clipping
(with ``dp = "off"`` or ``"server-fixed"`` it passes the message through unchanged).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the message's config holds the clipping norm, else a pass-through."""
    asks = any(KEY_CLIPPING_NORM in record for record in msg.content.config_records.values())
    return fixedclipping_mod(msg, context, call_next) if asks else call_next(msg, context)
