"""Replay: pure tensor code from head weights and a batch to per-level losses. No I/O."""
