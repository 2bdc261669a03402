-- Issue #13: the metric catalog's binding on each metric, and the per-reading reasons of a rejection.

-- valid_min / valid_max (0001) are the quantity's *possible* range: outside it a reading is rejected
-- (out_of_range). The plausible range: outside it a reading is stored with flags bit 1 (suspect).
ALTER TABLE metrics
    ADD COLUMN quantity      text,              -- the catalog quantity the name is bound to; NULL: unbound
    ADD COLUMN plausible_min double precision,
    ADD COLUMN plausible_max double precision,
    ADD COLUMN range_source  text;              -- where the ranges come from (datasheet, records, config)

-- One row per message; when several of its readings were not stored, each with its own reason:
-- [{"reason": "out_of_range", "detail": "...", "device": "..."}, ...]. `reason` is the first one's.
ALTER TABLE rejected_messages ADD COLUMN details jsonb;
