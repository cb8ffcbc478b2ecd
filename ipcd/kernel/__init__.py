"""The kernel border: the only code that meets ``sysv_ipc`` (message queues, shared-memory
segments, semaphores), vets the objects at ipcd's keys, bounds every wait, derives the
keys and asks whether a process is alive.  Kernel errors become ipcd's own here."""
