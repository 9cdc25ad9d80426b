"""Inbound: mail imported from Exchange Online mailboxes through Microsoft Graph into a Maildir,
a drop directory, a local SMTP server or an HTTP endpoint, each message once.

    importers = build_importers(config, tokens)     one per `inbound:` entry
    await importer.start() ... await importer.stop(grace)

See `relay.inbound.importer` (the import loop), `relay.inbound.sinks` (where messages go) and
`relay.inbound.state` (what is remembered, under the spool path).
"""

from relay.inbound.importer import Importer, RoundReport, build_importers

__all__ = ["Importer", "RoundReport", "build_importers"]
