"""SASL against Apache Kafka (Tansu cannot authenticate a SASL user): each mechanism end to end over
SASL_SSL, with the cluster's CA, with the system's trust store, and with a client certificate too;
OAUTHBEARER tokens that expire while the kernel runs; refused credentials and denied access as one
line and their own exit code; and no secret in anything the kernel prints."""

import base64
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
import trustme
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

import main
from devtools.broker import free_port
from tests.fixtures import MAIN, OAUTH_CLIENTS, SASL_USERS, http_get, wait_committed, wait_until
from tests.oidc import Endpoint, reply

pytestmark = pytest.mark.brokers("kafka")

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


def sasl_env(cluster, identity_provider, mechanism: str, listener: str = "SASL_SSL", ca: bool = True) -> dict:
    """What a user sets for `mechanism` over SASL_SSL (the protocol left to its default)."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": cluster.broker.bootstrap_of(listener), "KAFKA_SASL_MECHANISM": mechanism,
           "KAFKA_CA_CERT": cluster.pki.env["KAFKA_CA_CERT"] if ca else ""}
    if mechanism == "OAUTHBEARER":
        [(client_id, secret)] = OAUTH_CLIENTS.items()
        env.update(KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL=f"{identity_provider.url}/token",
                   KAFKA_SASL_OAUTHBEARER_CLIENT_ID=client_id, KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET=secret,
                   KAFKA_SASL_OAUTHBEARER_SCOPE="kafka")
    else:
        [(user, password)] = (SASL_USERS.plain if mechanism == "PLAIN" else SASL_USERS.scram).items()
        env.update(KAFKA_SASL_USERNAME=user, KAFKA_SASL_PASSWORD=password)
    return env


def secrets() -> list[str]:
    return [*SASL_USERS.plain.values(), *SASL_USERS.scram.values(), *OAUTH_CLIENTS.values()]


def forward(cluster, kernels, env: dict, count: int = 20):
    """Run the transform example with `env` on a new topic until `count` events are forwarded and one
    malformed is dead-lettered; the kernel, still running."""
    source, output, dlt = (cluster.create_topic(partitions=2) for _ in range(3))
    group = f"sasl-{uuid.uuid4().hex[:6]}"
    events = [(i % 2, f"k{i}".encode(), json.dumps({"id": f"e-{i}", "type": "t", "n": i}).encode()) for i in range(count)]
    produced = cluster.produce(source, [*events, (0, b"bad", b"not json")])
    kernel = kernels.start(kernels.env(source, group, tls=False, TRANSFORM_OUTPUT_TOPIC=output,
                                       KERNEL_DEAD_LETTER_TOPIC=dlt, **env), module="examples.transform")
    wait_committed(cluster, kernel, group, source, produced, 2)
    assert sorted(json.loads(r.value())["n"] for r in cluster.read_topic(output, 2)) == list(range(count))
    assert [r.key() for r in cluster.read_topic(dlt, 2)] == [b"bad"]
    return kernel


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_each_mechanism_consumes_sends_and_dead_letters_over_sasl_ssl(cluster, kernels, identity_provider, mechanism):
    kernel = forward(cluster, kernels, sasl_env(cluster, identity_provider, mechanism))
    assert kernel.stop() == 0
    assert f"security=SASL_SSL/{mechanism}" in kernel.log()


def test_sasl_with_a_client_certificate_where_the_cluster_asks_for_both(cluster, kernels, identity_provider, pki):
    env = sasl_env(cluster, identity_provider, "SCRAM-SHA-512", listener="SASL_MTLS")
    without = kernels.start(kernels.env("unused", "both", tls=False, KAFKA_BOOTSTRAP_TIMEOUT_MS=3000, **env), script=MAIN)
    assert without.wait() == 3 and "TLS" in without.log()
    kernel = forward(cluster, kernels, env | {"KAFKA_CLIENT_CERT": pki.env["KAFKA_CLIENT_CERT"],
                                              "KAFKA_CLIENT_KEY": pki.env["KAFKA_CLIENT_KEY"]})
    assert kernel.stop() == 0


def test_without_a_ca_the_systems_trust_store_is_used(cluster, kernels, identity_provider, pki):
    """Hosted Kafka has certificates from public CAs: no KAFKA_CA_CERT, the system's CAs (here the test
    CA, put where OpenSSL's SSL_CERT_FILE points, as a system store would hold a public one)."""
    env = sasl_env(cluster, identity_provider, "SCRAM-SHA-256", ca=False)
    untrusted = kernels.start(kernels.env("unused", "system-ca", tls=False, **env), script=MAIN)
    assert untrusted.wait() == 3 and "failed verification of the broker's certificate" in untrusted.log()
    kernel = forward(cluster, kernels, env | {"SSL_CERT_FILE": str(pki.ca_file)})
    assert kernel.stop() == 0


