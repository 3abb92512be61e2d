"""The worker: takes round tasks, trains locally on its own partition, publishes updates."""
