-- How many replay INSERTs of one replayer still run on the server, after
-- kill_replay_inserts.sql (see running_batch_inserts.sql: on 18.16 the KILL cannot stop them).
-- Parameter: the LIKE pattern 'adbeacon-replay-<consumer>-%'.
-- sample-params: 'adbeacon-replay-host-1-%'
SELECT count() FROM system.processes WHERE query_id LIKE ?
