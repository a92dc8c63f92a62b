"""The node images: build-image and push-image."""

from __future__ import annotations

from pathlib import Path

from deepfleet.images import relay
from deepfleet.images.build import BuildRequest, build, build_relay
from deepfleet.planning import flavors


def cmd_build(args) -> int:
    import docker

    req = BuildRequest(
        flavor=args.flavor,
        base_image=args.base_image,
        ca_dir=Path(args.ca_dir) if args.ca_dir else None,
        wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
        torch_index_url=args.torch_index_url,
        tag=args.tag,
    )
    client = docker.from_env(timeout=3600)
    image_id = build(client, req, verbose=args.verbose)
    print(f"deepfleet: built {req.resolved_tag()} ({image_id[:19]})")
    relay_id = build_relay(client, args.base_image, verbose=args.verbose)
    print(f"deepfleet: built {relay.RELAY_IMAGE} ({relay_id[:19]}), the image relay")
    return 0


def cmd_push_image(args) -> int:
    import docker

    from deepfleet.images import published, registry
    from deepfleet.images.manifest import read_manifest

    manifest = read_manifest()
    local = docker.from_env(timeout=600)
    try:
        for flavor in args.flavor or ["cpu"]:
            source = flavors.get(flavor).image
            print(f"deepfleet: pushing {source} to {args.registry} (skopeo)", flush=True)
            entry = registry.push(
                local, source, args.registry, flavor, manifest,
                Path(args.cert_dir) if args.cert_dir else None, not args.no_tls_verify,
            )  # fmt: skip
            where = published.record(entry)
            print(f"deepfleet: pushed {entry['tag']}")
            print(f"deepfleet: up --image {entry['ref']}  (recorded in {where})")
    finally:
        local.close()
    return 0


def add_build_image(sub) -> None:
    bd = sub.add_parser("build-image", help="build a node image from images/")
    bd.add_argument("--flavor", default="cpu", choices=flavors.NAMES)
    bd.add_argument(
        "--base-image",
        default="local",
        help="'local' (default): a debootstrap Debian base (cpu, cuda); "
        "'vendor': the Dockerfile's public base (nvidia/cuda, rocm/dev-ubuntu); or an image name",
    )
    bd.add_argument("--ca-dir", default="/usr/local/share/ca-certificates")
    bd.add_argument("--wheelhouse", default="/opt/wheels" if Path("/opt/wheels").is_dir() else "")
    bd.add_argument("--torch-index-url", default="")
    bd.add_argument("--tag", default="")
    bd.set_defaults(func=cmd_build)


def add_push_image(sub) -> None:
    ph = sub.add_parser(
        "push-image", help="push the node images to a registry and record their digests"
    )
    ph.add_argument("registry", help="host[:port] of the registry")
    ph.add_argument("--flavor", action="append", choices=flavors.NAMES, help="default: cpu")
    ph.add_argument("--cert-dir", help="the registry's CA certificate(s), for a private CA")
    ph.add_argument("--no-tls-verify", action="store_true", help="a plain-HTTP registry")
    ph.set_defaults(func=cmd_push_image)
