"""The lab's registry: Debian's docker-registry on the operator, trusted by the lab's engines.

    python docker/lab.py up --nodes 3 --registry     # or, on a running lab: lab.py registry

It listens on the lab network's gateway (the operator's own address on the lab bridge)
with TLS from a CA made for this lab, so the lab machines' engines pull from it as they
would from a site registry, over HTTPS, without `insecure-registries`: each lab engine
trusts the CA through /etc/docker/certs.d/HOST:PORT/ca.crt, which the engine reads at
each pull. No engine outside the lab is touched: the operator pushes with skopeo, given
the CA with `--cert-dir`.

The registry is a container in the host's network namespace, labelled like everything
else the lab makes, so `lab.py down` removes it and its storage.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from docker.errors import DockerException, NotFound

from deepfleet.machines.transfer import tar_files

PORT = 5443  # not 5000: the docker-registry package's own service listens there
CONTAINER_SUFFIX = "registry"
CONFIG_DIR = "/etc/lab-registry"
CERTS_D = "/etc/docker/certs.d"


class RegistryError(Exception):
    pass


@dataclass(frozen=True)
class LabRegistry:
    address: str  # HOST:PORT, what image references name
    trust_dir: Path  # holds ca.crt only: skopeo's --cert-dir, and what the engines trust
    container: str

    def ref(self, repository: str, digest: str) -> str:
        return f"{self.address}/{repository}@{digest}"


def _name(prefix: str) -> str:
    return f"{prefix}-{CONTAINER_SUFFIX}"


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(directory: Path, host: str) -> Path:
    """A CA for this lab and the registry's certificate for `host` (an IP address) signed
    by it; returns the trust directory (ca.crt alone)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deepfleet lab CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.crt").write_bytes(_pem(cert) + _pem(ca))
    (directory / "server.key").write_bytes(_key_pem(key))
    (directory / "server.key").chmod(0o644)  # read by the registry's own user in its container
    trust = directory / "trust"
    trust.mkdir(exist_ok=True)
    (trust / "ca.crt").write_bytes(_pem(ca))
    return trust


def config_text(host: str, port: int = PORT) -> str:
    """distribution's configuration: storage on disk, HTTPS on the lab bridge only."""
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n  filesystem:\n    rootdirectory: /var/lib/docker-registry\n"
        "  delete:\n    enabled: true\n"
        "http:\n"
        f"  addr: {host}:{port}\n"
        "  tls:\n"
        f"    certificate: {CONFIG_DIR}/server.crt\n"
        f"    key: {CONFIG_DIR}/server.key\n"
    )


def gateway(client, network: str) -> str:
    configs = client.networks.get(network).attrs["IPAM"]["Config"]
    found = next((c["Gateway"] for c in configs if c.get("Gateway")), None)
    if not found:
        raise RegistryError(f"the lab network {network} has no gateway address")
    return found.split("/")[0]


def trust_on(container, address: str, ca: bytes) -> None:
    """Make one lab machine's engine trust the lab CA for `address` (no restart needed)."""
    directory = f"{CERTS_D}/{address}"
    code, out = container.exec_run(["mkdir", "-p", directory])
    if code != 0 or not container.put_archive(directory, tar_files({"ca.crt": (ca, 0o644)})):
        detail = " ".join(out.decode(errors="replace").split())
        raise RegistryError(f"{container.name}: cannot install the lab CA: {detail}")


def _wait_ready(url: str, ca: Path, container, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, verify=str(ca), timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        container.reload()
        if container.status != "running":
            logs = " ".join(container.logs(tail=5).decode(errors="replace").split())
            raise RegistryError(f"the lab registry stopped: {logs}")
        time.sleep(0.5)
    raise RegistryError(f"the lab registry did not answer at {url} in {timeout:.0f}s")


def start(
    client, lab_dir: Path, machines, *, image: str, network: str, prefix: str, label: str
) -> LabRegistry:
    """Start the registry on the lab bridge's gateway and make every machine trust it."""
    host = gateway(client, network)
    address = f"{host}:{PORT}"
    directory = lab_dir / "registry"
    trust = make_certs(directory, host)
    (directory / "config.yml").write_text(config_text(host))
    volume = client.volumes.create(name=f"{_name(prefix)}-data", labels={label: "1"})
    try:
        container = client.containers.run(
            image,
            name=_name(prefix),
            detach=True,
            labels={label: "1"},
            network_mode="host",
            entrypoint=["docker-registry", "serve", f"{CONFIG_DIR}/config.yml"],
            volumes={
                str(directory): {"bind": CONFIG_DIR, "mode": "ro"},
                volume.name: {"bind": "/var/lib/docker-registry", "mode": "rw"},
            },
        )
    except DockerException as exc:
        raise RegistryError(f"cannot start the lab registry: {exc}") from None
    _wait_ready(f"https://{address}/v2/", trust / "ca.crt", container)
    ca = (trust / "ca.crt").read_bytes()
    for machine in machines:
        trust_on(machine, address, ca)
    return LabRegistry(address, trust, container.name)


def find(client, lab_dir: Path, prefix: str, network: str) -> LabRegistry:
    """The running lab's registry."""
    try:
        container = client.containers.get(_name(prefix))
    except NotFound:
        raise RegistryError("the lab has no registry (lab.py registry starts one)") from None
    return LabRegistry(f"{gateway(client, network)}:{PORT}", lab_dir / "registry" / "trust",
                       container.name)  # fmt: skip


def stop(client, registry: LabRegistry) -> None:
    """Stop it, keeping what it stores (`start_again` brings the same registry back)."""
    client.containers.get(registry.container).stop(timeout=5)


def start_again(client, registry: LabRegistry) -> None:
    container = client.containers.get(registry.container)
    container.start()
    _wait_ready(f"https://{registry.address}/v2/", registry.trust_dir / "ca.crt", container)
