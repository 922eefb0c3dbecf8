-- The stored events of some insert batches. Before re-sending a batch whose INSERT failed (a
-- timeout, a dropped connection, a crash), and before replaying spilled batches, the service asks
-- this: the INSERT may have been stored after all, wholly or, when the batch spans two monthly
-- partitions, in part. Only the rows missing here are sent again. The event_time range of the
-- batches prunes the scan.
-- Parameters: first event_time, last event_time (unix seconds), the batch ids (an array of strings).
-- sample-params: 1700000000, 1900000000, ['00000000-0000-0000-0000-000000000001']
SELECT event_id
FROM events
WHERE event_time >= toDateTime(?) AND event_time <= toDateTime(?)
  AND has(?, toString(batch_id))
