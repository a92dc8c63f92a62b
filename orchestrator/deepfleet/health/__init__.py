"""What is going on: status and doctor (they read, never change)."""
