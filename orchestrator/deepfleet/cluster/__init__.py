"""The cluster's life: up, a saved cluster reopened (and healed), down."""
