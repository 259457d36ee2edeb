"""Intakes: how mail reaches the router — an IMAP mailbox, or the built-in SMTP listener."""
