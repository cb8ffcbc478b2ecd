"""The live shared tables, built on the kernel border and the byte layouts: the result
store, the in-flight table, the failed list, the unique keys, the stats and the spill
table with its segments.  Both sides use them: clients and the daemon."""
