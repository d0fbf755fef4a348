"""HTTPS for the router's API (issue 12): ``--tls-certfile`` / ``--tls-keyfile`` (and ``--tls-ca-certs``).

1. A self-signed certificate for ``localhost`` / ``127.0.0.1`` is made in the test (``cryptography``, else the
   ``openssl`` command; skipped when neither is here).
2. A real router process serves HTTPS with it, a scripted worker behind it (tests/fakes/router_harness.py): the
   official ``openai`` client with an ``httpx`` client trusting that certificate completes a request, a client
   that does not trust it is refused, and plain HTTP gets no answer; ``splitserve up``'s readiness probe sees the
   router healthy over HTTPS.
3. With ``--tls-ca-certs`` a client must present a certificate that CA signed.
4. A missing, unreadable or invalid file, or half a pair, ends ``splitserve router`` and ``splitserve up`` at
   once with exit status 2 and one line naming the flag, no traceback.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes.router_harness import RouterHarness  # noqa: E402

from splitserve.core.tokenizer import load_tokenizer  # noqa: E402
from splitserve.launcher import plan_commands, wait_healthy  # noqa: E402
from splitserve.router.main import tls_context  # noqa: E402

TOK = load_tokenizer("builtin:tiny-random-llama")
SCRIPT = TOK.encode(" Hello world!", add_special_tokens=False)


def _cryptography_pair(cert: Path, key: Path, common_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    built = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(pkey, hashes.SHA256()))
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _openssl_pair(cert: Path, key: Path, common_name: str) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)


def self_signed(folder: Path, stem: str, common_name: str = "localhost") -> tuple[Path, Path]:
    """(certificate, key) PEM files: a self-signed certificate valid for localhost and 127.0.0.1."""
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    try:
        _cryptography_pair(cert, key, common_name)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        _openssl_pair(cert, key, common_name)
    return cert, key


class HttpsHarness(RouterHarness):
    """:class:`RouterHarness` over HTTPS: its own requests trust ``ca`` (and present ``client`` if given)."""

    def __init__(self, tmp: Path, ca: Path, client: tuple[Path, Path] | None = None, **flags: Any) -> None:
        self.ssl = ssl.create_default_context(cafile=str(ca))
        if client is not None:
            self.ssl.load_cert_chain(*map(str, client))
        super().__init__(tmp, **flags)

    def _start_router(self, model: str, flags: dict[str, Any]) -> None:
        super()._start_router(model, flags)
        self.url = self.url.replace("http://", "https://")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    server, server_key = self_signed(folder, "server")
    client, client_key = self_signed(folder, "client", common_name="test-client")
    return {"cert": server, "key": server_key, "client": client, "client_key": client_key}


@pytest.fixture(scope="module")
def https_router(tmp_path_factory, certs):
    h = HttpsHarness(tmp_path_factory.mktemp("tls"), certs["cert"], tls_certfile=certs["cert"],
                     tls_keyfile=certs["key"])
    h.add_worker("w", SCRIPT, vocab_size=TOK.vocab_size)
    yield h
    h.stop()


def test_openai_client_trusting_the_certificate_completes_over_https(https_router, certs):
    import httpx2

    http = httpx2.Client(verify=ssl.create_default_context(cafile=str(certs["cert"])), timeout=30)
    client = openai.OpenAI(base_url=f"{https_router.url}/v1", api_key="unused", max_retries=0, http_client=http)
    out = client.completions.create(model="builtin:tiny-random-llama", prompt="Hi", max_tokens=3)
    assert out.choices[0].text and out.usage.completion_tokens == 3
    assert [m.id for m in client.models.list().data] == ["builtin:tiny-random-llama"]


def test_a_client_that_does_not_trust_the_certificate_is_refused(https_router):
    client = openai.OpenAI(base_url=f"{https_router.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_plain_http_gets_no_answer_from_the_https_port(https_router):
    conn = http.client.HTTPConnection("127.0.0.1", https_router.port, timeout=30)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/health")
            conn.getresponse()
    finally:
        conn.close()


def test_the_launcher_probe_sees_the_https_router_healthy(https_router, certs):
    assert wait_healthy(https_router.url, [https_router.router], timeout_s=30)
    args = _up_args(tls_certfile=str(certs["cert"]), tls_keyfile=str(certs["key"]))
    router_argv = plan_commands(args, 9999)[0].argv
    assert router_argv[router_argv.index("--tls-certfile") + 1] == str(certs["cert"].resolve())
    assert router_argv[router_argv.index("--tls-keyfile") + 1] == str(certs["key"].resolve())


def test_client_certificates_are_required_with_tls_ca_certs(tmp_path, certs):
    flags = {"tls_certfile": certs["cert"], "tls_keyfile": certs["key"], "tls_ca_certs": certs["client"]}
    h = HttpsHarness(tmp_path, certs["cert"], client=(certs["client"], certs["client_key"]), **flags)
    try:
        assert h.get("/version")[0] == 200  # with the client certificate
        anonymous = ssl.create_default_context(cafile=str(certs["cert"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{h.url}/version", timeout=30, context=anonymous).read()
    finally:
        h.stop()


def _up_args(**tls: str) -> Any:
    import argparse

    from splitserve.launcher import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [x for k, v in tls.items() for x in ("--" + k.replace("_", "-"), v)]
    return parser.parse_args(argv)


def _bad_flag_sets(tmp: Path, certs: dict[str, Path]) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    unreadable = tmp / "unreadable.pem"
    unreadable.mkdir()  # a directory: open() fails for root too
    cert, key = str(certs["cert"]), str(certs["key"])
    return [
        (["--tls-certfile", str(tmp / "missing.crt"), "--tls-keyfile", key], "--tls-certfile"),
        (["--tls-certfile", cert, "--tls-keyfile", str(unreadable)], "--tls-keyfile"),
        (["--tls-certfile", str(garbage), "--tls-keyfile", key], "--tls-certfile"),
        (["--tls-certfile", cert], "--tls-keyfile"),
        (["--ssl-keyfile", key], "--tls-certfile"),
    ]


@pytest.mark.parametrize("command", ["router", "up"])
def test_missing_or_invalid_tls_files_exit_2_in_one_line(tmp_path, certs, command):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SPLITSERVE_")}
    for flags, named in _bad_flag_sets(tmp_path, certs):
        proc = subprocess.run([sys.executable, "-m", "splitserve.cli", command, "--port", "0", *flags],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert named in proc.stderr and "Traceback" not in proc.stderr, (flags, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_tls_context_refuses_a_key_that_does_not_match_the_certificate(certs):
    with pytest.raises(ValueError, match="--tls-certfile"):
        tls_context(str(certs["cert"]), str(certs["client_key"]))
    assert tls_context(str(certs["cert"]), str(certs["key"])).verify_mode == ssl.CERT_NONE
    assert tls_context(str(certs["cert"]), str(certs["key"]), str(certs["client"])).verify_mode == ssl.CERT_REQUIRED
