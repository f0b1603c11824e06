"""Unit tests: settings parsing, certificate decoding, retry backoff."""

import base64
import os
import socket
import subprocess
import sys

import pytest

import main
from main import ConfigError, decode_pem, retry_delay_ms
from tests.fixtures import settings_from

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_defaults():
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:9092, b:9092"})
    assert settings.bootstrap_servers == ["a:9092", "b:9092"]
    assert settings.topics == [main.DEFAULT_TOPIC]
    assert settings.group_id == f"{main.KERNEL_NAME}-group"
    assert settings.client_id == f"{main.KERNEL_NAME}-{socket.gethostname()}-{os.getpid()}"
    assert not settings.uses_tls
    assert (settings.auto_offset_reset, settings.max_poll_records, settings.check_crcs) == ("earliest", 2000, True)
    assert settings.concurrency == 1 and settings.ordering == "key" and settings.ssl_check_hostname


def test_values_are_read_and_normalised():
    settings = settings_from({
        "KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_TOPIC": "orders, payments,", "KAFKA_MAX_POLL_RECORDS": " 2_000 ",
        "KAFKA_SSL_CHECK_HOSTNAME": "FALSE", "KAFKA_AUTO_OFFSET_RESET": "Latest", "LOG_LEVEL": "debug",
        "KAFKA_CONSUMER_GROUP": "g", "KAFKA_CLIENT_ID": "c",
    })
    assert settings.topics == ["orders", "payments"]
    assert settings.max_poll_records == 2000
    assert settings.ssl_check_hostname is False
    assert (settings.auto_offset_reset, settings.log_level) == ("latest", "DEBUG")
    assert (settings.group_id, settings.client_id) == ("g", "c")


@pytest.mark.parametrize("env, message", [
    ({}, "KAFKA_BOOTSTRAP_SERVERS is required"),
    ({"KAFKA_BOOTSTRAP_SERVERS": " , "}, "KAFKA_BOOTSTRAP_SERVERS is required"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_TOPIC": ","}, "KAFKA_TOPIC is required"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_CLIENT_CERT": "x"}, "KAFKA_CLIENT_KEY not set"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1, b"}, "KAFKA_BOOTSTRAP_SERVERS must be host:port entries separated by commas, got 'b'"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:70000"}, "KAFKA_BOOTSTRAP_SERVERS must be host:port"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_DEAD_LETTER_TOPIC": "dead letters"}, "KERNEL_DEAD_LETTER_TOPIC holds"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
      "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "idp/token", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
      "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s"}, "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL must be an https://"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
      "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp/token", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "c",
      "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s", "KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster"},
     "KAFKA_SASL_OAUTHBEARER_EXTENSIONS must be name=value pairs"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_COMMIT_TIMEOUT_MS": "1.5"}, "KAFKA_COMMIT_TIMEOUT_MS must be a whole number"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_RETRY_INITIAL_MS": "5000", "KERNEL_RETRY_MAX_MS": "100"},
     "KERNEL_RETRY_INITIAL_MS (5000) must not exceed KERNEL_RETRY_MAX_MS (100)"),
])
def test_invalid_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from(env)


def test_the_security_protocol_follows_what_is_set_unless_given():
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"}).security == "PLAINTEXT"
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_CA_CERT": "x"}).security == "SSL"
    sasl = {"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SASL_MECHANISM": "scram-sha-512", "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": "hunter2"}
    settings = settings_from(sasl)
    assert settings.security == "SASL_SSL/SCRAM-SHA-512" and settings.uses_tls
    assert (settings.sasl.username, settings.sasl.password) == ("u", "hunter2")
    assert "hunter2" not in repr(settings), "a password in the settings' repr would reach a log line or a traceback"
    assert settings_from(sasl | {"KAFKA_SECURITY_PROTOCOL": "sasl_plaintext"}).security == "SASL_PLAINTEXT/SCRAM-SHA-512"


def test_an_oauth_client_is_read_with_its_scope_and_extensions():
    settings = settings_from({
        "KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://idp.example.com/oauth2/token",
        "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "kernel", "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "s3cret",
        "KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka", "KAFKA_SASL_OAUTHBEARER_EXTENSIONS": "logicalCluster=lkc-1, identityPoolId=pool-2",
    })
    oauth = settings.sasl.oauth
    assert (oauth.client_id, oauth.client_secret, oauth.scope) == ("kernel", "s3cret", "kafka")
    assert oauth.extensions == (("logicalCluster", "lkc-1"), ("identityPoolId", "pool-2"))
    assert "s3cret" not in repr(settings)


