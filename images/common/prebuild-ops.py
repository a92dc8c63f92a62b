"""Compile DeepSpeed's JIT ops at image build time.

The first training step otherwise spends minutes compiling them on every node, every
container start. The compiled ops land in TORCH_EXTENSIONS_DIR, which the image and the
launcher's environment both point at, so torch finds them up to date and skips the build.

GPU images build without a GPU. Their GPU ops are compiled into the DeepSpeed package by
install-python.sh (a JIT build here would target no device); this checks that those load.
"""

import os
import sys

GPU_FLAVORS = ("cuda", "rocm")

# Per accelerator: the builders the workloads reach (comm for CPU collectives,
# Adam for ZeRO offload). A builder the accelerator lacks is skipped. ROCm's torch runs
# under DeepSpeed's cuda accelerator as well. CPU Adam stays JIT on every flavor: its flags
# follow the host CPU, so torch rebuilds it on a node whose CPU differs from the builder's.
BUILDERS = {
    "cpu": ["ShareMemCommBuilder", "CPUAdamBuilder"],
    "cuda": ["CPUAdamBuilder"],
}


def check_installed_ops() -> int:
    """Load every op compiled into the package; a GPU image without any is broken."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    built = sorted(name for name, on in installed_ops.items() if on)
    if not built:
        print("prebuild: no DeepSpeed op was compiled into the package", file=sys.stderr)
        return 1
    for name in built:
        ALL_OPS[name].load()
        print(f"prebuild: {ALL_OPS[name].absolute_name()} compiled into the package")
    return 0


def main() -> int:
    flavor = os.environ.get("DEEPFLEET_FLAVOR", "cpu")
    if flavor in GPU_FLAVORS:
        # Without a device DeepSpeed detects the cpu accelerator, whose builders and op
        # checks are not the ones the GPU nodes run.
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    from deepspeed.accelerator import get_accelerator

    if flavor in GPU_FLAVORS and check_installed_ops() != 0:
        return 1
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
