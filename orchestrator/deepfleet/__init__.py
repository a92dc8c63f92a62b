"""deepfleet: DeepSpeed across the machines on your LAN, in containers."""

__version__ = "0.1.0"
