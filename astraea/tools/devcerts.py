"""Development certificates (`astraea certs`, `astraea up`): a CA, a server certificate and a
client certificate, all signed by that CA, as PEM files in one directory.

For development and tests only: the CA's private key sits beside the certificates it signs.
In production, certificates come from the operator's own CA. Keys are ECDSA P-256 (fast to
make, accepted by every gRPC TLS stack); each key file is readable by its owner only.
`StackSecurity` adds the keys of a secure `astraea up` and the flags each service gets;
`write_deploy_secrets` writes the same files, plus the gateway's API keys, for the compose file
and the Kubernetes manifests under docker/ (`astraea certs DIR --deploy compose|k8s`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365
# The names the services dial each other by (the server certificate's SANs) where docker/
# deploys them: compose service names; Kubernetes Service names, short and qualified in the
# `astraea` namespace of docker/k8s/base.
_K8S_SERVICES = ("control-plane", "predictor")
DEPLOY_HOSTS = {
    "compose": _K8S_SERVICES,
    "k8s": tuple(f"{s}{suffix}" for s in _K8S_SERVICES
                 for suffix in ("", ".astraea", ".astraea.svc", ".astraea.svc.cluster.local")),
}
GATEWAY_API_KEYS = "gateway-api-keys"  # the gateway's own HTTP keys (its --api-key-file)


@dataclass(frozen=True)
class DevCerts:
    """The files `make_dev_certs` wrote."""

    ca: Path  # what clients and services trust (--tls-ca)
    ca_key: Path
    server_cert: Path  # --tls-cert of a service; also usable as its client certificate
    server_key: Path
    client_cert: Path  # a client's certificate for mutual TLS
    client_key: Path
    hosts: tuple[str, ...]  # the names and addresses the server certificate is valid for


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # A private key is created 0600, never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_dev_certs(directory: str | os.PathLike, hosts: tuple[str, ...] = ()) -> DevCerts:
    """A new CA, a server certificate for localhost, 127.0.0.1, ::1 and `hosts`, and a client
    certificate, written to `directory` (created if needed; existing files are replaced)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(dict.fromkeys([*DEFAULT_HOSTS, *(h for h in hosts if h)]))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Astraea development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Astraea development CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages: list, sans: tuple[str, ...]):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    # The services' certificate may also be presented as a client certificate (the control
    # plane calling the predictor, under mutual TLS).
    server, server_key = leaf("astraea-server", [ExtendedKeyUsageOID.SERVER_AUTH,
                                                 ExtendedKeyUsageOID.CLIENT_AUTH], names)
    client, client_key = leaf("astraea-client", [ExtendedKeyUsageOID.CLIENT_AUTH], ())
    certs = DevCerts(out / "ca.pem", out / "ca-key.pem", out / "server.pem",
                     out / "server-key.pem", out / "client.pem", out / "client-key.pem", names)
    pem = serialization.Encoding.PEM
    _write(certs.ca, ca.public_bytes(pem))
    _write(certs.ca_key, key_pem(ca_key), private=True)
    _write(certs.server_cert, server.public_bytes(pem))
    _write(certs.server_key, key_pem(server_key), private=True)
    _write(certs.client_cert, client.public_bytes(pem))
    _write(certs.client_key, key_pem(client_key), private=True)
    return certs


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe text: no ':' or spaces)."""
    import secrets

    return secrets.token_urlsafe(32)


def write_key_file(path: str | os.PathLike, lines: list[str]) -> Path:
    """A key file (owner-readable only) with one entry per line."""
    path = Path(path)
    _write(path, "".join(f"{line}\n" for line in lines).encode(), private=True)
    return path


@dataclass(frozen=True)
class StackSecurity:
    """The development certificates and the keys of a secure `astraea up` stack, as files in one
    directory: the client key (control plane, owner "client"), the gateway's own key (owner
    "gateway"), the worker token and the predictor token."""

    certs: DevCerts
    client_key: str
    client_key_file: Path
    api_key_file: Path  # the control plane's --api-key-file: the client's and the gateway's
    gateway_key_file: Path
    worker_token_file: Path
    predictor_token_file: Path

    @classmethod
    def create(cls, directory: Path, hosts: list[str]) -> StackSecurity:
        """New certificates (valid for loopback and `hosts`, the services' listen hosts) and
        keys in `directory`."""
        hosts = [h.strip("[]") for h in hosts]
        certs = make_dev_certs(directory, tuple(h for h in hosts
                                                if h not in ("0.0.0.0", "::", "")))
        client, gateway = new_key(), new_key()
        return cls(certs, client, write_key_file(directory / "client.key", [client]),
                   write_key_file(directory / "api-keys", [f"client:{client}",
                                                           f"gateway:{gateway}"]),
                   write_key_file(directory / "gateway.key", [gateway]),
                   write_key_file(directory / "worker.token", [new_key()]),
                   write_key_file(directory / "predictor.token", [new_key()]))

    def _tls(self) -> list[str]:
        return ["--tls-cert", str(self.certs.server_cert), "--tls-key",
                str(self.certs.server_key)]

    def predictor_args(self) -> list[str]:
        return [*self._tls(), "--token-file", str(self.predictor_token_file)]

    def control_plane_args(self) -> list[str]:
        return [*self._tls(), "--tls-ca", str(self.certs.ca), "--api-key-file",
                str(self.api_key_file), "--worker-token-file", str(self.worker_token_file),
                "--predictor-token-file", str(self.predictor_token_file)]

    def worker_args(self) -> list[str]:
        return ["--tls-ca", str(self.certs.ca), "--token-file", str(self.worker_token_file)]

    def gateway_args(self) -> list[str]:
        return ["--control-plane-tls-ca", str(self.certs.ca), "--control-plane-key-file",
                str(self.gateway_key_file)]


def write_deploy_secrets(directory: str | os.PathLike, deploy: str,
                         hosts: tuple[str, ...] = ()) -> StackSecurity:
    """Every file docker/compose.yaml (`deploy` "compose") or docker/k8s/base ("k8s") mounts:
    the `StackSecurity` files, with the deployment's service names in the server certificate,
    and the gateway's API keys. Existing files are replaced.

    For compose the directory is made owner-only and the files a container mounts readable
    by all: compose bind-mounts a secret file with its host owner and mode (it cannot change
    them outside swarm), and the containers run as their own user (10001). kustomize reads the
    files as the user who runs it, so for k8s the private ones stay owner-only."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if deploy == "compose":
        out.chmod(0o700)  # before a key is written: nobody else reaches the files
    sec = StackSecurity.create(out, [*DEPLOY_HOSTS[deploy], *hosts])
    write_key_file(out / GATEWAY_API_KEYS, [new_key()])
    if deploy == "compose":
        # Only what a container mounts; the CA's key and the agent clients' key stay private.
        c = sec.certs
        for path in (c.ca, c.server_cert, c.server_key, c.client_cert, c.client_key,
                     sec.api_key_file, sec.gateway_key_file, sec.worker_token_file,
                     sec.predictor_token_file, out / GATEWAY_API_KEYS):
            path.chmod(0o644)
    return sec
