"""relay: a durable SMTP relay to Exchange Online (XOAUTH2 / Graph) and a mailbox importer."""

__version__ = "0.1.0"
