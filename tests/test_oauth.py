"""The OAuth token endpoint, without a broker: what KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL may be,
a token's lifetime, and the request to a local endpoint that redirects or trickles its answer."""

import base64
import json
import threading
import time

import pytest

import main
from tests.oidc import Endpoint, reply

SECRET = "s3cret-value"
GOOD = {"KAFKA_SASL_MECHANISM": "OAUTHBEARER", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "kernel",
        "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": SECRET}


@pytest.mark.parametrize("url, says", [
    ("https://kernel:s3cret-value@idp.example.com/token", "holds credentials (user:secret@host)"),
    ("https://s3cret-value@idp.example.com/token", "holds credentials"),
    ("http://idp.example.com/token", "over http:// the client secret would cross the network in clear"),
    ("http://10.0.0.7:8080/token", "in clear"),
])
def test_an_endpoint_url_with_credentials_or_over_http_is_refused_without_echoing_a_secret(url, says):
    with pytest.raises(main.ConfigError, match="KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL") as refused:
        main.oauth_client(GOOD | {"KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": url})
    assert says in str(refused.value) and SECRET not in str(refused.value)


@pytest.mark.parametrize("url", ["https://idp.example.com/token", "http://127.0.0.1:8080/token",
                                 "http://localhost/token", "http://[::1]:9000/oauth2/token"])
def test_https_and_loopback_http_endpoints_are_accepted(url):
    assert main.oauth_client(GOOD | {"KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": url}).token_endpoint_url == url


def jwt(claims: dict) -> str:
    part = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_jwts_expiry_is_read_and_anything_else_has_none():
    assert main.jwt_expiry_s(jwt({"exp": 1_800_000_000, "sub": "k"})) == 1_800_000_000
    for token in ("opaque-token", jwt({"sub": "no exp"}), jwt({"exp": "soon"}), "a.%%%.c", jwt([1, 2])):
        assert main.jwt_expiry_s(token) == float("inf"), token


def json_answer(body: dict):
    return lambda handler, _: reply(handler, 200, json.dumps(body).encode())


def tokens_from(url: str) -> main.OAuthBearerTokens:
    return main.OAuthBearerTokens(main.oauth_client(GOOD | {"KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": url}))


def test_a_token_lives_the_earlier_of_expires_in_and_its_jwts_exp():
    endpoint = Endpoint(json_answer({"access_token": jwt({"exp": int(time.time()) + 20}), "expires_in": 3600}))
    opaque = Endpoint(json_answer({"access_token": "opaque", "expires_in": 3600}))
    try:
        tokens, now = tokens_from(endpoint.url), time.monotonic()
        tokens.fetch(now)
        assert 15 <= tokens.expires_at_s - now <= 20 and tokens.refresh_at_s - now <= 16
        tokens = tokens_from(opaque.url)
        tokens.fetch(now)
        assert tokens.expires_at_s - now == pytest.approx(3600)
    finally:
        endpoint.close()
        opaque.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307])
def test_a_redirect_is_not_followed_and_takes_the_secret_nowhere(status):
    elsewhere = Endpoint(json_answer({"access_token": "stolen", "expires_in": 60}))

    endpoint = Endpoint(lambda handler, _: reply(handler, status, b"", {"Location": elsewhere.url}))
    try:
        with pytest.raises(main.BrokerUnavailable, match="redirected .*KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"):
            tokens_from(endpoint.url).token()
        assert endpoint.requests == 1 and elsewhere.requests == 0
    finally:
        endpoint.close()
        elsewhere.close()


def test_an_answer_trickled_a_byte_at_a_time_ends_at_the_deadline():
    stop = threading.Event()

    def trickle(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not stop.is_set():  # a header that never ends, a byte every 50 ms
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)

    endpoint = Endpoint(trickle)
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="no whole answer within 1 s"):
            main.post_within(endpoint.url, b"grant_type=client_credentials", {}, timeout_s=1.0)
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        endpoint.close()
