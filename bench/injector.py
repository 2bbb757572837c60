"""The sidecar injector: latency per AdmissionReview (target p99 <= 10 ms).

Prints, for ``--reviews`` reviews after ``--warmup``:
  * over HTTPS, one keep-alive connection (what kube-apiserver does), one
    review at a time: client-side round trip p50/p99/max and reviews/s, for a
    Pod that gets the sidecar (the example agent) and for one that is left
    alone (opted out);
  * over HTTPS, a new connection per review (TLS handshake included, the worst
    case: ``--cold`` reviews);
  * in process, ``decide()`` alone (parse, decide, build the patch), p50/p99.
The server runs in this process (threads), so client and server share the
machine; figures are printed, never asserted.

    .venv/bin/python bench/injector.py [--reviews 5000] [--warmup 500] [--cold 300]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentmesh.injector import Injector, InjectorConfig, decide, running
from bench.common import end_on_sigterm, positive


def certificates(directory: Path) -> Path:
    """A CA and a certificate for localhost, as the chart's genCA/genSignedCert make."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench-ca"))
        .issuer_name(name("bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.crt"


def agent_pod(opted_out: bool = False) -> dict[str, Any]:
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": "9091"}
    if opted_out:
        annotations["agentmesh.io/inject"] = "false"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "my-agent-5d4f8b7c9-",
            "labels": {"app.kubernetes.io/name": "my-agent"},
            "annotations": annotations,
        },
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "containers": [
                {
                    "name": "agent",
                    "image": "my-company/my-agent:v1.0.0",
                    "ports": [{"name": "http", "containerPort": 3000}],
                    "env": [{"name": "AGENTMESH_PROXY_URL", "value": "http://localhost:8081"}],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def review(pod: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "my-app",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "dryRun": False,
            },
        }
    ).encode()


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return f"p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  max {ordered[-1] * 1000:6.3f} ms"


def warm(port: int, context: ssl.SSLContext, body: bytes, count: int) -> list[float]:
    """Round trips over one keep-alive connection."""
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    headers = {"Content-Type": "application/json"}
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/inject", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            samples.append(time.perf_counter() - started)
            if response.status != 200 or b'"allowed": true' not in answer:
                raise SystemExit(f"bench/injector: unexpected answer {response.status} {answer!r}")
    finally:
        connection.close()
    return samples


def cold(port: int, context: ssl.SSLContext, body: bytes, count: int) -> list[float]:
    """A new TLS connection per review."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        connection.request("POST", "/inject", body=body, headers={"Connection": "close"})
        connection.getresponse().read()
        connection.close()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=positive, default=5000)
    parser.add_argument("--warmup", type=positive, default=500)
    parser.add_argument("--cold", type=positive, default=300)
    args = parser.parse_args()

    config = InjectorConfig(native_sidecar=True)
    inject, skip = review(agent_pod()), review(agent_pod(opted_out=True))
    print(f"AdmissionReview: {len(inject)} bytes; answer with patch: ", end="")
    print(f"{len(decide(inject, config).response())} bytes")
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as directory:
        ca = certificates(Path(directory))
        context = ssl.create_default_context(cafile=str(ca))
        injector = Injector(
            config,
            cert_file=Path(directory) / "tls.crt",
            key_file=Path(directory) / "tls.key",
            host="127.0.0.1",
            port=0,
            metrics_port=0,
        )
        with running(injector):
            warm(injector.port, context, inject, args.warmup)
            for label, body in (("injected", inject), ("opted out", skip)):
                started = time.perf_counter()
                samples = warm(injector.port, context, body, args.reviews)
                rate = len(samples) / (time.perf_counter() - started)
                print(f"HTTPS keep-alive, {label:9}: {percentiles(samples)}  {rate:7.0f} reviews/s")
            samples = cold(injector.port, context, inject, args.cold)
            print(f"HTTPS new connection each : {percentiles(samples)}")
    samples = []
    for _ in range(args.reviews):
        started = time.perf_counter()
        decide(inject, config).response()
        samples.append(time.perf_counter() - started)
    print(f"decide() in process       : {percentiles(samples)}")


if __name__ == "__main__":
    end_on_sigterm()
    main()
