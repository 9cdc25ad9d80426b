"""Access tokens for accounts, from Microsoft's identity platform through MSAL.

Transports ask a `TokenProvider` for a token for a scope and tell it when the upstream refused
one; they never see MSAL. Errors are mapped here: the identity platform being unreachable,
throttling or failing becomes `TokenUnavailable`, a refusal of the credentials `TokenRejected`.
"""

from __future__ import annotations

from typing import Protocol

EXCHANGE_SCOPE = "https://outlook.office365.com/.default"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


class TokenProvider(Protocol):
    async def token(self, scope: str) -> str:
        """A valid access token for `scope`, from cache when it has enough life left."""
        ...

    def invalidate(self, scope: str) -> None:
        """Forget the cached token for `scope`: the upstream refused it."""
        ...
