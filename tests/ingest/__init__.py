"""Integration tests of the ingest path (CONTRACT §4, §5) against a real nats-server."""
