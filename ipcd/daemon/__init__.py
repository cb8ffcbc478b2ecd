"""The daemon side: start-up, detaching, the master (arbiter), workers, outcomes, recovery,
sweeps, reload rules, signals and the event log.  Never imported by the client side."""
