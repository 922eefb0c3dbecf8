-- How many queries whose ids match a LIKE pattern still run on the server: a replayer's INSERTs
-- after kill_replay_inserts.sql (see running_batch_inserts.sql: on 18.16 the KILL cannot stop
-- them), pattern 'adbeacon-replay-<consumer>-%'; or migration statements of an earlier
-- `adbeacon migrate` that gave up waiting for them, pattern 'adbeacon-migration-%'.
-- Parameter: the LIKE pattern.
-- sample-params: 'adbeacon-replay-host-1-%'
SELECT count() FROM system.processes WHERE query_id LIKE ?
