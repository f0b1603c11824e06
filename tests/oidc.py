"""A small OpenID-style identity provider for OAUTHBEARER tests: a client-credentials token endpoint
that issues RS256 JWTs, and the JWKS endpoint the broker validates them against.

    POST /token   grant_type=client_credentials, client id and secret by HTTP Basic (RFC 6749 2.3.1)
    GET  /jwks    the public key, as Apache Kafka's OAuthBearerValidatorCallbackHandler fetches it
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.parse
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

AUDIENCE = "kafka"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def number(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class IdentityProvider:
    def __init__(self, clients: dict[str, str], lifetime_s: float = 3600):
        self.clients = clients  # client id -> secret
        self.lifetime_s = lifetime_s  # of the tokens it issues from now on
        self.expires_in_s: float | None = None  # what its answers say of that lifetime; None: the truth
        self.audience = AUDIENCE  # of the tokens it issues; another one makes the broker refuse them
        self.issued: list[float] = []  # time.monotonic() of each token issued
        self.refusals = 0
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = uuid.uuid4().hex[:8]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="oidc", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> IdentityProvider:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def jwks(self) -> dict:
        public = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "kid": self.key_id, "use": "sig", "alg": "RS256",
                          "n": number(public.n), "e": number(public.e)}]}

    def token(self, client_id: str, scope: str | None) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": self.key_id}
        claims = {"iss": self.url, "sub": client_id, "aud": self.audience, "iat": now,
                  "exp": now + int(self.lifetime_s), "jti": uuid.uuid4().hex} | ({"scope": scope} if scope else {})
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def handler(self):
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/jwks":
                    return self.answer(404, {"error": "not_found"})
                self.answer(200, provider.jwks())

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                client_id, secret = self.basic_credentials()
                if form.get("grant_type") != ["client_credentials"]:
                    return self.answer(400, {"error": "unsupported_grant_type"})
                if provider.clients.get(client_id) != secret:
                    provider.refusals += 1
                    return self.answer(401, {"error": "invalid_client"})
                provider.issued.append(time.monotonic())
                scope = form.get("scope", [None])[0]
                self.answer(200, {"access_token": provider.token(client_id, scope), "token_type": "Bearer",
                                  "expires_in": int(provider.expires_in_s or provider.lifetime_s)})

            def basic_credentials(self) -> tuple[str, str]:
                kind, _, encoded = self.headers.get("Authorization", "").partition(" ")
                if kind != "Basic":
                    return "", ""
                client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
                return urllib.parse.unquote(client_id), urllib.parse.unquote(secret)

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler


class Endpoint:
    """Another token endpoint, for the tests of one that misbehaves: a local HTTP server answering each
    POST with `answer(handler, body)`; it counts the requests and keeps their Authorization headers."""

    def __init__(self, answer):
        self.requests, self.authorizations = 0, []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                endpoint.requests += 1
                endpoint.authorizations.append(self.headers.get("Authorization"))
                answer(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="endpoint", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(handler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
