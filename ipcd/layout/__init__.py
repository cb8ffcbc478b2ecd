"""Byte layouts of the shared segments (the result ring, the stats record, the in-flight
table) as pure functions over a buffer: testable without a kernel, no kernel, no logging."""
