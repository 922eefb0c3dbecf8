-- Ends every replay INSERT of one replayer that may still be running, and waits until they have.
-- A replayer that died (its spill entries left pending) may have left one running on a slow or
-- frozen server; the replayer that claims its entries runs this before looking up what is stored.
-- Replay INSERTs run with the query_id 'adbeacon-replay-<consumer>-<id>'.
-- Parameter: the LIKE pattern 'adbeacon-replay-<consumer>-%'.
-- sample-params: 'adbeacon-replay-host-1-%'
KILL QUERY WHERE query_id LIKE ? SYNC
