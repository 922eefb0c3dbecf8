-- How many of these INSERTs still run on the server, after kill_batch_insert.sql. An INSERT whose
-- rows arrive in the HTTP body cannot be cancelled on ClickHouse 18.16 (KILL answers
-- 'cant_cancel' and the INSERT goes on, and may still store its rows), so the check waits
-- until this is 0 before it looks up what is stored.
-- Parameter: the query ids (an array of strings).
-- sample-params: ['00000000-0000-0000-0000-000000000001']
SELECT count() FROM system.processes WHERE has(?, query_id)
