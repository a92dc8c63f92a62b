"""Shared unit-test data; its own module because conftest names clash across folders."""


def detect_report(**over) -> dict:
    """A detect --json report as a CPU node in the image prints it."""
    report = {
        "schema": 1,
        "hostname": "lab1",
        "ips": ["172.19.0.2"],
        "cpu_count": 8,
        "memory_bytes": 16 << 30,
        "accelerator": "cpu",
        "gpu_vendor": "none",
        "gpus": [],
        "versions": {
            "python": "3.11.2",
            "torch": "2.13.0+cpu",
            "deepspeed": "0.19.8",
            "transformers": "5.23.0",
        },
        "errors": [],
    }
    report.update(over)
    return report
