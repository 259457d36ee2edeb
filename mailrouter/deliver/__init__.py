"""Deliver: sends what the outbox holds — transports, the sent journal, the sender."""
