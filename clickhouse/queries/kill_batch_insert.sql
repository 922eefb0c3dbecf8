-- Ends earlier INSERTs that may still be running on the server and waits until they have: a
-- flusher INSERT runs with its batch id as query_id, a replay INSERT with an id of its own. Run
-- before looking up what of the batches is stored, so that the answer cannot change while they
-- are re-sent.
-- Parameter: the query ids (an array of strings).
-- sample-params: ['00000000-0000-0000-0000-000000000001']
KILL QUERY WHERE has(?, query_id) SYNC
