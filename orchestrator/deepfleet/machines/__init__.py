"""Reaching and using one machine: SSH and its Docker engine, its node container, files."""
