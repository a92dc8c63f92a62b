"""`deepfleet serve`: replicas on the machines behind an OpenAI-compatible gateway."""
