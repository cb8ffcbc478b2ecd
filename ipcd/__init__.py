"""ipcd: a local job-queue daemon on System V IPC.

Kept empty of imports so that ``import ipcd.client`` stays cheap for cron scripts.
"""

__version__ = "0.1.0"
