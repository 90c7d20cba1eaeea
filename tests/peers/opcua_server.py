"""An OPC UA server built on asyncua (FreeOpcUa, a third-party stack), for
the e2e tests: a second server implementation beside async-opcua's own.

Namespace `urn:guantong:asyncua`, folder `Plant`:
  static nodes (never change): Static.Bool (True), Static.Int16 (-1234),
  Static.UInt32 (4000000000), Static.Int64 (-9007199254740993),
  Static.Float (0.25), Static.Double (3.141592653589793), Static.String ("Linie 7"),
  Static.UInt64Max (18446744073709551615);
  changing nodes, one step every --period ms from 1: Sim.Counter (UInt32 n),
  Sim.Half (Double n / 2), Sim.Text (String "n=<n>").
Endpoints: None, and with --secure Sign and SignAndEncrypt of Basic256Sha256,
Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss (asyncua rates them by its
SecurityLevel, Aes256_Sha256_RsaPss SignAndEncrypt highest);
with --user/--password only that user (no anonymous).
--cert-host NAME: the server certificate names only that host (DNS), not
127.0.0.1 or localhost, as a certificate made for another machine.
--check-client-uri: refuse a client whose ApplicationUri is not the one in
its certificate (BadCertificateUriInvalid), as strict servers do.
Prints `ready <port>` once listening, `step <n>` every 100 steps.
"""

import argparse
import asyncio
import datetime
import ipaddress
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager
from asyncua.server.users import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

NAMESPACE = "urn:guantong:asyncua"
APP_URI = "urn:guantong:asyncua-server"

STATIC = [
    ("Static.Bool", True, ua.VariantType.Boolean),
    ("Static.Int16", -1234, ua.VariantType.Int16),
    ("Static.UInt32", 4000000000, ua.VariantType.UInt32),
    ("Static.Int64", -9007199254740993, ua.VariantType.Int64),
    ("Static.Float", 0.25, ua.VariantType.Float),
    ("Static.Double", 3.141592653589793, ua.VariantType.Double),
    ("Static.String", "Linie 7", ua.VariantType.String),
    ("Static.UInt64Max", 18446744073709551615, ua.VariantType.UInt64),
]


class OneUser(UserManager):
    def __init__(self, user, password):
        self.user, self.password = user, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.user and password == self.password:
            return User(role=UserRole.User, name=username)
        return None


def own_certificate(pki: Path, host):
    """A certificate naming 127.0.0.1 and localhost (or only `host`), made once."""
    pki.mkdir(parents=True, exist_ok=True)
    key_file, cert_file = pki / "key.pem", pki / "cert.der"
    if not cert_file.exists():
        key = cert_gen.generate_private_key()
        key_file.write_bytes(cert_gen.dump_private_key_as_pem(key))
        names = [x509.UniformResourceIdentifier(APP_URI)]
        if host:
            names.append(x509.DNSName(host))
        else:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = cert_gen.generate_self_signed_app_certificate(
            key,
            "Guantong asyncua test server",
            {"commonName": "Guantong asyncua test server", "organizationName": "Guantong tests"},
            names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=30,
        )
        cert_file.write_bytes(cert.public_bytes(encoding=Encoding.DER))
    return key_file, cert_file


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pki", required=True)
    ap.add_argument("--secure", action="store_true")
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--period", type=int, default=200)
    ap.add_argument("--cert-host")
    ap.add_argument("--check-client-uri", action="store_true")
    args = ap.parse_args()

    server = Server(user_manager=OneUser(args.user, args.password) if args.user else None)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{args.port}/")
    server.set_server_name("Guantong asyncua test server")
    await server.set_application_uri(APP_URI)
    policies = [ua.SecurityPolicyType.NoSecurity]
    if args.secure:
        key_file, cert_file = own_certificate(Path(args.pki), args.cert_host)
        await server.load_certificate(str(cert_file))
        await server.load_private_key(str(key_file))
        policies += [
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
            ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
            ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
            ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
        ]
    server.set_security_policy(policies)
    if args.check_client_uri:
        validator = CertificateValidator(CertificateValidatorOptions.BASIC_VALIDATION)
        server.set_certificate_validator(validator.validate)
    server.set_security_IDs(["Username"] if args.user else ["Anonymous"])

    ns = await server.register_namespace(NAMESPACE)
    plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", ns), "Plant")
    for name, value, vtype in STATIC:
        await plant.add_variable(ua.NodeId(name, ns), name, ua.Variant(value, vtype))
    counter = await plant.add_variable(ua.NodeId("Sim.Counter", ns), "Sim.Counter", ua.Variant(0, ua.VariantType.UInt32))
    half = await plant.add_variable(ua.NodeId("Sim.Half", ns), "Sim.Half", ua.Variant(0.0, ua.VariantType.Double))
    text = await plant.add_variable(ua.NodeId("Sim.Text", ns), "Sim.Text", ua.Variant("n=0", ua.VariantType.String))

    async with server:
        print(f"ready {args.port}", flush=True)
        n = 0
        while True:
            await asyncio.sleep(args.period / 1000)
            n += 1
            now = datetime.datetime.now(datetime.timezone.utc)
            for node, value, vtype in (
                (counter, n, ua.VariantType.UInt32),
                (half, n / 2, ua.VariantType.Double),
                (text, f"n={n}", ua.VariantType.String),
            ):
                await node.write_value(ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now))
            if n % 100 == 0:
                print(f"step {n}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
