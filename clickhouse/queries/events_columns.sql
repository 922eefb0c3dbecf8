-- The columns of `events` with their types, as the server holds them now. Before an INSERT
-- adbeacon compares the ones it writes with what it sends: RowBinary carries no types, so a column
-- whose type changed under the running service (ALTER ... MODIFY COLUMN) would make the server
-- read shifted bytes as rows instead of failing.
SELECT name, type
FROM system.columns
WHERE database = currentDatabase() AND table = 'events'
