"""Deciding, not doing: pure functions from inventory and node reports to plans.

Nothing here touches the network, Docker or a process (import-linter checks it)."""
