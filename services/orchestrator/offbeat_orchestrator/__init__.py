"""offbeat orchestrator service: Runs the schedule, writes the ledger and serves the admin API."""
