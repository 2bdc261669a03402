"""Threshold alerts (issue #14): rules evaluated on event time inside the ingest transaction, events
delivered to webhooks from a durable outbox.

- model:    the compiled rules and webhooks (frozen values), durations;
- evaluate: pure: a series' state and its new readings, in event-time order -> new state and events;
- body:     the webhook body (pydantic; its JSON Schema is schemas/json/webhook.schema.json);
- stage:    the writer's alert stage: state rows locked in sorted order, evaluation, state, events and
            outbox rows, in the batch's transaction;
- dispatch: the dispatcher task: claims the outbox under a lease, signs (Standard Webhooks) and POSTs.
"""
