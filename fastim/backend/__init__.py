"""The application's backend in the loop: proxy hooks that ask it (connect, refresh,
subscribe, publish, rpc: docs/proxy.md) and the event webhooks that tell it, at least
once, through a durable outbox (docs/events.md).

Below the hub and the postman in the layers (they hand their events to it), above the
store (the outbox lives there) and the configuration.
"""
