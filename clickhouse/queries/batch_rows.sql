-- How many rows of one insert batch are stored. The flusher asks this after an INSERT whose
-- outcome it does not know (a timeout, a dropped connection): a batch is one block, stored whole
-- or not at all, so the answer is its row count or 0, and it is re-sent only when 0.
-- The event_time range of the batch prunes the scan to its partitions.
-- Parameters: first event_time, last event_time (unix seconds), batch id.
-- sample-params: 1700000000, 1900000000, '00000000-0000-0000-0000-000000000001'
SELECT count()
FROM events
WHERE event_time >= toDateTime(?) AND event_time <= toDateTime(?)
  AND batch_id = toUUID(?)
