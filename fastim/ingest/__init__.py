"""Publishing from a stream: entries a backend wrote to a Redis stream (its outbox,
relayed) are published or sent by the node and acknowledged in the stream only once
the node acknowledged them (docs/ingest.md)."""
