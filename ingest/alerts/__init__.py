"""Alerts (issues #14, #16): rules evaluated on event time inside the ingest transaction, events
delivered to webhooks (and over MQTT) from a durable outbox.

- model:        the compiled rules and webhooks (frozen values), durations;
- settings:     [[rules]], [[webhooks]], [alerts], validated with the fix for each problem;
- evaluate:     pure: a series' state and its new readings, in event-time order -> new state and events;
- body:         the webhook bodies: standard (pydantic; schemas/json/webhook.schema.json) and Alertmanager's
                payload version 4;
- stage:        the writer's alert stage: state rows locked in sorted order, evaluation, state, events and
                outbox rows (held instead while a silence matches), in the batch's transaction;
- silence:      silences: matching, holding a firing event, releasing it once when its silence ends;
- silence_cli:  `sensor-ingest silences add|list|expire`, `alerts ack`;
- dispatch:     the dispatcher task: claims the outbox under a lease, signs (Standard Webhooks) and POSTs,
                or publishes the MQTT channel's rows;
- mqtt_channel: the MQTT channel: topics, escaping, the publisher;
- runtime, cli, sign: the active rule set and its reloads, `rules` and `alerts` commands, signatures.
"""
