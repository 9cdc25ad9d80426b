"""Child process for test_inbound_crash: import a mailbox into a maildir until SIGKILLed.

    python inbound_crash_child.py SETTINGS.json

SETTINGS names the emulator's endpoints and CA, the sample app's credentials, the mailbox, the
maildir, the state file and the `after:` action. The importer polls every few milliseconds with
the real token provider (MSAL against the emulated identity platform) and runs until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from relay.config import (
    AccountConfig,
    AfterImport,
    Cloud,
    Credential,
    CredentialKind,
    Endpoints,
    InboundConfig,
    Secret,
)
from relay.identity import MsalTokenProvider
from relay.inbound import Importer


async def main(settings: dict[str, str]) -> None:
    account = AccountConfig(
        name="contoso",
        cloud=Cloud.GLOBAL,
        tenant_id=settings["tenant_id"],
        client_id=settings["client_id"],
        credential=Credential(kind=CredentialKind.SECRET, secret=Secret(settings["secret"])),
        endpoints=Endpoints(
            authority=settings["authority"],
            smtp_host="127.0.0.1",
            smtp_port=587,
            graph=settings["graph"],
        ),
        ca_file=Path(settings["ca_file"]),
    )
    after = AfterImport(settings["after"])
    config = InboundConfig(
        name="crash",
        account="contoso",
        mailbox=settings["mailbox"],
        poll_interval=0.02,
        deliver={"maildir": Path(settings["maildir"])},
        after=after,
        move_to="Imported" if after is AfterImport.MOVE_TO else None,
    )
    importer = Importer(
        config,
        account=account,
        tokens=MsalTokenProvider(account),
        state_path=Path(settings["state"]),
        page_size=25,
        retry_base=0.0,
    )
    await importer.start()
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