def test_certificate_values_are_kept_for_decoding_later():
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_CA_CERT": " x ",
                              "KAFKA_CLIENT_CERT": "y", "KAFKA_CLIENT_KEY": "z"})
    assert settings.uses_tls and (settings.ca_cert, settings.client_cert, settings.client_key) == ("x", "y", "z")


@pytest.mark.parametrize("encode", [
    lambda pem: base64.b64encode(pem).decode(),
    lambda pem: base64.encodebytes(pem).decode(),  # wrapped at 76 like `base64` on Linux
    lambda pem: base64.b64encode(pem).decode().rstrip("="),  # padding lost
    lambda pem: "\r\n".join(base64.b64encode(pem).decode()[i:i + 64] for i in range(0, 200, 64)) + "\n",
    lambda pem: pem.decode(),  # raw PEM
])
def test_decode_pem_tolerates_what_users_paste(encode):
    assert decode_pem("KAFKA_CA_CERT", encode(PEM), "CERTIFICATE").strip() == PEM.strip()


def test_decode_pem_accepts_every_private_key_flavour():
    for header in ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"):
        pem = f"-----BEGIN {header}-----\nMIIB\n-----END {header}-----\n".encode()
        assert decode_pem("KAFKA_CLIENT_KEY", base64.b64encode(pem).decode(), "PRIVATE KEY") == pem


@pytest.mark.parametrize("value, message", [
    ("not base64!", "KAFKA_CA_CERT is not valid base64"),
    (base64.b64encode(b"plain text").decode(), "KAFKA_CA_CERT does not decode to a PEM certificate"),
    (base64.b64encode(b"-----BEGIN PRIVATE KEY-----\n").decode(), "does not decode to a PEM certificate"),
])
def test_decode_pem_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        decode_pem("KAFKA_CA_CERT", value, "CERTIFICATE")


def test_retry_backoff_doubles_up_to_the_maximum_with_bounded_jitter():
    delays = [retry_delay_ms(attempt, 500, 30_000) for attempt in range(1, 12)]
    for attempt, delay in enumerate(delays, start=1):
        ideal = min(500 * 2 ** (attempt - 1), 30_000)
        assert 0.9 * ideal <= delay <= ideal
    assert retry_delay_ms(10_000, 500, 30_000) <= 30_000  # no overflow on very long retries


def test_the_heartbeat_follows_the_session_timeout_unless_set():
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"}).heartbeat_interval_ms == 3000
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SESSION_TIMEOUT_MS": "6000"}).heartbeat_interval_ms == 2000
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SESSION_TIMEOUT_MS": "6000",
                          "KAFKA_HEARTBEAT_INTERVAL_MS": "2500"}).heartbeat_interval_ms == 2500


CHAIN = PEM + PEM.replace(b"MIIB", b"MIIC")
BAG_ATTRIBUTES = (b"Bag Attributes\n    localKeyID: 01 02 03\n    friendlyName: kernel\n"
                  b"subject=/CN=kernel\nissuer=/CN=ca\n")


@pytest.mark.parametrize("value", [
    PEM.decode().replace("\n", "\\n"),  # a platform's variable editor, a single-quoted .env value
    PEM.decode().replace("\n", "\\r\\n"),
    (BAG_ATTRIBUTES + PEM).decode(),  # openssl pkcs12 -nokeys
    base64.b64encode(BAG_ATTRIBUTES + PEM).decode(),
    f'"{PEM.decode()}"'.replace("\n", "\\n").strip('"'),
])
def test_pem_is_accepted_as_people_paste_it(value):
    assert decode_pem("KAFKA_CA_CERT", value, "CERTIFICATE") == PEM


def test_a_chain_keeps_every_certificate_and_drops_what_is_between_them():
    pasted = (BAG_ATTRIBUTES + PEM + BAG_ATTRIBUTES + PEM.replace(b"MIIB", b"MIIC")).decode().replace("\n", "\\n")
    assert decode_pem("KAFKA_CLIENT_CERT", pasted, "CERTIFICATE") == CHAIN


def test_a_key_among_other_blocks_is_found_and_a_certificate_is_not_a_key():
    key = b"-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----\n"
    assert decode_pem("KAFKA_CLIENT_KEY", (BAG_ATTRIBUTES + key).decode(), "PRIVATE KEY") == key
    with pytest.raises(ConfigError, match="KAFKA_CLIENT_KEY holds a certificate, not a private key"):
        decode_pem("KAFKA_CLIENT_KEY", PEM.decode().replace("\n", "\\n"), "PRIVATE KEY")


