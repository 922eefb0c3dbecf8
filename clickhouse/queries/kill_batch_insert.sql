-- Ends an earlier INSERT of a batch that may still be running on the server (every INSERT of a
-- batch runs with the batch id as its query_id) and waits until it has. Run before looking up
-- what of the batch is stored, so that the answer cannot change while the batch is re-sent.
-- Parameter: the batch id.
-- sample-params: '00000000-0000-0000-0000-000000000001'
KILL QUERY WHERE query_id = ? SYNC