def test_the_kernel_keeps_consuming_across_oauth_token_lifetimes(cluster, kernels, identity_provider):
    """Tokens live 8 s: the broker ends each session when its token expires (connections.max.reauth.ms),
    the kernel connects again with a fresh one, and consuming and sending go on across three lifetimes.
    The endpoint says they live an hour (expires_in): the JWT's exp tells the truth."""
    source, output = cluster.create_topic(partitions=2), cluster.create_topic(partitions=2)
    identity_provider.lifetime_s, identity_provider.expires_in_s = 8, 3600
    try:
        issued_before = len(identity_provider.issued)
        messages = [(i % 2, None, json.dumps({"id": f"e-{i}", "type": "t", "n": i}).encode()) for i in range(240)]
        background = cluster.produce_in_background(source, messages, seconds=24)
        env = sasl_env(cluster, identity_provider, "OAUTHBEARER")
        kernel = kernels.start(kernels.env(source, "oauth-expiry", tls=False, TRANSFORM_OUTPUT_TOPIC=output, **env),
                               module="examples.transform")
        produced = background.result()
        wait_committed(cluster, kernel, "oauth-expiry", source, produced, 2)
        tokens = len(identity_provider.issued) - issued_before
        assert kernel.stop() == 0
    finally:
        identity_provider.lifetime_s, identity_provider.expires_in_s = 3600, None
    assert sorted(json.loads(r.value())["n"] for r in cluster.read_topic(output, 2)) == list(range(240))
    assert tokens >= 3, f"{tokens} tokens fetched in 24 s of 8 s tokens"
    assert "Traceback" not in kernel.log()