def test_check_names_certificate_attributes_as_openssl_does(tmp_path):
    """`check` prints subject and issuer with OpenSSL's long attribute names, as it did when it read
    certificates with CPython's private test helper."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "NL"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
                      x509.NameAttribute(NameOID.STREET_ADDRESS, "Main St 1"), x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
                      x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com"), x509.NameAttribute(NameOID.COMMON_NAME, "kernel")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(datetime.datetime(3000, 1, 1, tzinfo=datetime.UTC)).sign(key, hashes.SHA256()))
    path = tmp_path / "client.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    level, text = main.describe_certificate("KAFKA_CLIENT_CERT", str(path))
    dn = ("countryName=NL, organizationName=Acme, streetAddress=Main St 1, serialNumber=42, "
          "emailAddress=ops@example.com, commonName=kernel")
    assert (level, text) == ("ok", f"KAFKA_CLIENT_CERT: subject {dn}; issuer {dn}; valid until Jan  1 00:00:00 3000 GMT")


def test_message_id_is_the_same_for_a_redelivery_and_differs_for_any_other_record():
    from tests.kit import make_message

    def record(**changes):
        fields = {"value": b'{"n": 1}', "key": "k", "topic": "t", "partition": 1, "offset": 7, "timestamp_ms": 1_000,
                  "headers": [("h", b"1")]} | changes
        return make_message(**fields)

    first = main.message_id(record())
    assert first == main.message_id(record()) and len(first) == 32 and int(first, 16) >= 0
    others = [record(value=b'{"n": 2}'), record(value=None), record(value=b""), record(key=None), record(key=""),
              record(topic="u"), record(partition=2), record(offset=8), record(timestamp_ms=1_001),
              record(headers=[]), record(headers=[("h", None)]), record(headers=[("h", b"")]),
              record(headers=[("h", b"1"), ("h", b"1")]), record(topic="tk", key="")]
    ids = [main.message_id(other) for other in others]
    assert first not in ids and len(set(ids)) == len(ids), "two different records with the same id"


# Settings past what the client and the protocol allow: a configuration error naming the variable.

INT32_MAX = 2**31 - 1
BOUNDED = ["KAFKA_MAX_POLL_RECORDS", "KERNEL_BUFFER_MAX_BYTES", "KAFKA_FETCH_MAX_BYTES",
           "KAFKA_MAX_PARTITION_FETCH_BYTES", "KAFKA_SESSION_TIMEOUT_MS", "KAFKA_MAX_POLL_INTERVAL_MS",
           "KAFKA_BOOTSTRAP_TIMEOUT_MS", "KAFKA_COMMIT_TIMEOUT_MS", "KAFKA_PRODUCE_TIMEOUT_MS",
           "KERNEL_RETRY_INITIAL_MS", "KERNEL_RETRY_MAX_MS", "KERNEL_MAX_ATTEMPTS", "KERNEL_BATCH_MAX_MESSAGES",
           "KERNEL_BATCH_MAX_WAIT_MS", "KERNEL_SHUTDOWN_TIMEOUT_MS"]


@pytest.mark.parametrize("name", BOUNDED)
def test_a_number_past_int32_names_its_variable(name):
    env = {"KAFKA_BOOTSTRAP_SERVERS": "a:1", name: "3000000000"}
    with pytest.raises(ConfigError, match=f"^{name} must be at most {INT32_MAX}, got 3000000000"):
        settings_from(env)
    if name != "KERNEL_RETRY_INITIAL_MS":  # which must not exceed KERNEL_RETRY_MAX_MS
        settings_from({**env, name: str(INT32_MAX)})  # the largest allowed is taken


def test_concurrency_is_capped():
    with pytest.raises(ConfigError, match="^KERNEL_CONCURRENCY must be at most 1000, got 5000"):
        settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_CONCURRENCY": "5000"})
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KERNEL_CONCURRENCY": "1000"}).concurrency == 1000


def test_the_consumers_request_timeout_follows_a_long_session_timeout():
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "KAFKA_SESSION_TIMEOUT_MS": "310000"})
    config = main.consumer_config(settings, None)
    assert config["request_timeout_ms"] > 310_000 and config["connections_max_idle_ms"] > config["request_timeout_ms"]
    consumer = main.KafkaConsumer(**config | {"bootstrap_servers": [], "api_version": (2, 8)})  # checks, connects nowhere
    consumer.close()
    assert main.consumer_config(settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"}), None)["request_timeout_ms"] == 305_000


def test_worker_threads_that_cannot_start_are_a_configuration_error():
    """Under a memory limit (here, of address space: each thread reserves a stack) 1,000 workers do not start."""
    script = ("import resource, main\n"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              "try:\n"
              "    main.WorkerPool(1000, 'w', print)\n"
              "except main.ConfigError as error:\n"
              "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=main.os.path.dirname(main.__file__))
    assert result.stdout.startswith("KERNEL_CONCURRENCY=1000: worker thread "), result.stdout + result.stderr
