"""Compile DeepSpeed's JIT ops at image build time.

The first training step otherwise spends minutes compiling them on every node, every
container start. The compiled ops land in TORCH_EXTENSIONS_DIR, which the image and the
launcher's environment both point at, so torch finds them up to date and skips the build.
"""

import sys

from deepspeed.accelerator import get_accelerator

# Per accelerator: the builders the workloads reach (comm for CPU collectives,
# Adam for ZeRO offload). A builder the accelerator lacks is skipped.
BUILDERS = {
    "cpu": ["ShareMemCommBuilder", "CPUAdamBuilder"],
    "cuda": ["CPUAdamBuilder"],
}


def main() -> int:
    accel = get_accelerator()
    names = sys.argv[1:] or BUILDERS.get(accel.device_name(), [])
    for name in names:
        builder = accel.create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"prebuild: {name} not available on {accel.device_name()}, skipped")
            continue
        builder.load()
        print(f"prebuild: {builder.absolute_name()} built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