REFUSALS = [  # (case, what differs from good settings, what the one line says)
    ("wrong password", {"KAFKA_SASL_PASSWORD": "not-the-password"}, "refused the SASL SCRAM-SHA-512 credentials"),
    ("unknown user", {"KAFKA_SASL_USERNAME": "nobody"}, "refused the SASL SCRAM-SHA-512 credentials"),
    ("another mechanism's user", {"KAFKA_SASL_MECHANISM": "PLAIN"}, "refused the SASL PLAIN credentials"),
    ("wrong client secret", {"KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "token endpoint refused the client (HTTP 401"),
    ("token for another audience", {"KAFKA_SASL_MECHANISM": "OAUTHBEARER"}, "refused the SASL OAUTHBEARER credentials"),
]


@pytest.mark.parametrize("case, change, says", REFUSALS, ids=[case for case, _, _ in REFUSALS])
def test_refused_credentials_are_one_line_exit_5_and_check_says_authentication(
        cluster, kernels, identity_provider, case, change, says):
    mechanism = change.get("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    env = sasl_env(cluster, identity_provider, mechanism) | change
    if mechanism == "PLAIN":
        env |= {"KAFKA_SASL_USERNAME": next(iter(SASL_USERS.scram)), "KAFKA_SASL_PASSWORD": next(iter(SASL_USERS.scram.values()))}
    if case == "wrong client secret":
        env["KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"] = "not-the-secret"
    if case == "token for another audience":
        identity_provider.audience = "another-cluster"
    try:
        kernel = kernels.start(kernels.env("unused", "refused", tls=False, **env), script=MAIN)
        assert kernel.wait() == main.EXIT_REFUSED
        checked = subprocess.run([sys.executable, str(MAIN), "check"], env=kernels.env("unused", "refused", tls=False, **env),
                                 capture_output=True, text=True, timeout=60)
    finally:
        identity_provider.audience = "kafka"
    errors = [line for line in kernel.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Access refused (authentication)" in errors[0] and says in errors[0], kernel.log()
    assert "Traceback" not in kernel.log()
    assert checked.returncode == 1 and re.search(rf"^error +authentication: .*{re.escape(says)}", checked.stdout, re.M)
    for secret in (env.get("KAFKA_SASL_PASSWORD"), env.get("KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET")):
        assert not secret or secret not in kernel.log() + checked.stdout + checked.stderr


def test_check_tells_authentication_network_and_tls_failures_apart(cluster, kernels, identity_provider):
    good = kernels.env("unused", "check-kinds", tls=False, KAFKA_BOOTSTRAP_TIMEOUT_MS=3000,
                       **sasl_env(cluster, identity_provider, "SCRAM-SHA-256"))
    cases = {
        "authentication": good | {"KAFKA_SASL_PASSWORD": "wrong"},
        "network": good | {"KAFKA_BOOTSTRAP_SERVERS": "no-such-host.invalid:9092"},
        "TLS": good | {"KAFKA_CA_CERT": base64.b64encode(trustme.CA().cert_pem.bytes()).decode()},
    }
    for kind, env in cases.items():
        checked = subprocess.run([sys.executable, str(MAIN), "check"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert checked.returncode == 1 and re.search(rf"^error +{kind}: ", checked.stdout, re.M), (kind, checked.stdout)
    assert "no-such-host.invalid of KAFKA_BOOTSTRAP_SERVERS does not resolve" in subprocess.run(
        [sys.executable, str(MAIN), "check"], env=cases["network"], capture_output=True, text=True, timeout=60).stdout
    ok = subprocess.run([sys.executable, str(MAIN), "check"], env=good, capture_output=True, text=True, timeout=60)
    assert "connected to" in ok.stdout and "over SASL_SSL/SCRAM-SHA-256" in ok.stdout


def test_denied_topic_is_one_line_and_exit_5(cluster, kernels, identity_provider):
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, b"x")])
    [(user, _)] = SASL_USERS.scram.items()
    acl = AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, f"User:{user}", "*", AclOperation.READ,
                     AclPermissionType.DENY)
    admin = AdminClient({"bootstrap.servers": cluster.broker.plaintext_bootstrap})
    admin.create_acls([acl])[acl].result(timeout=20)
    kernel = kernels.start(kernels.env(topic, "denied", tls=False, **sasl_env(cluster, identity_provider, "SCRAM-SHA-512")),
                           script=MAIN)
    assert kernel.wait(timeout_s=60) == main.EXIT_REFUSED
    errors = [line for line in kernel.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Access refused (authorization)" in errors[0] and topic in errors[0], kernel.log()
    assert "Traceback" not in kernel.log()


def test_no_secret_in_anything_the_kernel_prints_at_debug(cluster, kernels, identity_provider):
    """Passwords, client secrets and tokens: not in any log line at DEBUG, /metrics, or check's output."""
    for mechanism in ("SCRAM-SHA-512", "OAUTHBEARER", "PLAIN"):
        port = free_port()
        env = sasl_env(cluster, identity_provider, mechanism) | {"LOG_LEVEL": "DEBUG", "KERNEL_HTTP_PORT": str(port)}
        kernel = forward(cluster, kernels, env, count=5)
        metrics = http_get(port, "/metrics")[1]
        assert kernel.stop() == 0
        checked = subprocess.run([sys.executable, str(MAIN), "check"], env=kernel.env, capture_output=True, text=True,
                                 timeout=60)
        printed = kernel.log() + metrics + checked.stdout + checked.stderr
        tokens = re.findall(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", printed)  # a JWT's header starts {"
        leaked = [secret for secret in secrets() if secret in printed]
        assert not leaked and not tokens, f"{mechanism}: {leaked or tokens} printed"
        assert "DEBUG" in kernel.log() and checked.returncode == 0, checked.stdout


def refused_while_running(kernel, port: int, says: str) -> None:
    """Once the credentials are refused: /readyz answers 503 with the reason, then the kernel exits 5 (after
    KAFKA_SESSION_TIMEOUT_MS, 6 s here), its last word one line saying why."""
    wait_until(lambda: (answer := http_get(port, "/readyz"))[0] == 503 and "credentials refused" in answer[1]
               and says in answer[1], 30, lambda: f"/readyz saying {says}: {http_get(port, '/readyz')}\n{kernel.log()[-3000:]}")
    refused_s = time.monotonic()
    assert kernel.wait(timeout_s=40) == main.EXIT_REFUSED
    assert time.monotonic() - refused_s < 30
    refusals = [line for line in kernel.log().splitlines() if " ERROR [" in line and "Access refused" in line]
    assert len(refusals) == 1 and "Access refused (authentication)" in refusals[0] and says in refusals[0], kernel.log()
    assert "while running (KAFKA_SESSION_TIMEOUT_MS 6000)" in refusals[0] and "Traceback" not in kernel.log()


def test_an_oauth_client_revoked_while_running_is_not_ready_then_exits_5(cluster, kernels, identity_provider):
    """Tokens of 5 s: the kernel connects again for a new one, which the endpoint refuses (HTTP 401)."""
    topic, port = cluster.create_topic(partitions=1), free_port()
    [(client_id, _)] = OAUTH_CLIENTS.items()
    identity_provider.lifetime_s = 5
    try:
        kernel = kernels.start(kernels.env(topic, "revoked", tls=False, KERNEL_HTTP_PORT=port,
                                           **sasl_env(cluster, identity_provider, "OAUTHBEARER")), script=MAIN)
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, lambda: f"ready\n{kernel.log()[-3000:]}")
        identity_provider.clients = {client_id: "another-secret"}
        refused_while_running(kernel, port, "the OAuth token endpoint refused the client (HTTP 401")
    finally:
        identity_provider.lifetime_s, identity_provider.clients = 3600, OAUTH_CLIENTS


def test_a_scram_password_rotated_while_running_is_not_ready_then_exits_5(cluster, kernels, identity_provider, pki):
    """A user of its own, whose SCRAM-SHA-256 sessions on SASL_MTLS the broker ends every 5 s
    (tests/fixtures.py): once its password changes, the kernel's next authentication is refused."""
    topic, port, user = cluster.create_topic(partitions=1), free_port(), f"rotated-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": cluster.broker.plaintext_bootstrap})

    def set_password(password: str) -> None:
        upsert = UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
                                              password.encode())
        admin.alter_user_scram_credentials([upsert])[user].result(timeout=20)

    set_password("before")
    env = sasl_env(cluster, identity_provider, "SCRAM-SHA-256", listener="SASL_MTLS") | {
        "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": "before", "KERNEL_HTTP_PORT": port,
        "KAFKA_CLIENT_CERT": pki.env["KAFKA_CLIENT_CERT"], "KAFKA_CLIENT_KEY": pki.env["KAFKA_CLIENT_KEY"]}
    kernel = kernels.start(kernels.env(topic, "rotated", tls=False, **env), script=MAIN)
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, 30, lambda: f"ready\n{kernel.log()[-3000:]}")
    set_password("after")
    refused_while_running(kernel, port, "refused the SASL SCRAM-SHA-256 credentials")


