"""The node images: built here, put on each machine (pulled, streamed or relayed)."""
