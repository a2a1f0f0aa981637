-- sagakit schema version 5 on SQLite: claims no longer walk past waiting sagas.
-- A claim takes the active sagas that are ready: new or woken ones (wake_at NULL) and those
-- whose wait is due (wake_at passed), oldest first. Keyed on coalesce(wake_at, 0), the ready
-- ones sort first (by creation) and the due ones after them (by wake time), so a claim's
-- index range ends at now: sagas waiting for a later time are never read by a claim.
CREATE INDEX sagakit_sagas_ready ON sagakit_sagas (coalesce(wake_at, 0), created_at, id)
    WHERE state IN ('started', 'running', 'compensating');