def test_a_token_endpoint_garbled_at_start_up_is_asked_again_and_one_trickling_leaves_sigterm_answered(
        cluster, kernels, identity_provider):
    """In front of the identity provider: an endpoint whose first answer is a gateway's HTML page, then
    the provider's own answers; the kernel starts. Then one that trickles its answer a byte at a time: a
    SIGTERM while the kernel waits for it is answered at once."""
    trickling, stop = [False], threading.Event()

    def answer(handler, body: bytes) -> None:
        if endpoint.requests == 1:
            return reply(handler, 200, b"<html>502 Bad Gateway</html>")
        if trickling[0]:
            with contextlib.suppress(OSError):  # until the kernel hangs up
                handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.2):
                    handler.wfile.write(b"x")
            return
        request = urllib.request.Request(f"{identity_provider.url}/token", body,
                                         {"Authorization": handler.headers["Authorization"]})
        with urllib.request.urlopen(request, timeout=10) as response:
            reply(handler, response.status, response.read())

    endpoint = Endpoint(answer)
    try:
        env = sasl_env(cluster, identity_provider, "OAUTHBEARER") | {
            "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": endpoint.url}
        kernel = kernels.start(kernels.env(cluster.create_topic(partitions=1), "garbled", tls=False, **env), script=MAIN)
        kernel.wait_for_log("Partitions assigned", 30)
        assert endpoint.requests >= 2 and kernel.stop() == 0
        trickling[0], asked = True, endpoint.requests
        kernel = kernels.start(kernel.env, script=MAIN)
        wait_until(lambda: endpoint.requests > asked, 15, "the kernel asking the trickling endpoint")
        time.sleep(0.5)
        started = time.monotonic()
        assert kernel.stop() == 0 and time.monotonic() - started < 3
    finally:
        stop.set()
        endpoint.close()
