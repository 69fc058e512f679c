"""Tests for secral.py, in the same sections as the module.

Three kinds of test live here:
  * unit tests of the pure functions, and every file in spec/vectors/;
  * cores linked without sockets (Wire): deterministic, fast, clock injected;
  * real nodes on 127.0.0.1 with port 0: NodeShell in this process, or
    `python3 secral.py node` subprocesses driven through the CLI.

RSA-3072 keys take about a second each to generate, so tests draw them from
a pool cached in .secral-test-keys/ (generated on first use, never committed).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import types

import pytest

import secral
from secral import (Address, Config, Dial, Event, Identity, LocalError, Node, RemoteError,
                    Send, Close, Stores)

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "spec", "vectors")
KEY_DIR = os.path.join(HERE, ".secral-test-keys")
NOW = 1_800_000_000             # a fixed "now" for deterministic tests (2027-01-15)


# =============================================================================
# Helpers: test keys
# =============================================================================

_pool_lock = threading.RLock()
_pool: dict[int, Identity] = {}


def generate_identity() -> Identity:
    """A fresh key: OpenSSL (through `cryptography`) makes one about four times
    faster than pycryptodome, which matters when CI builds the whole pool."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        return Identity.generate()
    private = rsa.generate_private_key(public_exponent=secral.RSA_EXPONENT, key_size=secral.RSA_BITS)
    return Identity.from_pem(private.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))


def key(i: int) -> Identity:
    """Test identity number i, from the on-disk pool (generated once)."""
    with _pool_lock:
        if i not in _pool:
            os.makedirs(KEY_DIR, exist_ok=True)
            path = os.path.join(KEY_DIR, f"test-{i:03d}.pem")
            if not os.path.exists(path):
                secral.save_identity(generate_identity(), path)
            _pool[i] = secral.load_identity(path, create=False)
        return _pool[i]


MAIL_KEY_DIR = os.path.join(KEY_DIR, "mail")  # mail keys, shared by every test node
MAIL_KEY_POOL = 10                              # > MAX_MAIL_KEYS: a record's keys are distinct


def mail_key_files() -> str:
    """The pool of test mail keys, as node --test-key-pool reads it."""
    with _pool_lock:
        os.makedirs(MAIL_KEY_DIR, exist_ok=True)
        for i in range(MAIL_KEY_POOL):
            path = os.path.join(MAIL_KEY_DIR, f"mail-{i:03d}.pem")
            if not os.path.exists(path):
                secral.save_identity(generate_identity(), path)
    return MAIL_KEY_DIR


def pool_mail_key(epoch: int) -> Identity:
    """The test mail key of an epoch: pool key epoch mod 10, for every node."""
    with _pool_lock:
        if ("mail", epoch % MAIL_KEY_POOL) not in _pool:
            path = os.path.join(mail_key_files(), f"mail-{epoch % MAIL_KEY_POOL:03d}.pem")
            _pool["mail", epoch % MAIL_KEY_POOL] = secral.load_identity(path, create=False)
        return _pool["mail", epoch % MAIL_KEY_POOL]


def pool_ring(now: float = NOW) -> secral.MailKeys:
    """A node's mail keys from the pool: two epochs before now's to seven after."""
    ring = secral.MailKeys()
    for epoch in range(secral.epoch_of(now) - 2, secral.epoch_of(now) + 8):
        ring.add(epoch, pool_mail_key(epoch))
    return ring


def make_record(identity: Identity, host: str | None, port: int, seq: int, expires: int,
                now: float | None = None) -> dict:
    """secral.make_record with the pool's mail keys for every epoch from now's
    (by default: an hour before the expiry) to the expiry's (5.3)."""
    now = expires - 3600 if now is None else now
    epochs = range(secral.epoch_of(min(now, expires - 1)), secral.epoch_of(expires - 1) + 1)
    return secral.make_record(identity, host, port, seq, expires,
                              [{"epoch": e, "key": pool_mail_key(e).public_b64} for e in epochs])


def seal_mail(identity: Identity, sender: Address, recipient: Address, recipient_key: str, *args, **kw) -> dict:
    """secral.seal_mail to a recipient named by its node key: to its record
    (make_record above) at the mail's `now`, so to the pool's mail key."""
    now = args[2] if len(args) > 2 else kw["now"]
    return secral.seal_mail(identity, sender, recipient, make_record(
        secral_identity(recipient_key), None, 0, 1, now + 3600, now), *args, **kw)


def secral_identity(public_b64: str) -> Identity:
    """The pool identity whose public key this is (records are signed by it)."""
    with _pool_lock:
        found = [i for i in _pool.values() if i.public_b64 == public_b64]
    if not found:
        raise LookupError("not a pool key")
    return found[0]


def open_mail(identity: Identity, mail: dict, now: float = NOW) -> dict:
    """secral.open_mail with the pool's mail keys around `now`."""
    return secral.open_mail(identity, pool_ring(now), mail)


def seed_key(data_dir: str, i: int) -> Identity:
    """Give a node directory test key i, so the node skips key generation."""
    identity = key(i)
    secral.save_identity(identity, os.path.join(data_dir, "node.key"))
    return identity


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Counter:
    """A deterministic rng for cores: reproducible nonces, ids and salts."""

    def __init__(self, seed: int = 0):
        self.random = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self.random.randbytes(n)


# =============================================================================
# Helpers: cores linked without sockets
# =============================================================================

class Wire:
    """Several Node cores in one process, joined by in-memory connections.

    Frames go through encode_frame/decode_frame exactly as on a socket; time
    is `self.now`, moved only by advance().  Dial actions connect to the core
    whose config advertises that host:port.
    """

    def __init__(self, now: float = NOW):
        self.now = now
        self.nodes: dict[str, Node] = {}
        self.links: dict[tuple[str, int], tuple[str, int]] = {}   # (node, conn) -> other end
        self.queue: collections.deque = collections.deque()
        self.events: list[tuple[str, Event]] = []
        self.sent: list[tuple[str, int, dict]] = []
        self.closed: list[tuple[str, int, str]] = []
        self.dials: list[tuple[str, Dial]] = []
        self.next_conn = 1
        self.down: set[str] = set()
        self.listening: dict[tuple[str, int], str] = {}   # addresses that accept, advertised or not

    def add(self, name: str, identity: Identity, port: int | None = None,
            listen: tuple[str, int] | None = None, **config) -> Node:
        config.setdefault("host", "10.0.0.%d" % (len(self.nodes) + 1) if port else None)
        config.setdefault("port", port or 0)
        node = Node(identity, Stores.memory(), Config(**config), self.now,
                    Counter(len(self.nodes) + 1), pool_ring(self.now))
        node.name = name
        self.nodes[name] = node
        if listen or port:
            self.listening[listen or (config["host"], config["port"])] = name
        return node

    def name_of(self, domain: str) -> str:
        return next(n for n, node in self.nodes.items() if node.domain == domain)

    @classmethod
    def chain(cls, length: int) -> tuple["Wire", list[Node]]:
        """Cores n0 - n1 - ... linked in a line (no addresses: nothing else links)."""
        wire = cls()
        nodes = [wire.add(f"n{i}", key(i)) for i in range(length)]
        for x, y in zip(nodes, nodes[1:]):
            wire.connect(x.name, y.name)
        return wire, nodes

    def connect(self, a: str, b: str, dial: Dial | None = None) -> tuple[int, int]:
        """Open a connection from a to b and run the handshake to completion."""
        ca, cb = self.next_conn, self.next_conn + 1
        self.next_conn += 2
        self.links[(a, ca)] = (b, cb)
        self.links[(b, cb)] = (a, ca)
        target = self.nodes[b]
        dial = dial or Dial(target.config.host or "10.9.9.9", target.config.port or 1, None)
        self.run(b, target.connection_made(cb, f"ip-{a}", self.now))
        self.run(a, self.nodes[a].connection_made(ca, f"ip-{b}", self.now, dialled=dial,
                                                  certificate=target.identity.certificate))
        self.pump()
        return ca, cb

    def run(self, name: str, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                line = secral.encode_frame(action.frame)
                self.sent.append((name, action.conn, action.frame))
                other = self.links.get((name, action.conn))
                if other is not None:
                    self.queue.append((other, line))
            elif isinstance(action, Close):
                self.closed.append((name, action.conn, action.reason))
                other = self.links.pop((name, action.conn), None)
                if other is not None:
                    self.links.pop(other, None)
                    self.queue.append((other, None))
            elif isinstance(action, Dial):
                self.dials.append((name, action))
                target = self.listening.get((action.host, action.port))
                if target in self.down:
                    target = None
                if target is None:
                    self.run(name, self.nodes[name].dial_failed(action, self.now))
                else:
                    self.connect(name, target, action)
            elif isinstance(action, Event):
                self.events.append((name, action))

    def pump(self, limit: int = 100_000) -> None:
        """Deliver queued lines until the network is quiet."""
        for _ in range(limit):
            if not self.queue:
                return
            (name, conn), line = self.queue.popleft()
            node = self.nodes[name]
            if line is None:
                self.run(name, node.connection_lost(conn, self.now))
            else:
                self.run(name, node.line_received(conn, line, self.now))
        raise AssertionError("the network did not go quiet")

    def transmit(self, name: str, conn: int, *frames: dict) -> None:
        """Frames sent by node `name` on its connection `conn`, as its core made them."""
        for frame in frames:
            self.run(name, self.nodes[name].transmit(conn, frame))
        self.pump()

    def inject(self, name: str, conn: int, line: bytes) -> list:
        """Feed raw bytes to a node as if its peer on `conn` had sent them."""
        actions = self.nodes[name].line_received(conn, line, self.now)
        self.run(name, actions)
        self.pump()
        return actions

    def disconnect(self, a: str, b: str) -> None:
        for (name, conn), (other, oconn) in list(self.links.items()):
            if name == a and other == b:
                self.links.pop((name, conn), None)
                self.links.pop((other, oconn), None)
                self.run(a, self.nodes[a].connection_lost(conn, self.now))
                self.run(b, self.nodes[b].connection_lost(oconn, self.now))
        self.pump()

    def stop(self, name: str) -> None:
        """Take a node offline: all its links drop."""
        for (n, conn), (other, _) in list(self.links.items()):
            if n == name:
                self.disconnect(name, other)
        self.down.add(name)

    def advance(self, seconds: float, step: float = 1.0) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for name, node in self.nodes.items():
                if name not in self.down:
                    self.run(name, node.tick(self.now))
            self.pump()

    def submit(self, name: str, to: str, subject: str = "hello", body: str = "text",
               user: str = "Default", ttl: int = secral.MAX_TTL) -> str:
        mail_id, actions = self.nodes[name].submit(user, to, subject, body, self.now, ttl=ttl)
        self.run(name, actions)
        self.pump()
        return mail_id

    def status(self, name: str, mail_id: str) -> str:
        return self.nodes[name].stores.outbox[mail_id]["status"]

    def inbox(self, name: str) -> list[dict]:
        return list(self.nodes[name].stores.inbox.values())

    def conn_between(self, a: str, b: str) -> int:
        return next(conn for (n, conn), (other, _) in self.links.items() if n == a and other == b)

    def frames(self, name: str | None = None, type: str | None = None) -> list[dict]:
        return [f for n, _, f in self.sent if (name is None or n == name)
                and (type is None or f["type"] == type)]


def addr(node: Node, user: str = "Default") -> str:
    return f"{user}@{node.domain}"


# =============================================================================
# Encoding
# =============================================================================

def test_canonical_json_sorts_keys_and_drops_whitespace():
    assert secral.canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()


def test_canonical_json_refuses_lone_surrogates():
    with pytest.raises(RemoteError) as err:
        secral.canonical_json({"a": "\ud800"})
    assert err.value.code == "malformed"


@pytest.mark.parametrize("line, code", [
    (b'{"type":"ping","n":1.5}', "malformed"),
    (b'{"type":"ping","n":1e3}', "malformed"),
    (b'{"type":"ping","n":9007199254740992}', "malformed"),
    (b'{"type":"ping","type":"pong"}', "malformed"),
    (b'{"type":"ping","\xc3\xa9":1}', "malformed"),
    (b'{"type":"ping","n":NaN}', "not_json"),
    (b'\xff\xfe', "not_json"),
    (b'{"type":"ping"', "not_json"),
    (b'[1,2]', "malformed"),
    (b'{"type":7}', "malformed"),
    (b'[' * 50_000, "not_json"),                        # the grammar first (3.2) ...
    (b'[' * 50_000 + b']' * 50_000, "malformed"),       # ... then the depth
    (b'{"type":"ping","n":1.5', "not_json"),            # a Secral rule in a line that never closes
    (b'{"type":"ping","s":"\\ud800"}', "malformed"),     # an unpaired surrogate escape
    (b"[" * 3000 + b"1 2" + b"]" * 3000, "not_json"),   # too deep to parse, and not JSON deep inside
    (b"[" * 3000 + b'{"a" 1}' + b"]" * 3000, "not_json"),
])
def test_decode_frame_rejects(line, code):
    with pytest.raises(RemoteError) as err:
        secral.decode_frame(line + b"\n")
    assert err.value.code == code


def test_decode_frame_line_limit_is_inclusive():
    pad = secral.MAX_LINE - len(b'{"type":"ping","pad":""}\n')
    line = b'{"type":"ping","pad":"' + b"a" * pad + b'"}\n'
    assert len(line) == secral.MAX_LINE
    assert secral.decode_frame(line)["type"] == "ping"
    with pytest.raises(RemoteError) as err:
        secral.decode_frame(line[:-2] + b'a"}\n')
    assert err.value.code == "too_large"


@pytest.mark.parametrize("text, ok", [("QQ==", True), ("QR==", False), ("QQ", False),
                                      ("Q Q==", False), ("", True), (5, False), ("QQ==\n", False)])
def test_b64d_is_strict_and_canonical(text, ok):
    if ok:
        assert secral.b64e(secral.b64d(text, "x")) == text
    else:
        with pytest.raises(RemoteError):
            secral.b64d(text, "x")


def test_check_fields_reports_missing_and_wrong_types():
    table = {"n": secral.check_int, "s": secral.check_str}
    assert secral.check_fields({"n": 1, "s": "x", "extra": []}, table, "t")["extra"] == []
    for bad in ({"s": "x"}, {"n": True, "s": "x"}, {"n": 1, "s": 2}, []):
        with pytest.raises(RemoteError) as err:
            secral.check_fields(bad, table, "t")
        assert err.value.code == "malformed"


# =============================================================================
# Cryptography
# =============================================================================

def test_identity_pem_round_trip_and_file_mode(tmp_path):
    path = str(tmp_path / "d" / "node.key")
    secral.save_identity(key(0), path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert secral.load_identity(path, create=False).domain == key(0).domain
    assert read_bytes(path).startswith(b"-----BEGIN PRIVATE KEY-----")


def test_load_identity_creates_key_once(tmp_path):
    path = str(tmp_path / "node.key")
    first = secral.load_identity(path)
    assert secral.load_identity(path).domain == first.domain
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_parse_public_key_accepts_only_canonical_rsa3072_e65537():
    from Crypto.PublicKey import RSA
    assert secral.parse_public_key(key(0).public_b64).n == key(0).key.n
    small = RSA.generate(2048).public_key().export_key("DER")
    from Crypto.Util.asn1 import DerSequence
    pkcs1 = DerSequence([key(0).key.n, key(0).key.e]).encode()   # RSAPublicKey, not SPKI
    for der in (small, pkcs1, b"\x30\x00", key(0).key.export_key("DER")):
        with pytest.raises(RemoteError) as err:
            secral.parse_public_key(secral.b64e(der))
        assert err.value.code in ("bad_key", "malformed")


def test_signatures_detect_any_change():
    signed = key(0).sign({"kind": "test", "n": 1})
    secral.verify_signed(signed, key(0).key, "t")
    for tampered in ({**signed, "n": 2}, {**signed, "extra": 0}):
        with pytest.raises(RemoteError) as err:
            secral.verify_signed(tampered, key(0).key, "t")
        assert err.value.code == "bad_signature"
    with pytest.raises(RemoteError):
        secral.verify_signed(signed, key(1).key, "t")


def raw_pss(identity: Identity, digest: bytes, salt: bytes = b"s" * 32, trailer: int = 0xBC,
            top_bit: bool = False, one: int = 0x01, zeros: bytes | None = None) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1) written out, each step a parameter,
    and signed with the bare private operation: a valid signature, or one
    with exactly one flaw."""
    em_len, h_len = 384, 32
    h = hashlib.sha256(bytes(8) + digest + salt).digest()
    db_len = em_len - h_len - 1
    ps = bytes(db_len - len(salt) - 1) if zeros is None else zeros
    db = ps + bytes([one]) + salt
    mask = b"".join(hashlib.sha256(h + c.to_bytes(4, "big")).digest() for c in range(12))[:db_len]
    masked = bytearray(x ^ y for x, y in zip(db, mask))
    masked[0] = masked[0] | 0x80 if top_bit else masked[0] & 0x7F
    em = int.from_bytes(bytes(masked) + h + bytes([trailer]), "big")
    private = identity.key
    return pow(em, int(private.d), int(private.n)).to_bytes(384, "big")


def test_pss_verification_is_rfc_8017_and_refuses_each_flaw():
    """verify_pss is written out (4.2): OpenSSL's signatures verify, and a
    signature with any one flaw of encoding does not, exactly as OpenSSL
    and pycryptodome decide."""
    pytest.importorskip("cryptography")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from Crypto.Hash import SHA256
    from Crypto.Signature import pss
    signer, public = key(0), key(0).key.public_key()
    openssl = serialization.load_pem_private_key(signer.to_pem(), None)

    def openssl_accepts(message: bytes, signature: bytes) -> bool:
        try:
            openssl.public_key().verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                        hashes.SHA256())
            return True
        except (InvalidSignature, ValueError):
            return False

    def pycryptodome_accepts(message: bytes, signature: bytes) -> bool:
        try:
            pss.new(public, salt_bytes=32).verify(SHA256.new(message), signature)
            return True
        except (ValueError, TypeError):
            return False
    message = b"a message"
    digest = hashlib.sha256(message).digest()
    good = openssl.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    cases = {"OpenSSL, salt 32": (good, True), "written out": (raw_pss(signer, digest), True)}
    for n in (0, 1, 200, 383):                  # one bit changed anywhere
        cases[f"bit flipped in byte {n}"] = (good[:n] + bytes([good[n] ^ 0x10]) + good[n + 1:], False)
    for salt in (20, 0):
        cases[f"OpenSSL, salt {salt}"] = (openssl.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), salt),
                                                       hashes.SHA256()), False)
    cases["PKCS#1 v1.5"] = (openssl.sign(message, padding.PKCS1v15(), hashes.SHA256()), False)
    cases["trailer not 0xbc"] = (raw_pss(signer, digest, trailer=0xBD), False)
    cases["leftmost bit set"] = (raw_pss(signer, digest, top_bit=True), False)
    cases["separator not 0x01"] = (raw_pss(signer, digest, one=0x02), False)
    cases["padding not zero"] = (raw_pss(signer, digest, zeros=b"\x01" + bytes(317)), False)
    cases["other message"] = (raw_pss(signer, hashlib.sha256(b"another").digest()), False)
    cases["s = n"] = (public.n.to_bytes(384, "big"), False)
    cases["383 bytes"] = (good[1:], False)
    cases["385 bytes"] = (b"\0" + good, False)
    secral.RSA_MEMO.clear()
    for name, (signature, valid) in cases.items():
        assert secral.verify_pss(public, digest, signature) is valid, name
        assert openssl_accepts(message, signature) is valid, name      # the case is what it says
        assert pycryptodome_accepts(message, signature) is valid, name
    assert secral.verify_signature(public, message, good)


def test_gcm_refuses_wrong_aad_or_tag():
    sealed = secral.seal_gcm(b"k" * 32, b"n" * 12, b"secret", b"aad")
    assert secral.open_gcm(b"k" * 32, b"n" * 12, sealed, b"aad") == b"secret"
    for args in ((sealed, b"other"), (sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad"), (b"short", b"aad")):
        with pytest.raises(RemoteError) as err:
            secral.open_gcm(b"k" * 32, b"n" * 12, *args)
        assert err.value.code == "decrypt_failed"


# =============================================================================
# Names and NIS records
# =============================================================================

def test_domain_is_24_base32_letters_of_the_key_hash():
    import hashlib
    digest = hashlib.sha256(key(0).public_der).digest()[:15]
    expected = "node-" + base64.b32encode(digest).decode().lower()
    assert key(0).domain == expected and len(expected) == 29


@pytest.mark.parametrize("text", ["Default@node-aaaaaaaaaaaaaaaaaaaaaaaa", "a.b-c_9@node-234567234567234567234567",
                                  "X" * 64 + "@node-aaaaaaaaaaaaaaaaaaaaaaaa"])
def test_parse_address_valid(text):
    address = secral.parse_address(text)
    assert str(address) == text


@pytest.mark.parametrize("text", ["Default@node-AAAAAAAAAAAAAAAAAAAAAAAA", "@node-aaaaaaaaaaaaaaaaaaaaaaaa",
                                  ".x@node-aaaaaaaaaaaaaaaaaaaaaaaa", "x@node-aaaaaaaaaaaaaaaaaaaaaaa1",
                                  "X" * 65 + "@node-aaaaaaaaaaaaaaaaaaaaaaaa", "a@b@node-aaaaaaaaaaaaaaaaaaaaaaaa",
                                  "a b@node-aaaaaaaaaaaaaaaaaaaaaaaa", "plain", None])
def test_parse_address_invalid(text):
    with pytest.raises(RemoteError) as err:
        secral.parse_address(text)
    assert err.value.code == ("malformed" if text is None else "bad_address")   # type first (3.4)


def test_users_compare_case_insensitively():
    a = secral.parse_address("Alice@node-aaaaaaaaaaaaaaaaaaaaaaaa")
    assert a.key == secral.parse_address("aLICE@node-aaaaaaaaaaaaaaaaaaaaaaaa").key
    assert secral.parse_address("core@node-aaaaaaaaaaaaaaaaaaaaaaaa").is_core


def test_record_checks():
    record = make_record(key(0), "127.0.0.1", 7700, 5, NOW + 100)
    assert secral.verify_record(record, NOW) is record
    cases = [
        (NOW + 100, {"host": "10.0.0.1"}, "bad_signature"),
        (NOW + 100, {"domain": key(1).domain}, "bad_domain"),
        (NOW + 200, {}, "expired"),
        (NOW + 100, {"port": 0}, "malformed"),
        (NOW + 100, {"kind": "mail"}, "malformed"),
        (NOW + 100, {"key": key(1).public_b64}, "bad_domain"),
    ]
    for when, change, code in cases:
        with pytest.raises(RemoteError) as err:
            secral.verify_record({**record, **change}, when if code == "expired" else NOW)
        assert err.value.code == code, change
    far = make_record(key(0), None, 0, 1, NOW + secral.MAX_RECORD_LIFETIME + 1, now=NOW)
    with pytest.raises(RemoteError) as err:
        secral.verify_record(far, NOW)
    assert err.value.code == "future"           # a clock matter: dropped, not blamed (9.1)
    assert secral.REPUTATION_EVENTS["future"][0] == 0
    secral.verify_record(far, NOW + 1)


def test_record_supersedes_only_with_higher_seq():
    old = make_record(key(0), None, 0, 5, NOW + 100)
    assert secral.record_supersedes({**old, "seq": 6}, old)
    assert not secral.record_supersedes({**old, "seq": 5}, old)
    assert not secral.record_supersedes({**old, "seq": 4}, old)
    assert secral.record_supersedes(old, None)


# =============================================================================
# Protocol objects
# =============================================================================

def sealed(sender: int = 0, recipient: int = 1, now: int = NOW, **kw) -> dict:
    args = dict(subject="Subject", body="Body", ttl=3600)
    args.update(kw)
    return seal_mail(key(sender), Address("Default", key(sender).domain),
                            Address("Default", key(recipient).domain), key(recipient).public_b64,
                            args["subject"], args["body"], now, args["ttl"])


def test_seal_verify_open_round_trip():
    mail = sealed(body="héllo ✉\n" * 10)
    assert secral.verify_mail(mail, NOW) is mail
    plain = open_mail(key(1), mail)
    assert (mail["from"], mail["to"]) == (key(0).domain, key(1).domain)     # domains only (6.1)
    assert plain == {"from": f"Default@{key(0).domain}", "to": f"Default@{key(1).domain}",
                     "subject": "Subject", "body": "héllo ✉\n" * 10, "parts": [], "in_reply_to": None}


def test_sealed_sizes_come_in_buckets_and_parts_travel_whole():
    sizes = {len(secral.b64d(sealed(body="x" * n)["ct"], "ct")) - secral.GCM_TAG for n in (0, 10, 500)}
    assert sizes == {1024}
    assert len(secral.b64d(sealed(body="x" * 1500)["ct"], "ct")) - secral.GCM_TAG == 2048
    png = bytes(range(256)) * 4
    mail = seal_mail(key(0), Address("Default", key(0).domain), Address("Default", key(1).domain),
                            key(1).public_b64, "s", "b", NOW, 3600,
                            parts=[{"type": "image/png", "name": "dot.png", "data": secral.b64e(png)}],
                            in_reply_to="ab" * 16)
    plain = open_mail(key(1), secral.verify_mail(mail, NOW))
    assert secral.b64d(plain["parts"][0]["data"], "data") == png and plain["in_reply_to"] == "ab" * 16
    for bad in ({"type": "Image/PNG", "data": ""}, {"type": "image/png", "name": "../x", "data": ""},
                {"type": "image/png", "data": "!!"}):
        with pytest.raises(RemoteError):
            secral.make_plaintext(Address("a", key(0).domain), Address("b", key(1).domain), "s", "b", [bad])


def test_relays_see_no_plaintext():
    mail = sealed(subject="attack at dawn", body="the password is swordfish")
    wire = secral.encode_frame({"type": "mail", "hops": 8, "mail": mail})
    assert b"dawn" not in wire and b"swordfish" not in wire


@pytest.mark.parametrize("change, code", [
    ({"ct": None}, "malformed"),
    ({"id": "ABC"}, "malformed"),
    ({"kind": "ack"}, "malformed"),
    ({"from": "node-aaaaaaaaaaaaaaaaaaaaaaaa"}, "bad_domain"),
    ({"from": "Default@node-aaaaaaaaaaaaaaaaaaaaaaaa"}, "bad_domain"),     # a domain, never a user
    ({"to": 7}, "malformed"),                                               # wrong type: always malformed
    ({"from_key": None}, "bad_domain"),
    ({"created": NOW + secral.CLOCK_TOLERANCE + 1, "expires": NOW + 9000}, "future"),
    ({"expires": NOW + secral.MAX_TTL + 1}, "bad_ttl"),
    ({"expires": NOW}, "bad_ttl"),
    ({"nonce": "AAAA"}, "malformed"),
    ({"to": "node-aaaaaaaaaaaaaaaaaaaaaaaa"}, "bad_signature"),
])
def test_verify_mail_rejects(change, code):
    mail = sealed()
    if change.get("from_key", 1) is None:
        change = {"from_key": key(2).public_b64}
    mail = {**mail, **change}
    if change.get("ct", 1) is None:
        del mail["ct"]
    with pytest.raises(RemoteError) as err:
        secral.verify_mail(mail, NOW)
    assert err.value.code == code


def test_verify_mail_expiry_uses_the_local_clock():
    mail = sealed(ttl=60)
    secral.verify_mail(mail, NOW + 59)
    with pytest.raises(RemoteError) as err:
        secral.verify_mail(mail, NOW + 60)
    assert err.value.code == "expired"
    secral.verify_mail(sealed(now=NOW + secral.CLOCK_TOLERANCE), NOW)   # two clocks 10 min off each


def test_open_mail_refuses_other_recipients_and_mismatched_content():
    with pytest.raises(RemoteError) as err:
        open_mail(key(2), sealed())
    assert err.value.code == "wrong_recipient"
    # The sender encrypts to a key that is not the recipient's: signed, unreadable.
    mail = seal_mail(key(0), Address("Default", key(0).domain), Address("Default", key(2).domain),
                            key(2).public_b64, "s", "b", NOW)
    forged = key(0).sign({**mail, "to": key(1).domain})
    with pytest.raises(RemoteError) as err:
        open_mail(key(1), forged)
    assert err.value.code == "decrypt_failed"


def test_limits_have_their_own_codes():
    with pytest.raises(RemoteError) as err:
        sealed(subject="s" * 257)
    assert err.value.code == "too_large"
    with pytest.raises(RemoteError) as err:
        sealed(body="b" * (secral.MAX_BODY + 1))
    assert err.value.code == "too_large"
    mail = sealed(subject="s" * 256, body="é" * (secral.MAX_BODY // 2))
    assert len(secral.encode_frame({"type": "mail", "hops": 8, "mail": mail})) < secral.MAX_LINE
    with pytest.raises(RemoteError) as err:
        sealed(subject="line\nbreak")
    assert err.value.code == "malformed"


def test_ack_round_trip_and_checks():
    mail = sealed()
    ack = secral.make_ack(key(1), mail, "delivered", "", NOW)
    assert secral.verify_ack(ack, NOW) is ack
    assert ack["to"] == f"Core@{key(0).domain}" and ack["from"] == f"Core@{key(1).domain}"
    for change, code in [({"status": "maybe"}, "malformed"), ({"from_key": key(2).public_b64}, "bad_domain"),
                         ({"from": f"Default@{key(1).domain}"}, "bad_address"),
                         ({"reason": "x" * 300}, "too_large"), ({"id": "1" * 32}, "bad_signature")]:
        with pytest.raises(RemoteError) as err:
            secral.verify_ack({**ack, **change}, NOW)
        assert err.value.code == code, change
    with pytest.raises(RemoteError) as err:
        secral.verify_ack(ack, NOW + secral.ack_lifetime())
    assert err.value.code == "expired"


def test_auth_binds_the_nonce_and_both_domains():
    nonce = secral.b64e(b"n" * 16)
    record = make_record(key(0), None, 0, 1, NOW + 100)
    auth = secral.make_auth(key(0), nonce, key(1).domain)
    assert set(auth) == {"type", "sig"}
    assert secral.verify_auth(auth, record, nonce, key(1).domain) is auth
    for args in ((record, secral.b64e(b"m" * 16), key(1).domain),                     # replayed later
                 (record, nonce, key(2).domain),                                      # relayed to a third node
                 (make_record(key(2), None, 0, 1, NOW + 100), nonce, key(1).domain)):  # not its key
        with pytest.raises(RemoteError) as err:
            secral.verify_auth(auth, *args)
        assert err.value.code == "bad_signature"


def test_the_certificate_is_a_deterministic_container_for_the_node_key():
    der = secral.make_certificate(key(0))
    assert der == secral.make_certificate(key(0)) == key(0).certificate    # PKCS#1 v1.5: one certificate
    assert secral.domain_of_key(secral.certificate_key(der)) == key(0).domain
    assert secral.certificate_key(key(1).certificate) == key(1).public_b64
    spki = key(0).public_der
    for bad in (b"", b"\x30\x03\x02\x01\x01", der.replace(spki, spki[:-1] + bytes([spki[-1] ^ 1]))):
        with pytest.raises(RemoteError) as err:
            secral.certificate_key(bad)
        assert err.value.code == "bad_key"


@pytest.mark.parametrize("frame, code", [
    ({"type": "teleport"}, "unknown_type"),
    ({"type": "mail", "hops": 9, "mail": {}}, "bad_hops"),
    ({"type": "mail", "hops": -1, "mail": {}}, "bad_hops"),
    ({"type": "mail", "hops": "8", "mail": {}}, "malformed"),
    ({"type": "mail", "mail": {}}, "malformed"),
    ({"type": "nis_query", "qid": "0" * 32, "domain": "node-x", "hops": 1}, "bad_domain"),
    ({"type": "nis_query", "qid": "0" * 32, "domain": "node-" + "a" * 24, "hops": 4}, "bad_hops"),
    ({"type": "hello", "v": 1, "record": {}, "nonce": "", "agent": "a" * 200}, "too_large"),
    ({"type": "peers", "records": {}}, "malformed"),
])
def test_verify_frame_rejects(frame, code):
    with pytest.raises(RemoteError) as err:
        secral.verify_frame(frame)
    assert err.value.code == code


# =============================================================================
# Test vectors (spec/vectors/) and interoperability
# =============================================================================

def vector_keys() -> dict[str, Identity]:
    """The test nodes of keys.json and their mail keys, by name."""
    with open(os.path.join(VECTORS, "keys.json")) as f:
        data = json.load(f)
    return {k["name"]: Identity.from_pem(k["private_pem"]) for k in data["keys"] + data["mail_keys"]}


def vector_ring(owner: str) -> secral.MailKeys:
    """A test node's mail keys as the vectors assume them (spec 11): those of
    keys.json, but the ones marked deleted, whose ids it remembers."""
    with open(os.path.join(VECTORS, "keys.json")) as f:
        data = json.load(f)
    ring = secral.MailKeys()
    for k in data["mail_keys"]:
        if k["owner"] == owner and k.get("deleted"):
            ring.retired.add(k["id_hex"])
        elif k["owner"] == owner:
            ring.add(k["epoch"], Identity.from_pem(k["private_pem"]))
    return ring


def vector_files() -> list[str]:
    return sorted(f for f in os.listdir(VECTORS) if f.endswith(".json") and f != "keys.json")


class Script:
    def __init__(self, *values: bytes):
        self.values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self.values.pop(0)
        assert len(value) == n
        return value


def attempt(fn) -> tuple[str, object]:
    try:
        return "ok", fn()
    except RemoteError as exc:
        return exc.code, None


def run_vector(v: dict, keys: dict[str, Identity]) -> str:
    """Carry out one vector's op; assert its outputs; return the outcome code."""
    op = v["op"]
    if op == "decode_frame":
        if "line" in v:
            line = v["line"].encode()
        elif "line_hex" in v:
            line = bytes.fromhex(v["line_hex"])
        else:
            line = (v["line_prefix"] + v["repeat"] * v["count"] + v["line_suffix"]).encode()
            assert len(line) == v["length"]
        code, frame = attempt(lambda: secral.canonical_json(secral.decode_frame(line)))
        if code == "ok" and "canonical" in v:  # (the 256 KiB line has no copy of itself)
            assert frame.decode() == v["canonical"]
        return code
    if op == "base64_decode":
        code, data = attempt(lambda: secral.b64d(v["text"], "value"))
        if code == "ok":
            assert data.hex() == v["bytes_hex"]
        return code
    if op == "domain_of_key":
        code, domain = attempt(lambda: secral.domain_of_key(v["key"]))
        if code == "ok":
            assert domain == v["domain"]
        return code
    if op == "parse_address":
        code, a = attempt(lambda: secral.parse_address(v["address"]))
        if code == "ok":
            assert (a.user, a.domain, a.key) == (v["user"], v["domain"], v["folded"])
        return code
    if op == "verify_record":
        return attempt(lambda: secral.verify_record(v["record"], v["now"]))[0]
    if op == "mail_key_id":
        assert secral.mail_key_id(v["key"]) == v["id_hex"]
        return "ok"
    if op == "record_supersedes":
        assert secral.record_supersedes(v["new"], v["old"]) is v["result"]
        return "ok"
    if op == "seal_mail":
        r = v["random"]
        rng = Script(*(bytes.fromhex(r[n]) for n in ("id_hex", "aes_key_hex", "nonce_hex", "oaep_seed_hex",
                                                     "pss_salt_hex")))
        sender, recipient = secral.parse_address(v["from"]), secral.parse_address(v["to"])
        args = (v["subject"], v["body"], v.get("parts", ()), v.get("in_reply_to"))
        record = secral.verify_record(v["recipient_record"], v["created"])
        mail = secral.seal_mail(keys[v["sender_key"]], sender, recipient, record,
                                *args[:2], v["created"], v["ttl"], rng, *args[2:])
        assert mail == v["mail"]
        plaintext = secral.make_plaintext(sender, recipient, *args)
        assert len(plaintext) == v["plaintext_length"] and len(plaintext) in secral.PAD_BUCKETS
        assert hashlib.sha256(plaintext).hexdigest() == v["plaintext_sha256_hex"]
        return "ok"
    if op == "make_plaintext":
        return attempt(lambda: secral.make_plaintext(secral.parse_address(v["from"]), secral.parse_address(v["to"]),
                                                     v["subject"], v["body"], v["parts"], v["in_reply_to"]))[0]
    if op == "verify_mail":
        return attempt(lambda: secral.verify_mail(v["mail"], v["now"]))[0]
    if op == "open_mail":
        code, plain = attempt(lambda: secral.open_mail(keys[v["recipient"]], vector_ring(v["recipient"]),
                                                       secral.verify_mail(v["mail"], v["now"])))
        if code == "ok":
            assert plain == v["plaintext"]
        return code
    if op == "make_ack":
        ack = secral.make_ack(keys[v["signer"]], v["mail"], v["status"], v["reason"], v["created"],
                              Script(bytes.fromhex(v["pss_salt_hex"])))
        assert ack == v["ack"]
        return "ok"
    if op == "verify_ack":
        return attempt(lambda: secral.verify_ack(v["ack"], v["now"]))[0]
    if op == "make_certificate":
        der = secral.make_certificate(keys[v["key"]])
        assert secral.b64e(der) == v["certificate"] and hashlib.sha256(der).hexdigest() == v["certificate_sha256_hex"]
        assert keys[v["key"]].domain == v["domain"]
        return "ok"
    if op == "certificate_key":
        code, key_ = attempt(lambda: secral.certificate_key(base64.b64decode(v["certificate"])))
        if code == "ok":
            assert key_ == v["key"] and secral.domain_of_key(key_) == v["domain"]
        return code
    if op == "make_auth":
        statement = secral.auth_statement(v["peer_nonce"], keys[v["signer"]].domain, v["peer_domain"])
        assert secral.canonical_json(statement).decode() == v["statement"]
        auth = secral.make_auth(keys[v["signer"]], v["peer_nonce"], v["peer_domain"],
                                Script(bytes.fromhex(v["pss_salt_hex"])))
        assert auth == v["auth"]
        if "hello" in v:
            assert secral.verify_frame(v["hello"]) and secral.verify_record(v["hello"]["record"], v["now"])
        return "ok"
    if op == "verify_auth":
        return attempt(lambda: secral.verify_auth(v["auth"], v["record"], v["own_nonce"], v["own_domain"]))[0]
    if op == "check_host":
        return attempt(lambda: secral.check_host(v["host"], "host"))[0]
    if op == "verify_frame":
        return attempt(lambda: secral.verify_frame(v["frame"]))[0]
    if op == "verify_nis_answer":
        code, _ = attempt(lambda: secral.verify_nis_answer(v["answer"], v["query_domain"], v["now"]))
        event = None if code == "ok" else secral.forgery_event(RemoteError(code, ""))
        assert event == v["event"]
        return code
    if op == "nis_map":
        node = Node(keys["alice"], Stores.memory(), Config(), v["now"], Counter(9), vector_ring("alice"))
        for offer in v["offers"]:
            with contextlib.suppress(RemoteError):
                node.learn_record(secral.verify_record(offer, v["now"]), v["now"])
        found = {d: {"seq": r["seq"], "host": r["host"]} for d, r in node.stores.nis.items() if d != node.domain}
        assert found == v["map"]
        return "ok"
    raise AssertionError(f"unknown op {op}")


@pytest.mark.parametrize("name", vector_files())
def test_vector_file(name):
    keys = vector_keys()
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        data = json.load(f)
    assert data["file"] == name and data["vectors"]
    allowed = {"ok", *secral.ERROR_CODES}
    for i, v in enumerate(data["vectors"]):
        assert v["expect"] in allowed, (name, i)
        assert run_vector(v, keys) == v["expect"], (name, i, v["comment"])


def test_vectors_cover_every_op_and_many_codes():
    ops, codes = set(), set()
    for name in vector_files():
        for v in json.loads(read_text(os.path.join(VECTORS, name)))["vectors"]:
            ops.add(v["op"])
            codes.add(v["expect"])
    assert {"seal_mail", "open_mail", "verify_mail", "make_ack", "verify_ack", "verify_record",
            "verify_auth", "verify_frame", "decode_frame", "domain_of_key", "parse_address",
            "verify_nis_answer", "nis_map", "record_supersedes", "make_auth", "make_certificate",
            "certificate_key", "make_plaintext", "check_host", "mail_key_id"} <= ops
    assert {"bad_signature", "malformed", "expired", "too_large", "bad_domain", "decrypt_failed",
            "mismatch", "future", "bad_ttl", "bad_key", "bad_address", "wrong_recipient", "not_json",
            "unknown_type", "bad_hops", "unknown_key", "retired_key"} <= codes


def test_vectors_regenerate_byte_for_byte():
    result = subprocess.run([sys.executable, os.path.join(VECTORS, "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_interop_an_independent_library_opens_and_verifies_a_sealed_mail():
    """The constructions are the standard ones: `cryptography` (OpenSSL) checks
    the signature, unwraps the key, decrypts and reads the certificate,
    knowing only PROTOCOL.md."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def domain_of(der: bytes) -> str:
        return "node-" + base64.b32encode(hashlib.sha256(der).digest()[:15]).decode().lower()

    def canonical(obj) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    mail = sealed(0, 1, subject="interop ✓", body="opened by OpenSSL")
    sender_pub = serialization.load_der_public_key(base64.b64decode(mail["from_key"]))
    sender_pub.verify(base64.b64decode(mail["sig"]), canonical({k: v for k, v in mail.items() if k != "sig"}),
                      padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert mail["from"] == domain_of(base64.b64decode(mail["from_key"]))    # the envelope names domains only
    mail_key = pool_mail_key(secral.epoch_of(NOW))                # the recipient's key of the week (5.6)
    assert mail["key_id"] == hashlib.sha256(mail_key.public_der).digest()[:16].hex()
    private = serialization.load_pem_private_key(mail_key.to_pem(), None)
    aes_key = private.decrypt(base64.b64decode(mail["key"]),
                              padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    aad = canonical({k: mail[k] for k in ("created", "expires", "from", "id", "key_id", "to")})
    inner = AESGCM(aes_key).decrypt(base64.b64decode(mail["nonce"]), base64.b64decode(mail["ct"]), aad)
    assert len(inner) == 1024                                   # the smallest bucket (6.1)
    plain = json.loads(inner)
    assert plain == {"from": f"Default@{mail['from']}", "to": f"Default@{mail['to']}", "subject": "interop ✓",
                     "body": "opened by OpenSSL", "pad": "0" * len(plain["pad"])}
    # And the other way round: OpenSSL seals, Secral opens.
    recipient_pub = serialization.load_der_public_key(mail_key.public_der)
    aes_key, nonce = os.urandom(32), os.urandom(12)
    theirs = {"kind": "mail", "id": os.urandom(16).hex(), "from": key(0).domain, "to": key(1).domain,
              "from_key": key(0).public_b64, "created": NOW, "expires": NOW + 60, "key_id": mail["key_id"]}
    inner = {"from": f"Default@{key(0).domain}", "to": f"Default@{key(1).domain}", "subject": "s",
             "body": "from OpenSSL", "pad": ""}
    inner["pad"] = "0" * (2048 - len(canonical(inner)))          # any bucket will do
    aad = canonical({k: theirs[k] for k in ("created", "expires", "from", "id", "key_id", "to")})
    theirs["ct"] = base64.b64encode(AESGCM(aes_key).encrypt(nonce, canonical(inner), aad)).decode()
    theirs["nonce"] = base64.b64encode(nonce).decode()
    theirs["key"] = base64.b64encode(recipient_pub.encrypt(
        aes_key, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))).decode()
    signer = serialization.load_pem_private_key(key(0).to_pem(), None)
    theirs["sig"] = base64.b64encode(signer.sign(canonical(theirs), padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                                 hashes.SHA256())).decode()
    assert open_mail(key(1), secral.verify_mail(theirs, NOW))["body"] == "from OpenSSL"
    # The certificate (8.1) is ordinary X.509 v3: OpenSSL reads it, its self-signature
    # verifies, and its SubjectPublicKeyInfo is the node key, whose hash is the domain.
    cert = x509.load_der_x509_certificate(key(0).certificate)
    assert cert.version == x509.Version.v3 and cert.serial_number == 1
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert domain_of(spki) == key(0).domain
    assert cert.subject.rfc4514_string() == f"CN={key(0).domain}"
    keys = vector_keys()                        # the vector keys load with the same library too
    assert keys
    for identity in keys.values():
        serialization.load_pem_private_key(identity.to_pem(), None)


# =============================================================================
# Routing core: cores linked without sockets
# =============================================================================

# -- shared helpers -----------------------------------------------------------

def two_nodes(**config) -> tuple[Wire, Node, Node]:
    wire = Wire()
    a, b = wire.add("a", key(0), **config), wire.add("b", key(1), **config)
    wire.connect("a", "b")
    return wire, a, b


# -- Links: the handshake inside TLS, rate limit, timeouts (8, 9.3) ---------------

def test_handshake_opens_both_sides():
    wire, a, b = two_nodes()
    assert list(a.open) == [b.domain] and list(b.open) == [a.domain]
    assert a.open[b.domain].outbound and not b.open[a.domain].outbound
    assert {(n, e.name) for n, e in wire.events} >= {("a", "peer_open"), ("b", "peer_open")}
    assert a.known_record(b.domain, wire.now) == b.record      # hello teaches the record


def test_self_connection_is_refused():
    wire = Wire()
    wire.add("a", key(0))
    wire.nodes["a2"] = wire.nodes["a"]
    wire.connect("a", "a2")
    assert not wire.nodes["a"].open
    assert any(reason == "self_connection" for _, _, reason in wire.closed)


def test_duplicate_connections_keep_the_one_dialled_by_the_smaller_domain():
    wire, a, b = two_nodes()
    wire.connect("b", "a")                          # the other direction as well
    small = min(a.domain, b.domain)
    for node, other in ((a, b), (b, a)):
        peer = node.open[other.domain]
        dialler = node.domain if peer.outbound else other.domain
        assert dialler == small
    assert any(reason == "duplicate_connection" for _, _, reason in wire.closed)


def test_peer_presenting_someone_elses_record_fails_auth():
    wire = Wire()
    a, b = wire.add("a", key(0)), wire.add("b", key(1))
    conn = 99
    wire.run("a", a.connection_made(conn, "10.6.6.6", wire.now))
    hello = secral.make_hello(b.record, b"x" * 16)   # B's record, but we hold key 2
    a.line_received(conn, secral.encode_frame(hello), wire.now)
    nonce = a.peers[conn].nonce
    forged = secral.make_auth(key(2), nonce, a.domain)
    actions = a.line_received(conn, secral.encode_frame(forged), wire.now)
    assert any(isinstance(x, Close) for x in actions)
    assert any(isinstance(x, Send) and x.frame.get("code") == "bad_signature" for x in actions)
    assert not a.open
    assert a.reputation.score("ip:10.6.6.6", NOW) == -25


def test_listener_signs_only_after_the_dialler_proved_itself():
    wire = Wire()
    a = wire.add("a", key(0))
    actions = a.connection_made(7, "10.1.1.1", wire.now)
    replayed = secral.make_hello(wire.add("b", key(1)).record, os.urandom(16))   # a public record
    actions += a.line_received(7, secral.encode_frame(replayed), wire.now)
    assert [x.frame["type"] for x in actions if isinstance(x, Send)] == ["hello"]   # no auth from us


def dial_by_hand(listener: Node, me: Identity, now: float = NOW, conn: int = 77) -> list:
    """Be the dialler towards a core, frame by frame (8.1): our hello, then our
    auth over its nonce and its domain.  Returns the listener's actions."""
    actions = listener.connection_made(conn, "10.3.3.3", now)
    hello = next(a.frame for a in actions if isinstance(a, Send))
    mine = make_record(me, None, 0, 1, int(now) + 3600)
    actions += listener.line_received(conn, secral.encode_frame(secral.make_hello(mine, os.urandom(16))), now)
    assert listener.peers[conn].state == "auth"
    auth = secral.make_auth(me, hello["nonce"], listener.domain)
    return actions + listener.line_received(conn, secral.encode_frame(auth), now)


def test_the_listener_opens_on_the_dialler_auth_and_never_sends_one():
    wire = Wire()
    a = wire.add("a", key(0))
    actions = dial_by_hand(a, key(1))
    assert key(1).domain in a.open and a.open[key(1).domain].verified
    assert [x.frame["type"] for x in actions if isinstance(x, Send)] == ["hello", "getpeers"]


def test_a_dialler_opens_once_its_auth_is_sent_and_refuses_an_auth_back():
    wire, a, b = two_nodes()
    conn = wire.conn_between("a", "b")
    assert [f["type"] for n, c, f in wire.sent if (n, c) == ("a", conn)][:3] == ["hello", "auth", "getpeers"]
    actions = a.line_received(conn, secral.encode_frame(secral.make_auth(key(1), "AAAA", a.domain)), wire.now)
    assert any(isinstance(x, Send) and x.frame.get("code") == "not_ready" for x in actions)


def test_a_dialler_believes_the_certificate_not_the_hello():
    # The certificate is B's but the dial expected C: closed before a hello is sent.
    wire = Wire()
    a, b, c = wire.add("a", key(0)), wire.add("b", key(1)), wire.add("c", key(2))
    actions = a.connection_made(5, "10.4.4.4", wire.now, dialled=Dial("10.4.4.4", 1, c.domain),
                                certificate=b.identity.certificate)
    assert [x.frame["code"] for x in actions if isinstance(x, Send)] == ["wrong_peer"]
    # The certificate is B's and the hello carries C's record: closed, nobody scored.
    actions = a.connection_made(6, "10.4.4.4", wire.now, dialled=Dial("10.4.4.4", 1, None),
                                certificate=b.identity.certificate)
    actions += a.line_received(6, secral.encode_frame(secral.make_hello(c.record, b"n" * 16)), wire.now)
    assert [x.frame.get("code") for x in actions if isinstance(x, Send)][-1] == "wrong_peer"
    assert not a.open and a.reputation.score("ip:10.4.4.4", NOW) == 0
    for cert in (None, b"not a certificate"):
        actions = a.connection_made(7, "10.4.4.4", wire.now, dialled=Dial("10.4.4.4", 1, None), certificate=cert)
        assert [x.frame["code"] for x in actions if isinstance(x, Send)] == ["bad_key"]


def test_frames_before_the_handshake_disconnect():
    wire = Wire()
    a = wire.add("a", key(0))
    wire.run("a", a.connection_made(5, "10.6.6.7", wire.now))
    actions = a.line_received(5, b'{"type":"mail","hops":1,"mail":{}}\n', wire.now)
    assert any(isinstance(x, Close) for x in actions)
    assert a.reputation.score("ip:10.6.6.7", NOW) == -50


def test_handshake_timeout():
    wire = Wire()
    a = wire.add("a", key(0))
    wire.run("a", a.connection_made(5, "10.6.6.8", wire.now))
    wire.advance(secral.HANDSHAKE_TIMEOUT + 1)
    assert any(conn == 5 and reason == "timeout" for _, conn, reason in wire.closed)


def test_nesting_is_limited():
    ok = b'{"type":"ping","x":' + b"[" * 15 + b"]" * 15 + b"}"      # 16 levels, the frame included
    assert secral.decode_frame(ok + b"\n")
    with pytest.raises(RemoteError) as err:
        secral.decode_frame(b'{"type":"ping","x":' + b"[" * 16 + b"]" * 16 + b"}\n")
    assert err.value.code == "malformed"


def test_rate_limit_drops_frames_and_costs_reputation():
    wire, a, b = two_nodes(rate=10, burst=5)
    conn = wire.conn_between("b", "a")
    free = int(a.open[b.domain].bucket.tokens)     # what the handshake left of the burst
    assert free < 5
    wire.transmit("b", conn, *[{"type": "ping"}] * 8)
    assert a.score(b.domain, wire.now) == -2 * (8 - free)
    assert len([f for f in wire.frames("a", "pong")]) == free
    wire.now += 1                                   # ten more tokens a second later
    wire.transmit("b", conn, {"type": "ping"})
    assert len([f for f in wire.frames("a", "pong")]) == free + 1


def test_the_rate_limit_judges_arrival_not_processing():
    wire, a, b = two_nodes(rate=400, burst=400)
    conn_b = wire.conn_between("b", "a")
    conn_a = wire.links[("b", conn_b)][1]
    start = wire.now
    lines = []
    for i in range(1200):                       # 3 s of frames at the allowed 400/s ...
        lines.append((start + i / 400, b.transmit(conn_b, {"type": "ping"})[0].frame))
    wire.now = start + 5                        # ... all read late, in one go, after a stall
    for arrived, frame in lines:
        a.line_received(conn_a, secral.encode_frame(frame), wire.now, arrived=arrived)
    assert a.score(b.domain, wire.now) == 0 and b.domain in a.open


def forged_mails(sender: int, recipient: int, count: int) -> list[dict]:
    return [{"type": "mail", "hops": 8, "mail": {**sealed(sender, recipient), "id": f"{i:032x}"}}
            for i in range(count)]


def test_misbehaving_peer_is_banned_at_minus_100():
    wire, a, b = two_nodes()
    wire.transmit("b", wire.conn_between("b", "a"), *forged_mails(1, 0, 4))      # 4 x -25
    assert b.domain not in a.open
    assert any(e.name == "banned" for n, e in wire.events if n == "a")
    assert a.reputation.banned(f"domain:{b.domain}", NOW)
    assert a.reputation.banned("ip:ip-b", NOW)
    # It cannot come back while banned, by address or by name.
    wire.connect("b", "a")
    assert b.domain not in a.open


def test_a_ban_ends_unfinished_handshakes_from_that_address():
    wire, a, b = two_nodes()
    wire.run("a", a.connection_made(500, "ip-b", wire.now))           # half-open, same address
    wire.transmit("b", wire.conn_between("b", "a"), *forged_mails(1, 0, 4))
    assert 500 not in a.peers
    assert any(c == 500 and reason == "banned" for n, c, reason in wire.closed if n == "a")


def test_a_full_node_evicts_by_the_inbound_table():
    """9.3 "Inbound caps", row by row, on peers set up by hand."""
    node = Node(key(0), Stores.memory(), Config(), NOW, Counter(1), pool_ring())
    slots = node.links.slots

    def peer(conn, ip, opened, domain=None, score=0, last_object=None):
        p = secral.Peer(conn, ip, None, "", secral.TokenBucket(1, 1, NOW), NOW + opened)
        if domain:
            p.state, p.domain, p.verified = "open", domain, True
        p.last_object = last_object
        if score:
            node.reputation.change(p.subject, score, NOW)
        return p
    crowd = [peer(i, f"10.1.0.{i}", i, f"node-crowd{i}") for i in range(1, 6)]
    loner = peer(9, "10.9.0.1", 50, "node-loner")
    assert slots.victim([*crowd, loner], NOW + 60) is crowd[-1]            # youngest of the crowd
    pending = peer(10, "10.1.0.7", 55)                                     # handshaking: a candidate
    assert slots.victim([*crowd, loner, pending], NOW + 60) is pending
    sour = peer(11, "10.8.0.1", 1, "node-sour", score=-3)
    assert slots.victim([*crowd, loner, sour], NOW + 60) is sour          # below 0 goes first
    useful = [peer(20 + i, f"10.2.0.{i}", 60 + i, f"node-useful{i}", score=5) for i in range(9)]
    victim = slots.victim(useful, NOW + 90)                                # only 8 are protected
    assert victim is useful[-1] and victim.subject == "domain:node-useful8"
    active = [peer(40 + i, f"10.3.0.{i}", 70 + i, f"node-active{i}", last_object=NOW + i) for i in range(9)]
    assert slots.victim(active, NOW + 90) is active[0]                     # the least recently active
    node.delivery.items_for["node-crowd5"].add("mail/x")
    assert slots.victim(crowd, NOW + 60) is crowd[-2]                      # mail waits for crowd5
    assert slots.victim(useful[:8], NOW + 90) is None                      # all protected: refuse
    assert slots.refusal(peer(99, "10.1.0.1", 0), [peer(100 + i, "10.1.0.1", 0) for i in range(16)])
    assert slots.refusal(peer(99, "10.1.0.99", 0), [peer(200 + i, f"10.1.0.{i}", 0) for i in range(32)])
    assert slots.refusal(peer(99, "10.1.1.99", 0), [peer(200 + i, f"10.1.0.{i}", 0) for i in range(32)]) is None


# -- Delivery: routing, relay store, acks, retries (7) ------------------------

def test_direct_delivery_is_stored_then_acked():
    wire, a, b = two_nodes()
    mail_id = wire.submit("a", addr(b), "Hi", "There")
    assert wire.status("a", mail_id) == "delivered"
    [entry] = wire.inbox("b")
    assert (entry["subject"], entry["body"], entry["user"]) == ("Hi", "There", "default")
    assert entry["ack"]["status"] == "delivered"
    # The ack was created after the inbox write: the inbox entry carries it.
    acks = wire.frames("b", "ack")
    assert acks and acks[0]["ack"] == entry["ack"]


def test_mail_to_unknown_user_is_rejected_with_a_signed_ack():
    wire, a, b = two_nodes()
    mail_id = wire.submit("a", addr(b, "nobody"))
    entry = a.stores.outbox[mail_id]
    assert (entry["status"], entry["reason"]) == ("rejected", "no_such_user")
    assert wire.inbox("b") == []


def test_mail_to_core_is_rejected():
    wire, a, b = two_nodes()
    assert wire.status("a", wire.submit("a", addr(b, "Core"))) == "rejected"


def test_user_addresses_are_case_insensitive():
    wire, a, b = two_nodes()
    assert wire.status("a", wire.submit("a", addr(b, "DEFAULT"))) == "delivered"


def test_a_peer_sending_a_subject_with_a_line_separator_gets_a_rejected_ack():
    wire, a, b = two_nodes()
    for bad in ("two\u2028lines", "para\u2029graph", "next\u0085line", "c1\u009bcontrol"):
        with pytest.raises(RemoteError, match="line separators"):
            secral.check_subject(bad)
        mail = sealed_raw(0, 1, {"subject": bad, "body": "x"})
        wire.transmit("a", wire.conn_between("a", "b"), {"type": "mail", "hops": 8, "mail": mail})
        [ack] = [f["ack"] for f in wire.frames("b", "ack") if f["ack"]["id"] == mail["id"]]
        assert (ack["status"], ack["reason"]) == ("rejected", "malformed")
    assert wire.inbox("b") == []


def sealed_raw(sender: int, recipient: int, plain: dict, now: int = NOW, pad: bool = True,
               mail_key: Identity | None = None) -> dict:
    """A mail sealed around any plaintext, bypassing the sealer's own checks:
    what a hostile or broken sender could make.  `plain` may override the
    sealed addresses; the plaintext is padded to a bucket unless pad=False.
    It is sealed to `mail_key`, by default the pool's for now's epoch."""
    identity, to = key(sender), key(recipient)
    mail_key = mail_key or pool_mail_key(secral.epoch_of(now))
    mail = {"kind": "mail", "id": os.urandom(16).hex(), "from": identity.domain, "to": to.domain,
            "from_key": identity.public_b64, "created": now, "expires": now + 3600,
            "key_id": secral.mail_key_id(mail_key.public_b64)}
    plain = {"from": f"Default@{identity.domain}", "to": f"Default@{to.domain}", "pad": "", **plain}
    size = len(secral.canonical_json(plain))
    if pad:
        plain["pad"] += "0" * (min(b for b in secral.PAD_BUCKETS if b >= size) - size)
    plaintext = secral.canonical_json(plain)
    aes, nonce = os.urandom(32), os.urandom(12)
    mail["ct"] = secral.b64e(secral.seal_gcm(aes, nonce, plaintext, secral.envelope_of(mail)))
    mail["nonce"] = secral.b64e(nonce)
    mail["key"] = secral.b64e(secral.wrap_key(mail_key.key.public_key(), aes))
    return identity.sign(mail)


def test_mail_from_core_is_refused_by_its_recipient():
    # A relay cannot see the sealed sender; the recipient refuses it, with a signed ack.
    mail = sealed_raw(0, 1, {"from": f"Core@{key(0).domain}", "subject": "s", "body": "b"})
    with pytest.raises(RemoteError) as err:
        open_mail(key(1), secral.verify_mail(mail, NOW))
    assert err.value.code == "bad_address"
    wire, a, b = two_nodes()
    wire.transmit("a", wire.conn_between("a", "b"), {"type": "mail", "hops": 8, "mail": mail})
    [ack] = [f["ack"] for f in wire.frames("b", "ack") if f["ack"]["id"] == mail["id"]]
    assert (ack["status"], ack["reason"]) == ("rejected", "bad_address")
    assert wire.inbox("b") == []


def test_work_ahead_changes_no_result_and_signs_nothing_twice():
    """The shell's reader threads do a frame's RSA work before the core's
    lock (issue 17): the core then decides exactly as it would have, with
    the ack signed ahead, and a replay costs no second signature."""
    wire, a, b = two_nodes()
    mail = sealed(1, 0, subject="ahead", body="b")          # from b's key to a's Default
    frame = {"type": "mail", "hops": 8, "mail": mail}
    secral.work_ahead(frame, a.identity, a.mail_keys, a.stores, wire.now)
    [(signed_key, signature)] = list(secral.SIGNED_AHEAD.entries.items())
    wire.transmit("b", wire.conn_between("b", "a"), frame)
    [ack] = [f["ack"] for f in wire.frames("a", "ack") if f["ack"]["id"] == mail["id"]]
    assert secral.b64d(ack["sig"], "sig") == signature          # the core used it ...
    assert not secral.SIGNED_AHEAD.entries                       # ... once
    assert secral.verify_ack(ack, NOW)["status"] == "delivered"
    secral.work_ahead(frame, a.identity, a.mail_keys, a.stores, wire.now)     # a replay: already answered
    assert not secral.SIGNED_AHEAD.entries
    nobody = sealed_raw(1, 0, {"to": f"nobody@{key(0).domain}", "subject": "s", "body": "b"})
    secral.work_ahead({"type": "mail", "hops": 8, "mail": nobody}, a.identity, a.mail_keys, a.stores, wire.now)
    wire.transmit("b", wire.conn_between("b", "a"), {"type": "mail", "hops": 8, "mail": nobody})
    [ack] = [f["ack"] for f in wire.frames("a", "ack") if f["ack"]["id"] == nobody["id"]]
    assert (ack["status"], ack["reason"]) == ("rejected", "no_such_user") and not secral.SIGNED_AHEAD.entries


def test_a_mail_sealed_off_the_lock_is_taken_as_it_is():
    """The control thread seals when the key is known, outside the core's
    lock (issue 17); the core takes that mail, id and times included, and
    refuses one that is not the mail submitted."""
    wire, a, b = two_nodes()
    sealed_mail = seal_mail(key(0), Address("Default", a.domain), Address("Default", b.domain),
                                   b.identity.public_b64, "s", "body", int(wire.now), 3600)
    mail_id, actions = a.submit("Default", addr(b), "s", "body", wire.now, 3600, sealed=sealed_mail)
    wire.run("a", actions)
    wire.pump()
    assert mail_id == sealed_mail["id"] and wire.status("a", mail_id) == "delivered"
    assert a.stores.outbox[mail_id]["mail"] == sealed_mail
    with pytest.raises(secral.LocalError) as err:
        a.submit("Default", addr(b), "s", "body", wire.now, 60, sealed=sealed_mail)   # another lifetime
    assert err.value.code == "refused"


def test_relay_carries_mail_and_ack_and_forgets_its_copy():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    wire.connect("a", "r")
    wire.connect("r", "b")
    a.learn_record(b.record, wire.now)              # A knows B's key but cannot dial it
    mail_id = wire.submit("a", addr(b), "via relay", "body")
    assert wire.status("a", mail_id) == "delivered"
    assert [e["subject"] for e in wire.inbox("b")] == ["via relay"]
    assert dict(r.stores.relay.items()) == {k: v for k, v in r.stores.relay.items() if v["kind"] == "ack"}
    assert all(b"via relay" not in json.dumps(v).encode() for v in r.stores.relay.values())


def test_offline_recipient_gets_stored_mail_when_it_connects():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    a.learn_record(b.record, wire.now)
    wire.connect("a", "r")
    mail_id = wire.submit("a", addr(b), "later", "body")
    assert wire.status("a", mail_id) == "sent"
    assert any(v["kind"] == "mail" for v in r.stores.relay.values())
    wire.stop("a")                                  # the sender goes away
    wire.advance(86_400, step=600)                  # a day later ...
    wire.down.discard("a")
    wire.connect("b", "r")                          # ... the recipient appears
    assert [e["subject"] for e in wire.inbox("b")] == ["later"]
    assert not any(v["kind"] == "mail" for v in r.stores.relay.values())
    wire.connect("a", "r")                          # the sender returns and learns the news
    assert wire.status("a", mail_id) == "delivered"


def test_duplicate_mail_is_acked_again_not_stored_twice():
    wire, a, b = two_nodes()
    mail_id = wire.submit("a", addr(b))
    mail = a.stores.outbox[mail_id]["mail"]
    first_ack = b.stores.inbox[secral.mail_key(a.domain, mail_id)]["ack"]
    wire.disconnect("a", "b")
    wire.connect("a", "b")                          # a new connection may carry it again
    conn = wire.conn_between("a", "b")
    before = len(wire.frames("b", "ack"))
    wire.transmit("a", conn, {"type": "mail", "hops": 8, "mail": mail})
    assert len(wire.inbox("b")) == 1
    assert wire.frames("b", "ack")[before:][0]["ack"] == first_ack   # the same signed ack


def test_same_object_twice_on_one_connection_is_penalised():
    wire, a, b = two_nodes()
    mail = sealed(0, 1)
    conn = wire.conn_between("a", "b")
    wire.transmit("a", conn, *[{"type": "mail", "hops": 8, "mail": mail}] * 2)
    assert b.score(a.domain, wire.now) == 1 - 5     # +1 for the mail, -5 for the repeat


def test_sender_retransmits_on_new_connections_until_acked():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    a.learn_record(b.record, wire.now)
    mail_id = wire.submit("a", addr(b))
    assert wire.status("a", mail_id) == "queued"    # nobody to give it to
    wire.connect("a", "r")
    assert wire.status("a", mail_id) == "sent"
    wire.connect("r", "b")
    assert wire.status("a", mail_id) == "delivered"


def test_own_mail_awaiting_its_ack_goes_to_a_peer_that_opens_later():
    """7.2: a peer that opens gets every own mail still waiting for its ack,
    even one that other peers already have (here a dead end): no retry needed."""
    wire = Wire()
    a, b, c, d = (wire.add(n, key(i)) for i, n in enumerate("abcd"))
    a.learn_record(c.record, wire.now)
    wire.connect("a", "b")                          # b cannot reach c
    mail_id = wire.submit("a", addr(c))
    assert wire.status("a", mail_id) == "sent"
    wire.connect("d", "c")
    wire.connect("d", "a")                          # the way to c opens; time does not move
    assert wire.status("a", mail_id) == "delivered"


def test_hops_limit_flooding():
    wire, nodes = Wire.chain(12)
    first, last = nodes[0], nodes[-1]
    first.learn_record(last.record, wire.now)
    mail_id = wire.submit("n0", addr(last))
    # 8 relay steps after the first link: n0 -> n1 (8) ... -> n9 (0); n9 passes nothing on.
    assert wire.status("n0", mail_id) == "sent"
    assert any(k.startswith("mail/") for k in wire.nodes["n8"].stores.relay.keys())
    assert not any(k.startswith("mail/") for k in wire.nodes["n9"].stores.relay.keys())
    assert not wire.inbox("n11")


def test_a_copy_without_hops_does_not_stop_a_better_one():
    wire = Wire()
    a, r, c, b = (wire.add(n, key(i)) for i, n in enumerate("arcb"))
    wire.connect("a", "r")
    wire.connect("r", "c")
    mail = sealed(0, 3)
    conn = wire.conn_between("a", "r")
    wire.transmit("a", conn, {"type": "mail", "hops": 0, "mail": mail})    # a stunted copy first
    assert not r.items and secral.mail_key(a.domain, mail["id"]) not in r.seen
    wire.disconnect("a", "r")                   # (one object, once per connection)
    wire.connect("a", "r")
    wire.transmit("a", wire.conn_between("a", "r"), {"type": "mail", "hops": 1, "mail": mail})
    assert r.items[secral.mail_key(a.domain, mail["id"])].hops == 0
    wire.disconnect("a", "r")
    wire.connect("a", "r")                      # a longer-lived copy arrives later
    wire.transmit("a", wire.conn_between("a", "r"), {"type": "mail", "hops": 8, "mail": mail})
    assert r.items[secral.mail_key(a.domain, mail["id"])].hops == 7
    assert c.items[secral.mail_key(a.domain, mail["id"])].hops == 6


def test_forged_mail_is_refused_while_good_mail_flows():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    wire.connect("a", "r")
    wire.connect("r", "b")
    a.learn_record(b.record, wire.now)
    conn = wire.conn_between("a", "r")
    good = sealed(0, 1)
    forged = {**good, "id": "f" * 32}                      # signature no longer matches
    stolen = {**sealed(2, 1), "from": f"Default@{a.domain}"}   # claims to be A
    for bad in (forged, stolen):
        wire.transmit("a", conn, {"type": "mail", "hops": 8, "mail": bad})
    assert not any(k.endswith("f" * 32) for k in r.stores.relay.keys())
    assert r.score(a.domain, wire.now) == -50
    mail_id = wire.submit("a", addr(b), "still works")
    assert wire.status("a", mail_id) == "delivered"


def test_junk_mail_earns_its_sender_nothing():
    wire = Wire()
    a, r = wire.add("a", key(0)), wire.add("r", key(2))
    wire.connect("a", "r")
    conn = wire.conn_between("a", "r")
    for i in range(5):                          # valid, signed, and for nobody who will answer
        junk = seal_mail(key(0), Address("Default", key(0).domain), Address("x", key(5).domain),
                                key(5).public_b64, f"junk {i}", "x", int(wire.now))
        wire.transmit("a", conn, {"type": "mail", "hops": 8, "mail": junk})
    assert len(r.items) == 5 and r.score(a.domain, wire.now) == 0


def test_relay_quota_refuses_with_an_error_frame():
    wire = Wire()
    a = wire.add("a", key(0))
    r = wire.add("r", key(2), origin_max_items=2)
    b = wire.add("b", key(1))
    wire.connect("a", "r")
    a.learn_record(b.record, wire.now)
    ids = [wire.submit("a", addr(b), f"m{i}") for i in range(3)]
    assert len([k for k in r.stores.relay.keys() if k.startswith("mail/")]) == 2
    refusals = [f for f in wire.frames("r", "error") if f["code"] == "quota_exceeded"]
    assert [f["ref"] for f in refusals] == [ids[2]]
    assert r.score(a.domain, wire.now) == 0        # a refusal is not the sender's fault, and
    wire.connect("r", "b")                          # nothing is earned before a delivery
    wire.advance(secral.RETRY_FIRST * 4, step=5)    # space frees up; the retry gets through
    assert [wire.status("a", i) for i in ids] == ["delivered"] * 3
    assert r.score(a.domain, wire.now) == 3        # each ack proved a mail real: +1 each


def test_a_full_relay_still_hands_mail_to_a_connected_target():
    wire = Wire()
    a, r, b, c = wire.add("a", key(0)), wire.add("r", key(2), relay_max_items=1), wire.add("b", key(1)), \
        wire.add("c", key(3))
    wire.connect("a", "r")
    a.learn_record(c.record, wire.now)
    wire.submit("a", addr(c), "fills the store")            # c is offline: r keeps it
    assert r.quota.items == 1
    wire.connect("r", "b")
    a.learn_record(b.record, wire.now)
    mail_id = wire.submit("a", addr(b), "passes through")
    assert wire.status("a", mail_id) == "delivered" and r.quota.items == 1


def test_acks_for_nothing_we_hold_earn_nothing_and_count_against_quota():
    wire = Wire()
    a = wire.add("a", key(0))
    r = wire.add("r", key(2), origin_max_items=3)
    wire.connect("a", "r")
    conn = wire.conn_between("a", "r")
    acks = [secral.make_ack(key(0), {**sealed(1, 0), "id": f"{i:032x}"}, "delivered", "", int(wire.now))
            for i in range(5)]
    wire.transmit("a", conn, *[{"type": "ack", "hops": 8, "ack": ack} for ack in acks])
    assert r.score(a.domain, wire.now) == 0
    assert len([k for k in r.stores.relay.keys() if k.startswith("ack/")]) == 3
    assert [f["code"] for f in wire.frames("r", "error")] == ["quota_exceeded"] * 2


def test_only_news_about_our_own_mail_earns_an_ack_reward():
    wire, a, b = two_nodes()
    for i in range(3):                          # acks for mail A never sent
        fake = secral.make_ack(key(1), {**sealed(0, 1), "id": f"{i:032x}"}, "delivered", "", int(wire.now))
        wire.transmit("b", wire.conn_between("b", "a"), {"type": "ack", "hops": 8, "ack": fake})
    assert a.score(b.domain, wire.now) == 0
    mail_id = wire.submit("a", addr(b))
    assert wire.status("a", mail_id) == "delivered" and a.score(b.domain, wire.now) == 1


def test_an_error_without_ref_closes_the_receivers_side_at_once():
    """9.4: a goodbye is not answered and not waited out (no 10 s timeout)."""
    wire, a, b = two_nodes()
    conn = wire.conn_between("b", "a")
    a_side = wire.links[("b", conn)][1]
    actions = a.line_received(a_side, secral.encode_frame(b.transmit(conn, secral.make_error(
        "shutdown", "the node is stopping"))[0].frame), wire.now)
    assert [type(x).__name__ for x in actions if not isinstance(x, Event)] == ["Close"]
    assert b.domain not in a.open and a_side not in a.peers


def test_error_ref_only_touches_what_that_connection_was_given():
    wire = Wire()
    a, r, x = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("x", key(3))
    b = wire.add("b", key(1))
    a.learn_record(b.record, wire.now)
    wire.connect("a", "r")
    wire.connect("a", "x")
    mail_id = wire.submit("a", addr(b))
    item = a.items[secral.mail_key(a.domain, mail_id)]
    conn_r, conn_x = wire.conn_between("a", "r"), wire.conn_between("a", "x")
    assert {conn_r, conn_x} <= item.offered
    x_side = wire.links[("a", conn_x)][1]
    wire.transmit("x", x_side, secral.make_error("quota_exceeded", "full", ref=mail_id))
    assert conn_x not in item.offered and conn_r in item.offered
    wire.transmit("x", x_side, {"type": "error", "code": "busy", "message": "m", "ref": "../etc"})
    assert a.score(x.domain, wire.now) == -10   # a ref that is not an id is malformed


def test_acks_follow_the_mail_so_no_flooded_copy_lingers():
    """S floods its mail to A (on the way to R) and to N, a leaf on no path.
    The ack comes back R -> A -> S; N's copy must go too, not wait a week."""
    wire = Wire()
    s_, a, n, r, m = (wire.add(name, key(i)) for i, name in enumerate(["s", "a", "n", "r", "m"]))
    for x, y in [("s", "a"), ("a", "r"), ("s", "n"), ("n", "m")]:
        wire.connect(x, y)
    s_.learn_record(r.record, wire.now)
    mail_id = wire.submit("s", addr(r))
    assert wire.status("s", mail_id) == "delivered"
    for node in (a, n, m):                      # m got its copy from n, two steps off the path
        assert not [k for k in node.stores.relay.keys() if k.startswith("mail/")], node.name


def test_a_held_ack_answers_a_late_copy_whatever_its_hops():
    wire = Wire()
    s_, r, b, late = wire.add("s", key(0)), wire.add("r", key(2)), wire.add("b", key(1)), wire.add("late", key(3))
    wire.connect("s", "r")
    wire.connect("r", "b")
    s_.learn_record(b.record, wire.now)
    mail_id = wire.submit("s", addr(b))
    assert wire.status("s", mail_id) == "delivered"
    mail = s_.stores.outbox[mail_id]["mail"]
    held = r.items[secral.ack_key(s_.domain, mail_id, b.domain)]
    held.hops = 0                               # as if the ack had reached r on its last hop
    wire.connect("late", "r")                   # a slow relay that still has a copy
    before = len(wire.frames("r", "ack"))
    wire.transmit("late", wire.conn_between("late", "r"), {"type": "mail", "hops": 5, "mail": mail})
    assert len(wire.frames("r", "ack")) == before + 1
    assert not [k for k in r.stores.relay.keys() if k.startswith("mail/")]


def test_a_relay_restarted_without_its_seen_set_counts_each_mail_once():
    wire = Wire()
    a, r = wire.add("a", key(0)), wire.add("r", key(2))
    wire.connect("a", "r")
    mail = sealed(0, 1)
    wire.transmit("a", wire.conn_between("a", "r"), {"type": "mail", "hops": 8, "mail": mail})
    assert r.quota.items == 1
    # A kill -9 before the seen-set was saved: the same stores, no seen keys.
    r.stores.seen.clear()
    again = Node(key(2), r.stores, r.config, wire.now, Counter(7), r.mail_keys)
    again.name = "r"
    wire.stop("r")
    wire.nodes["r"] = again
    wire.down.discard("r")
    wire.connect("a", "r")
    wire.transmit("a", wire.conn_between("a", "r"), {"type": "mail", "hops": 8, "mail": mail})
    assert again.quota.items == 1 and again.quota.bytes == r.quota.bytes


def test_unacked_mail_expires_and_the_sender_sees_it():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    a.learn_record(b.record, wire.now)
    wire.connect("a", "r")
    mail_id = wire.submit("a", addr(b), ttl=3600)
    wire.advance(3600 + secral.SWEEP_SECONDS, step=60)
    assert wire.status("a", mail_id) == "expired"
    assert not r.stores.relay and not r.items       # the relay dropped its copy too


def test_expired_objects_are_never_offered_and_never_blamed():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    wire.connect("a", "r")
    a.learn_record(b.record, wire.now)
    wire.submit("a", addr(b), ttl=30)
    wire.now += 31                              # expired, and the sweep has not run yet
    wire.connect("r", "b")
    assert not [f for f in wire.frames("r", "mail")]
    assert b.score(r.domain, wire.now) >= 0


# -- Outbox: submission, sealing, status, withdrawal (7.5) --------------------

def test_mail_to_self_is_delivered_locally():
    wire = Wire()
    a = wire.add("a", key(0))
    assert wire.status("a", wire.submit("a", addr(a))) == "delivered"
    assert len(wire.inbox("a")) == 1


def test_every_valid_mail_fits_in_a_frame():
    """The plaintext limit keeps the largest mail under the line limit, and a
    body that escaping would blow past it is refused before it is queued."""
    sender, recipient = Address("u" * 64, key(0).domain), Address("u" * 64, key(1).domain)
    subject = '"' * 256                         # each quote is two bytes once encoded
    base = len(secral.make_plaintext(sender, recipient, subject, "x" * secral.MAX_BODY))
    quotes = secral.MAX_PLAINTEXT - base        # make the plaintext exactly the limit
    body = '"' * quotes + "x" * (secral.MAX_BODY - quotes)
    assert len(secral.make_plaintext(sender, recipient, subject, body)) == secral.MAX_PLAINTEXT
    worst = seal_mail(key(0), sender, recipient, key(1).public_b64, subject, body, NOW)
    frame = {"type": "mail", "hops": 8, "mail": worst}
    assert open_mail(key(1), secral.verify_mail(worst, NOW))["body"] == body
    assert len(secral.encode_frame(frame)) < secral.MAX_LINE
    wire, a, b = two_nodes()
    with pytest.raises(secral.LocalError) as err:     # the user's mail: our side refuses it
        a.submit("Default", addr(b), "s", "\n" * secral.MAX_BODY, wire.now)
    assert err.value.code == "too_large" and not a.stores.outbox


def test_unknown_recipient_key_is_looked_up_first():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    wire.connect("a", "r")
    wire.connect("r", "b")
    assert a.known_record(b.domain, wire.now) is None
    mail_id = wire.submit("a", addr(b))
    assert wire.frames("a", "nis_query")
    assert wire.status("a", mail_id) == "delivered"


def test_outbox_counts_failed_lookups_for_mail_waiting_for_a_key():
    wire = Wire()
    alone = wire.add("alone", key(0))
    mail_id = wire.submit("alone", f"Default@{key(9).domain}")
    entry = alone.stores.outbox[mail_id]            # no peer to ask: it fails at once
    assert (entry["status"], entry["lookups"], entry["last_lookup"]) == ("queued", 1, NOW)
    assert "NIS not found \u00d71" in secral.outbox_note(entry)
    b = wire.add("b", key(1))
    wire.connect("alone", "b")                      # a new peer is asked at once
    assert [f["domain"] for f in wire.frames("alone", "nis_query")] == [key(9).domain]
    wire.advance(secral.NIS_TIMEOUT + 1)
    assert alone.stores.outbox[mail_id]["lookups"] == 2
    wire.advance(secral.SWEEP_SECONDS)              # the sweep asks again, once per domain
    assert alone.stores.outbox[mail_id]["lookups"] == 3
    assert len(wire.frames("alone", "nis_query")) == 2
    assert wire.frames("b", "nis_query") == []      # (b knows nobody to forward it to)


def test_a_withdrawn_mail_is_not_retried_but_a_late_ack_is_recorded():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    a.learn_record(b.record, wire.now)
    wire.connect("a", "r")
    mail_id = wire.submit("a", addr(b))
    entry, actions = a.cancel(mail_id, wire.now)
    assert entry["status"] == "cancelled"
    assert [a.name for a in actions] == ["mail_status"]    # an event only: nothing is sent
    with pytest.raises(LocalError, match="nothing to withdraw"):
        a.cancel(mail_id, wire.now)
    sent = len(wire.frames("a", "mail"))
    wire.advance(600)                               # retries would have happened by now
    assert len(wire.frames("a", "mail")) == sent
    wire.connect("r", "b")                          # r still holds the copy it was given
    assert wire.status("a", mail_id) == "delivered"


# -- Names: NIS map, own record, lookups (5.3, 5.4) ---------------------------

def test_nis_lookup_over_a_chain_of_five():
    wire, nodes = Wire.chain(5)
    asker, owner = nodes[0], nodes[-1]
    record, actions = asker.lookup(owner.domain, wire.now)
    assert record is None
    wire.run("n0", actions)
    wire.pump()
    results = [e.data for n, e in wire.events if n == "n0" and e.name == "nis_result"]
    assert results and results[0]["record"] == owner.record
    assert asker.known_record(owner.domain, wire.now) == owner.record


def test_nis_lookup_times_out_with_not_found():
    wire, a, b = two_nodes()
    record, actions = a.lookup("node-" + "a" * 24, wire.now)
    wire.run("a", actions)
    wire.advance(secral.NIS_TIMEOUT + 1)
    results = [e.data for n, e in wire.events if n == "a" and e.name == "nis_result"]
    assert results == [{"domain": "node-" + "a" * 24, "record": None}]


def test_forged_nis_answer_is_penalised_and_the_true_one_wins():
    wire = Wire()
    a, liar, honest, owner = (wire.add(n, key(i)) for i, n in enumerate(["a", "liar", "honest", "owner"]))
    wire.connect("a", "liar")
    wire.connect("a", "honest")
    wire.connect("honest", "owner")
    record, actions = a.lookup(owner.domain, wire.now)
    qid = next(x.frame["qid"] for x in actions if isinstance(x, Send))
    wire.run("a", actions)
    # The liar answers first with a record for the domain signed by its own key.
    fake = make_record(key(1), "6.6.6.6", 666, 10**9, int(wire.now) + 100)
    fake = key(1).sign({**fake, "domain": owner.domain})
    wire.transmit("liar", wire.conn_between("liar", "a"), {"type": "nis_answer", "qid": qid, "record": fake})
    assert a.known_record(owner.domain, wire.now) == owner.record
    assert a.score(liar.domain, wire.now) < 0
    assert a.score(honest.domain, wire.now) > 0


def test_fresher_records_replace_older_ones_and_spread():
    wire = Wire()
    a, b, c = wire.add("a", key(0)), wire.add("b", key(1)), wire.add("c", key(2), port=7000)
    wire.connect("a", "b")
    wire.connect("b", "c")
    a.learn_record(c.record, wire.now)
    old_seq = c.record["seq"]
    c.config.port = 7001                            # c moved
    wire.run("c", c.refresh_record(wire.now + 5))
    wire.pump()
    assert c.record["seq"] > old_seq
    assert b.known_record(c.domain, wire.now)["port"] == 7001
    assert a.known_record(c.domain, wire.now)["port"] == 7001


def test_record_is_resigned_before_it_expires():
    wire = Wire()
    a = wire.add("a", key(0))
    first = a.record
    wire.advance(secral.RECORD_LIFETIME - secral.RECORD_REFRESH + 10, step=3600)
    assert a.record["seq"] > first["seq"] and a.record["expires"] > first["expires"]


def test_nis_map_eviction_keeps_what_waits_and_never_crashes(monkeypatch):
    monkeypatch.setattr(secral, "MAX_NIS_RECORDS", 2)
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1))
    wire.connect("a", "r")
    wire.connect("r", "b")
    mail_id = wire.submit("a", addr(b))         # waits for b's record, then seals
    for i in range(3, 6):                       # more records than the map holds
        wire.run("a", a.learn_record(make_record(key(i), None, 0, 1, int(wire.now) + 999),
                                     wire.now))
    wire.pump()
    assert wire.status("a", mail_id) == "delivered"
    assert len(a.stores.nis) <= 2 + len({r.domain, b.domain})


@pytest.mark.parametrize("host", ["a..b", "-a.b", "fe80::1%eth0", "1.2.3", "x" * 254, "exa mple.org"])
def test_records_with_unusable_hosts_are_refused(host):
    record = key(0).sign({**make_record(key(0), "example.org", 7700, 1, NOW + 100), "host": host})
    with pytest.raises(RemoteError) as err:
        secral.verify_record(record, NOW)
    assert err.value.code == "malformed"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "0x7f.1", "10.1"])
def test_records_cannot_point_at_unroutable_or_disguised_addresses(host):
    record = key(0).sign({**make_record(key(0), "example.org", 7700, 1, NOW + 100), "host": host})
    with pytest.raises(RemoteError):
        secral.verify_record(record, NOW)
    for fine in ("127.0.0.1", "localhost", "::1", "10.0.0.7", "node1.example.org"):
        assert secral.check_host(fine, "host") == fine


# -- PeerSet: dialling, backoff, known peers, peer exchange (5.5) -------------

def test_sender_dials_the_recipient_directly_when_its_record_has_a_host():
    wire = Wire()
    a, r, b = wire.add("a", key(0), port=7700), wire.add("r", key(2)), wire.add("b", key(1), port=7700)
    wire.connect("a", "r")
    a.learn_record(b.record, wire.now)
    mail_id = wire.submit("a", addr(b))
    assert wire.status("a", mail_id) == "delivered"
    assert [d.domain for n, d in wire.dials if n == "a"] == [b.domain]
    assert not r.stores.relay                       # no relay was involved


def test_direct_dial_failure_falls_back_to_relaying():
    wire = Wire()
    a, r, b = wire.add("a", key(0)), wire.add("r", key(2)), wire.add("b", key(1), port=7700)
    wire.connect("a", "r")
    wire.connect("r", "b")
    a.learn_record(b.record, wire.now)
    wire.down.add("b")                              # dialling B fails ...
    mail_id = wire.submit("a", addr(b))
    wire.down.discard("b")
    assert wire.status("a", mail_id) == "delivered"  # ... so R carried it


def test_an_unproven_hello_does_not_hold_up_our_own_mail():
    """A stranger replays h's public record in a hello and never authenticates:
    a must still dial h itself (5.5) -- a claim is not a connection."""
    wire = Wire()
    a, h = wire.add("a", key(0), port=7001), wire.add("h", key(1), port=7002)
    a.learn_record(h.record, wire.now)
    a.connection_made(900, "10.6.6.9", wire.now)
    a.line_received(900, secral.encode_frame(secral.make_hello(h.record, os.urandom(16))), wire.now)
    assert a.peers[900].domain == h.domain and not a.peers[900].verified
    mail_id = wire.submit("a", addr(h))
    assert [d.domain for n, d in wire.dials if n == "a"] == [h.domain]
    assert wire.status("a", mail_id) == "delivered"


def test_a_dial_that_never_reports_back_is_given_up():
    wire = Wire()
    a = wire.add("a", key(0))
    b = wire.add("b", key(1), port=7000)
    a.learn_record(b.record, wire.now)
    a.submit("Default", addr(b), "s", "b", wire.now)     # a dials b for it; the shell
    assert b.domain in a.dialing                # loses the Dial (its thread died)
    wire.advance(secral.DIAL_TIMEOUT + secral.HANDSHAKE_TIMEOUT + 2)
    assert b.domain not in a.dialing and a.backing_off(b.domain, wire.now)


def test_a_peer_closing_a_duplicate_is_not_a_failed_dial():
    wire, a, b = two_nodes()
    wire.connect("b", "a")
    assert not a.dial_backoff and not b.dial_backoff


def test_a_bootstrap_peer_that_dialled_first_is_not_redialled_forever():
    wire = Wire()
    larger, smaller = sorted((key(0), key(1)), key=lambda k: k.domain, reverse=True)
    a = wire.add("a", larger, port=7001)        # a's domain is the larger one, so a
    b = wire.add("b", smaller, listen=("10.0.0.2", 7002))    # duplicate dialled by a loses
    # (b listens but advertises nothing)
    a.config.bootstrap = (("10.0.0.2", 7002),)  # b's address, without its name
    wire.connect("b", "a", Dial("10.0.0.1", 7001, a.domain))   # b dialled first
    wire.advance(60, step=1)
    redials = [d for n, d in wire.dials if n == "a" and (d.host, d.port) == ("10.0.0.2", 7002)]
    assert len(redials) <= 1 and b.domain in a.open


def test_peer_exchange_teaches_addresses_and_the_node_dials_them():
    wire = Wire()
    a = wire.add("a", key(0), port=7000)
    b = wire.add("b", key(1), port=7000)
    c = wire.add("c", key(2), port=7000)
    wire.connect("b", "c")
    wire.connect("a", "b")
    wire.advance(secral.MAINTAIN_SECONDS + 1)
    assert c.domain in a.stores.peers and c.domain in a.open


def test_getpeers_hands_out_current_records():
    wire = Wire()
    a, b, c = wire.add("a", key(0)), wire.add("b", key(1)), wire.add("c", key(2), port=7000)
    wire.connect("b", "c")
    c.config.port = 7001
    wire.run("c", c.refresh_record(wire.now + 1))
    wire.pump()
    wire.connect("a", "b")
    answers = [f for n, conn, f in wire.sent if n == "b" and f["type"] == "peers" and f["records"]]
    assert answers[-1]["records"] == [c.record]


# =============================================================================
# Reputation
# =============================================================================

def test_ban_length_doubles_and_scores_decay():
    rep = secral.Reputation({})
    until = rep.ban("ip:1.2.3.4", NOW)
    assert until == NOW + secral.BAN_SECONDS
    assert rep.ban("ip:1.2.3.4", until) == until + 2 * secral.BAN_SECONDS
    rep.change("domain:x", -30, NOW)
    assert rep.score("domain:x", NOW + 10 * secral.DECAY_SECONDS) == -20
    assert rep.score("domain:x", NOW + 100 * secral.DECAY_SECONDS) == 0
    rep.change("domain:y", 500, NOW)
    assert rep.score("domain:y", NOW) == secral.SCORE_MAX


def test_reputation_persists_through_its_store():
    store = {}
    rep = secral.Reputation(store)
    rep.change("domain:x", -42, NOW)
    rep.ban("ip:9.9.9.9", NOW)
    rep.flush(NOW)
    again = secral.Reputation(store)
    assert again.score("domain:x", NOW) == -42 and again.banned("ip:9.9.9.9", NOW)


def test_address_subjects_group_an_ipv6_site_and_unmap_ipv4():
    assert secral.ip_subject("192.0.2.7") == "ip:192.0.2.7"
    assert secral.ip_subject("::ffff:192.0.2.7") == "ip:192.0.2.7"
    one, other = secral.ip_subject("2001:db8:1:2::5"), secral.ip_subject("2001:0db8:1:2:ffff:1:2:3")
    assert one == other == "ip:2001:db8:1:2::/64"
    assert secral.ip_subject("2001:db8:1:3::5") != one


def test_address_ranges_are_ipv4_slash_24_and_ipv6_slash_48():
    assert secral.address_range("192.0.2.7") == secral.address_range("::ffff:192.0.2.200") == "192.0.2.0/24"
    assert secral.address_range("2001:db8:1:2::5") == secral.address_range("2001:db8:1:ffff::1") == "2001:db8:1::/48"
    assert secral.address_range("2001:db8:2::1") != "2001:db8:1::/48"


def test_a_full_reputation_table_forgets_the_least_telling_subjects_first(monkeypatch):
    monkeypatch.setattr(secral, "MAX_REPUTATION_SUBJECTS", 20)
    store = {}
    rep = secral.Reputation(store)
    rep.ban("ip:10.0.0.1", NOW)                         # ends in an hour
    rep.ban("ip:10.0.0.2", NOW - 3 * 86_400)            # ended: no longer a ban
    rep.change("domain:trusted", 80, NOW)
    for i in range(17):
        rep.change(f"ip:10.1.0.{i}", -1 - i, NOW)
    assert len(rep.entries) == 20
    rep.change("ip:10.2.0.1", -5, NOW)                  # one more: a tenth goes
    assert len(rep.entries) == 19
    assert "ip:10.1.0.0" not in rep.entries and "ip:10.2.0.1" in rep.entries
    assert rep.banned("ip:10.0.0.1", NOW) and rep.score("domain:trusted", NOW) == 80
    for i in range(100):
        rep.change(f"ip:10.3.0.{i}", -50, NOW)
    rep.flush(NOW)
    assert len(rep.entries) <= 20 and len(store) <= 20
    assert rep.banned("ip:10.0.0.1", NOW) and rep.score("domain:trusted", NOW) == 80
    for _ in range(5):                                  # a repeat offender: 16 hours
        rep.ban("ip:10.9.9.9", NOW)
    later = NOW + 3 * 3600                              # its score has decayed back to 0
    for i in range(60):                                 # a flood of fresh one-hour bans
        rep.ban(f"ip:10.4.0.{i}", later)
    assert rep.banned("ip:10.9.9.9", later) and len(rep.entries) <= 20



# =============================================================================
# Stores: SqliteMapping, JsonShelf and batch() on real files
# =============================================================================

@contextlib.contextmanager
def sqlite_mapping(path, synchronous: str = "FULL"):
    """A SqliteMapping that is closed however the test ends."""
    mapping = secral.SqliteMapping(str(path), synchronous)
    try:
        yield mapping
    finally:
        mapping.close()


def json_shelf(path) -> secral.JsonShelf:
    """A JsonShelf as Stores.open makes one (use it in a with: it closes its file)."""
    return secral.JsonShelf(secral.SqliteMapping(str(path)), writeback=False)


def test_sqlite_mapping_is_a_mapping_of_bytes_that_survives_reopening(tmp_path):
    path = tmp_path / "kv.db"
    with sqlite_mapping(path) as m:
        assert len(m) == 0 and list(m) == [] and b"k" not in m
        with pytest.raises(KeyError):
            m[b"k"]
        m[b"b"], m[b"a"], m[b"c"] = b"2", b"1", b"\x00\xff binary"
        m[b"b"] = b"two"                        # a write replaces
        assert len(m) == 3 and b"a" in m and b"z" not in m
        assert list(m) == [b"a", b"b", b"c"]    # in key order
        assert m[b"b"] == b"two" and m[b"c"] == b"\x00\xff binary"
        del m[b"a"]
        with pytest.raises(KeyError):
            del m[b"a"]                         # deleting what is not there is an error
        assert m.get(b"a") is None and m.pop(b"zz", None) is None
    with sqlite_mapping(path) as again:         # every write committed on its own
        assert dict(again.items()) == {b"b": b"two", b"c": b"\x00\xff binary"}


def test_sqlite_mapping_iterates_over_a_snapshot(tmp_path):
    with sqlite_mapping(tmp_path / "kv.db") as m:
        for i in range(5):
            m[b"%d" % i] = b"x"
        visited = []
        for k in m:                             # writing while iterating is safe ...
            visited.append(k)
            m[k + b"+"] = b"y"
        assert visited == [b"0", b"1", b"2", b"3", b"4"]   # ... and sees the keys as they were
        for k in m:
            del m[k]
        assert len(m) == 0


def test_stores_open_gives_each_store_its_durability(tmp_path):
    data_dir = tmp_path / "data"
    stores = Stores.open(str(data_dir))
    try:
        assert os.stat(data_dir).st_mode & 0o777 == 0o700
        for name, synchronous in Stores.DURABILITY.items():
            db = getattr(stores, name).dict.db
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name
            assert db.execute("PRAGMA synchronous").fetchone()[0] == {"FULL": 2, "NORMAL": 1}[synchronous], name
        stores.outbox["m1"] = {"status": "queued"}
    finally:
        stores.close()
    stores.close()                              # a second close does nothing
    stores = Stores.open(str(data_dir))
    try:
        assert stores.outbox["m1"] == {"status": "queued"}
        assert set(os.listdir(data_dir)) >= {f"{name}.db" for name in Stores.DURABILITY}
    finally:
        stores.close()


def test_json_shelf_round_trips_json_and_stores_it_as_json(tmp_path):
    path = tmp_path / "shelf.db"
    value = {"s": "h\u00e9llo \u2603", "n": -12, "f": 1.5, "t": True, "none": None,
             "list": [1, [2, {"x": "y"}]], "big": 2 ** 70}
    with json_shelf(path) as shelf:
        shelf["k\u00e9y"] = value
        shelf["plain"] = "text"
        assert shelf["k\u00e9y"] == value and "k\u00e9y" in shelf and "other" not in shelf
        assert sorted(shelf) == ["k\u00e9y", "plain"] and len(shelf) == 2
        assert shelf.get("other", "default") == "default"
        del shelf["plain"]
        assert list(shelf) == ["k\u00e9y"]
    with json_shelf(path) as shelf:             # reopened: the same values
        assert dict(shelf.items()) == {"k\u00e9y": value}
    with sqlite_mapping(path) as raw:           # on disk: JSON text, not a pickle
        stored = raw["k\u00e9y".encode()]
        assert stored == json.dumps(value, sort_keys=True).encode()
        assert json.loads(stored) == value


def test_json_shelf_hands_out_copies_as_json_would(tmp_path):
    with json_shelf(tmp_path / "shelf.db") as shelf:
        shelf["k"] = {"list": [1], "pair": (1, 2), "ints": {3: "int key"}}
        got = shelf["k"]
        assert got == {"list": [1], "pair": [1, 2], "ints": {"3": "int key"}}   # what JSON can say
        got["list"].append(2)                   # changing a fetched value changes nothing ...
        assert shelf["k"]["list"] == [1]
        shelf["k"] = got                        # ... until it is stored back
        assert shelf["k"]["list"] == [1, 2]


def cyclic() -> list:
    loop: list = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize("make_bad, error", [(lambda: {1, 2}, TypeError), (lambda: b"bytes", TypeError),
                                             (lambda: {"when": object()}, TypeError),
                                             (lambda: {"a": 1, 2: "b"}, TypeError),   # keys JSON cannot sort
                                             (cyclic, ValueError),
                                             (lambda: {"x": float("nan")}, ValueError),  # not JSON
                                             (lambda: [float("inf")], ValueError)],
                         ids=["set", "bytes", "object", "mixed_keys", "cycle", "nan", "infinity"])
def test_json_shelf_refuses_what_json_cannot_hold_and_keeps_the_old_value(tmp_path, make_bad, error):
    bad = make_bad()
    path = tmp_path / "shelf.db"
    with json_shelf(path) as shelf:
        shelf["k"] = {"old": 1}
        with pytest.raises(error, match="JSON serializable|Circular reference|not supported between|not JSON compliant"):
            shelf["k"] = bad
        with pytest.raises(error):
            shelf["new"] = bad
        assert shelf["k"] == {"old": 1} and "new" not in shelf and len(shelf) == 1
    with json_shelf(path) as shelf:
        assert dict(shelf.items()) == {"k": {"old": 1}}


class Crash(BaseException):
    """Not an Exception: what a KeyboardInterrupt or SystemExit looks like to batch()."""


@pytest.mark.parametrize("error", [ValueError, Crash])
def test_an_error_inside_a_batch_rolls_back_every_write_in_it(tmp_path, error):
    path = tmp_path / "shelf.db"
    with json_shelf(path) as shelf, sqlite_mapping(path) as other:
        shelf["kept"], shelf["changed"], shelf["deleted"] = 1, "before", "still here"
        with pytest.raises(error):
            with shelf.batch():
                shelf["new"] = {"x": 1}
                shelf["changed"] = "after"
                del shelf["deleted"]
                assert shelf["changed"] == "after" and "new" in shelf   # this connection sees them ...
                assert other[b"changed"] == b'"before"' and b"new" not in other   # ... no other does
                raise error("crash mid-batch")
        expected = {"kept": 1, "changed": "before", "deleted": "still here"}
        assert dict(shelf.items()) == expected
        shelf["after"] = 2                      # back to one commit per write
        assert other[b"after"] == b"2"
        with pytest.raises(error):              # and the next batch is a transaction again
            with shelf.batch():
                shelf["again"] = 3
                assert b"again" not in other
                raise error("a second crash")
        assert "again" not in shelf
    with json_shelf(path) as shelf:
        assert dict(shelf.items()) == {**expected, "after": 2}


def test_a_successful_batch_commits_all_its_writes_at_once(tmp_path):
    path = tmp_path / "shelf.db"
    with json_shelf(path) as shelf, sqlite_mapping(path) as other:
        shelf["gone"] = 0
        with shelf.batch():
            for i in range(10):
                shelf[f"k{i}"] = i
            del shelf["gone"]
            assert len(other) == 1              # nothing is visible before the COMMIT
        assert len(other) == 10 and b"gone" not in other
    with json_shelf(path) as shelf:
        assert dict(shelf.items()) == {f"k{i}": i for i in range(10)}


def test_a_refused_value_inside_a_batch_undoes_the_batch(tmp_path):
    with json_shelf(tmp_path / "shelf.db") as shelf:
        with pytest.raises(TypeError):
            with shelf.batch():
                shelf["first"] = 1
                shelf["second"] = {1, 2}
        assert "first" not in shelf and len(shelf) == 0


def test_nested_batches_are_one_transaction(tmp_path):
    path = tmp_path / "shelf.db"
    with json_shelf(path) as shelf, sqlite_mapping(path) as other:
        with pytest.raises(ValueError):
            with shelf.batch():
                shelf["outer"] = 1
                with shelf.batch():
                    shelf["inner"] = 2
                assert len(other) == 0          # the inner batch's end is not a commit
                raise ValueError("after the inner batch")
        assert len(shelf) == 0                  # the inner batch's writes went too
        with shelf.batch():
            with shelf.batch():
                shelf["inner"] = 2
            shelf["outer"] = 1
        assert sorted(other) == [b"inner", b"outer"]
        shelf["plain"] = 3                      # autocommit again
        assert b"plain" in other


def test_stores_batch_rolls_back_a_store_on_disk(tmp_path):
    stores = Stores.open(str(tmp_path / "data"))
    try:
        stores.relay["mail/x"] = {"kind": "mail"}
        with pytest.raises(RuntimeError):
            with stores.batch("relay"):         # as Delivery stores an ack and drops its mail
                stores.relay["ack/x"] = {"kind": "ack"}
                del stores.relay["mail/x"]
                raise RuntimeError("crash between the two writes")
        assert dict(stores.relay.items()) == {"mail/x": {"kind": "mail"}}
        with stores.batch("relay"):
            stores.relay["ack/x"] = {"kind": "ack"}
            del stores.relay["mail/x"]
        assert dict(stores.relay.items()) == {"ack/x": {"kind": "ack"}}
    finally:
        stores.close()


def test_writes_from_other_threads_wait_for_a_batch_and_survive_its_rollback(tmp_path):
    with json_shelf(tmp_path / "shelf.db") as shelf:
        done = threading.Event()

        def write():
            shelf["theirs"] = "from a thread"
            done.set()

        thread = threading.Thread(target=write, daemon=True)
        with pytest.raises(ValueError):
            with shelf.batch():
                shelf["mine"] = "rolled back"
                thread.start()
                assert not done.wait(0.3)       # the other thread's write waits for us ...
                raise ValueError("roll back")
        thread.join(10)
        assert done.is_set()                    # ... then lands, outside our transaction
        assert dict(shelf.items()) == {"theirs": "from a thread"}


def test_work_ahead_reads_the_last_commit_without_waiting_for_a_batch(tmp_path):
    """holds_committed answers from a connection of its own (issue 17): while
    another thread holds a batch open it neither waits nor sees the batch's
    writes, and sees them once committed."""
    with json_shelf(tmp_path / "shelf.db") as shelf:
        shelf["old"] = 1
        inside, release, answers = threading.Event(), threading.Event(), []

        def batch() -> None:
            with shelf.batch():
                shelf["new"] = 2
                inside.set()
                release.wait(10)
        writer = threading.Thread(target=batch)
        writer.start()
        assert inside.wait(10)
        asker = threading.Thread(target=lambda: answers.extend(
            [shelf.holds_committed("old"), shelf.holds_committed("new")]))
        asker.start()
        asker.join(10)
        assert answers == [True, False]         # answered while the batch was open
        release.set()
        writer.join(10)
        assert shelf.holds_committed("new") and not shelf.holds_committed("other")


def test_the_line_pipeline_keeps_order_while_work_ahead_finishes_in_any_order(monkeypatch):
    """LinePipeline (issue 17): the core gets one connection's lines in the
    order they came, each read whole and with the reads ready behind it, in
    whatever order their work ahead ends; finish() returns once all are
    delivered; a reader that is AHEAD_BYTES ahead waits."""
    import concurrent.futures
    delivered: list[list[bytes]] = []
    gates = {line: threading.Event() for line in (b"a\n", b"b\n", b"c\n", b"d\n")}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pipeline = secral.LinePipeline(pool, lambda batch: delivered.append([line for line, _ in batch]))

        def work(line: bytes):
            return (lambda: gates[line].wait(10)) if line in gates else None
        pipeline.put([b"a\n", b"b\n"], 1.0, work)
        pipeline.put([b"c\n"], 2.0, work)
        pipeline.put([b"x\n"], 3.0, work)      # no work ahead: waits for the lines before it
        for line in (b"c\n", b"b\n"):        # the later lines are ready first
            gates[line].set()
        time.sleep(0.05)
        assert delivered == []                  # "a" holds everything behind it
        gates[b"a\n"].set()
        pipeline.finish()
        assert [line for batch in delivered for line in batch] == [b"a\n", b"b\n", b"c\n", b"x\n"]
        assert delivered[0][:2] == [b"a\n", b"b\n"]      # one read, one call
        monkeypatch.setattr(secral, "AHEAD_BYTES", 4)
        pipeline.put([b"d\n", b"e\n"], 4.0, work)       # 4 bytes held: the next read waits
        third = threading.Thread(target=pipeline.put, args=([b"f\n"], 5.0, work))
        third.start()
        third.join(0.1)
        assert third.is_alive()
        gates[b"d\n"].set()
        third.join(10)
        pipeline.finish()
        assert [line for batch in delivered for line in batch][-3:] == [b"d\n", b"e\n", b"f\n"]


def test_a_line_pipeline_whose_core_call_fails_loses_no_line_behind_it():
    """A bug or a failed commit in one delivery is logged (its lines were
    never acked: their senders try again); the reads after it still reach
    the core and finish() still returns, so the reader can tell the core
    that the connection is gone."""
    import concurrent.futures
    delivered: list[bytes] = []

    def deliver(batch):
        if batch[0][0] == b"bad\n":
            raise sqlite3.OperationalError("disk I/O error")
        delivered.extend(line for line, _ in batch)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pipeline = secral.LinePipeline(pool, deliver)
        pipeline.put([b"bad\n"], 1.0, lambda line: None)      # delivered at once, and fails
        pipeline.put([b"next\n"], 2.0, lambda line: None)
        pipeline.finish()
    assert delivered == [b"next\n"] and pipeline.held == 0


def test_writes_from_many_threads_all_land(tmp_path):
    path = tmp_path / "shelf.db"
    threads_, per_thread = 8, 40
    errors = []
    with json_shelf(path) as shelf:

        def work(t: int) -> None:
            try:
                for i in range(per_thread):
                    shelf[f"t{t}/{i}"] = {"t": t, "i": i}
                    if i % 10 == 9:
                        with shelf.batch():
                            shelf[f"t{t}/batch{i}"] = [t, i]
                            del shelf[f"t{t}/{i - 1}"]
                    assert shelf[f"t{t}/{i}"] == {"t": t, "i": i}
            except BaseException as exc:            # (a thread's failure must fail the test)
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors and not any(w.is_alive() for w in workers)
    expected = {}
    for t in range(threads_):
        for i in range(per_thread):
            expected[f"t{t}/{i}"] = {"t": t, "i": i}
        for i in range(9, per_thread, 10):
            expected[f"t{t}/batch{i}"] = [t, i]
            del expected[f"t{t}/{i - 1}"]
    with json_shelf(path) as shelf:
        assert dict(shelf.items()) == expected
        assert len(shelf) == len(expected)


@pytest.mark.parametrize("make", ["memory", "disk"])
def test_memory_store_behaves_like_a_shelf_on_disk(tmp_path, make):
    """Simulations run on MemoryStore: it must copy values through JSON as the
    on-disk shelf does, so code that forgets to store back fails in both."""
    with contextlib.ExitStack() as stack:
        store = secral.MemoryStore() if make == "memory" else stack.enter_context(json_shelf(tmp_path / "s.db"))
        store["k"] = {"list": [1], "pair": (1, 2), "ints": {3: "x"}}
        got = store["k"]
        got["list"].append(2)
        assert store["k"] == {"list": [1], "pair": [1, 2], "ints": {"3": "x"}}
        assert store.get("k") == store["k"] and store.get("missing", 7) == 7
        assert dict(store.items()) == {"k": store["k"]} and list(store.values()) == [store["k"]]
        with pytest.raises(TypeError):
            store["bad"] = {1}
        assert "bad" not in store and len(store) == 1
        assert store.pop("k") == {"list": [1], "pair": [1, 2], "ints": {"3": "x"}}
        assert store.pop("k", None) is None and len(store) == 0
        with pytest.raises(KeyError):
            store.pop("k")


# =============================================================================
# Network shell: real sockets on 127.0.0.1
# =============================================================================

def eventually(predicate, timeout: float = 20, interval: float = 0.05):
    """Poll until predicate() is truthy; fail with a clear message after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate.__doc__ or predicate}")
        time.sleep(interval)


class LiveNode:
    """A NodeShell in this process, listening on 127.0.0.1 with port 0."""

    def __init__(self, base, index: int, peers=(), advertise: bool = True, mail: bool = False, **config):
        self.data_dir = os.path.join(str(base), f"node{index}")
        os.makedirs(self.data_dir, exist_ok=True)
        self.identity = seed_key(self.data_dir, index)
        self.domain = self.identity.domain
        self.config = Config(host="127.0.0.1" if advertise else None,
                             bootstrap=tuple(("127.0.0.1", p.port) for p in peers), **config)
        local = ("127.0.0.1", 0) if mail else None
        self.shell = secral.NodeShell(self.data_dir, self.config, ("127.0.0.1", 0), smtp=local, pop3=local,
                                      imap=local, mail_key_source=secral.mail_key_pool(mail_key_files()))
        self.shell.start()
        self.port = self.shell.port
        self.mail_ports = {n: srv.server_address[1] for n, srv in self.shell.mail_servers.items()}

    def __call__(self, cmd: str, **args):
        return secral.call_node(self.data_dir, cmd, args)

    def peer_domains(self) -> set[str]:
        with self.shell.lock:
            return set(self.shell.core.open)

    def address(self, user: str = "Default") -> str:
        return f"{user}@{self.domain}"

    def stop(self) -> None:
        self.shell.stop()


@pytest.fixture
def live(tmp_path):
    """Start LiveNodes; all are stopped at the end of the test."""
    started: list[LiveNode] = []

    def start(index: int, peers=(), **kw) -> LiveNode:
        node = LiveNode(tmp_path, index, peers, **kw)
        started.append(node)
        return node
    yield start
    for node in started:
        node.stop()


SEED_EDGES = secral.SEED_EDGES                  # the seed's network, as the demo builds it


def test_seed_network_carries_mail_through_intermediaries(live):
    """The seven nodes of the seed picture, connected exactly as drawn.  No node
    advertises a host, so nobody can dial around the picture: mail must be relayed."""
    nodes: dict[int, LiveNode] = {}
    for i in range(1, 8):
        neighbours = [nodes[j] for x, y in SEED_EDGES for j in (x, y)
                      if i in (x, y) and j != i and j in nodes]
        nodes[i] = live(10 + i, neighbours, advertise=False)
    for x, y in SEED_EDGES:
        eventually(lambda: nodes[y].domain in nodes[x].peer_domains())
    assert nodes[3].domain not in nodes[5].peer_domains()
    assert nodes[6].domain not in nodes[4].peer_domains()

    secret = {(5, 3): "meet me at the harbour", (4, 6): "the key is under the mat"}
    sent = {}
    for (src, dst), body in secret.items():
        sent[src, dst] = nodes[src]("send", to=nodes[dst].address(), subject=f"from {src}", body=body)["id"]
    for (src, dst), mail_id in sent.items():
        entry = nodes[src]("wait", id=mail_id, timeout=30)
        assert entry["status"] == "delivered", entry
        [mail] = nodes[dst]("inbox")
        assert nodes[dst]("read", id=mail["id"])["body"] == secret[src, dst]
        assert mail["from"] == nodes[src].address()

    # Intermediaries held the mail (they relayed it) but only as ciphertext.
    for i in (1, 2, 7):
        raw = b"".join(read_bytes(os.path.join(nodes[i].data_dir, f))
                       for f in os.listdir(nodes[i].data_dir) if ".db" in f)
        for body in secret.values():
            assert body.encode() not in raw
        assert raw.count(b"from ") == 0
    def saw_mail(i: int) -> bool:
        with nodes[i].shell.lock:
            return any(k.startswith("mail/") for k in nodes[i].shell.core.seen)
    carried = [i for i in (1, 2, 7) if saw_mail(i)]
    assert carried, "no intermediary saw the mail"


def test_node_shell_rejects_forged_mail_and_keeps_serving(live):
    a = live(20)
    b = live(21, [a])
    eventually(lambda: a.domain in b.peer_domains())
    # A raw peer completes a real handshake, then sends a forged mail.
    attacker = RawPeer(a.port, key(22))
    attacker.handshake()
    forged = {**sealed(22, 20, now=int(time.time())), "id": "e" * 32}
    attacker.send({"type": "mail", "hops": 8, "mail": forged})
    attacker.send({"type": "ping"})
    assert attacker.wait_for("pong")
    with a.shell.lock:
        assert a.shell.core.score(key(22).domain, time.time()) == -25
    entry = b("send", to=a.address(), subject="good", body="mail")
    assert b("wait", id=entry["id"], timeout=20)["status"] == "delivered"
    attacker.close()


class RawPeer(secral.WirePeer):
    """A third-party peer on a real socket (secral.WirePeer: the handshake and
    TLS), keeping every frame it receives.  examples/raw_peer.py is the
    same thing written from the spec alone."""

    opened: list["RawPeer"] = []              # closed after each test (see close_raw_peers)

    def __init__(self, port: int, identity: Identity | None, source: str = "127.0.0.1"):
        super().__init__(port, identity, source, pool_mail_key(secral.epoch_of(time.time())))
        self.received: list[dict] = []
        RawPeer.opened.append(self)

    def recv(self) -> dict | None:
        frame = super().recv()
        if frame is not None:
            self.received.append(frame)
        return frame

    def wait_for(self, type: str) -> dict | None:
        while True:
            frame = self.recv()
            if frame is None or frame["type"] == type:
                return frame

    def handshake(self, now: int | None = None) -> dict:
        record = super().handshake(now)         # it waits for the pong that says "open"
        self.peer_record = record
        return {"record": record}


@pytest.fixture(autouse=True)
def close_raw_peers():
    """Every raw peer a test opened is closed after it, whatever the test did."""
    yield
    while RawPeer.opened:
        RawPeer.opened.pop().close()


def test_raw_third_party_peer_delivers_mail_and_gets_a_valid_ack(live):
    a = live(23)
    peer = RawPeer(a.port, key(24))
    hello = peer.handshake()
    mail = seal_mail(key(24), Address("Default", key(24).domain), Address("Default", a.domain),
                            hello["record"]["key"], "from a stranger", "hello", int(time.time()))
    peer.send({"type": "mail", "hops": 8, "mail": mail})
    ack = peer.wait_for("ack")["ack"]
    secral.verify_ack(ack, int(time.time()))
    assert (ack["id"], ack["status"], ack["to"]) == (mail["id"], "delivered", f"Core@{key(24).domain}")
    assert [m["subject"] for m in a("inbox")] == ["from a stranger"]
    peer.close()


# -- the link is private (PROTOCOL.md 8.1, 12.1) ----------------------------------

def tls_pair(tmp_path) -> tuple[secral.TlsLink, secral.TlsLink, socket.socket, socket.socket]:
    """A listener's and a dialler's TlsLink over a socketpair, handshake done."""
    listener_ctx, dialler_ctx = secral.tls_contexts(key(0), str(tmp_path))
    server, client = secral.TlsLink(listener_ctx, True), secral.TlsLink(dialler_ctx, False)
    s_sock, c_sock = socket.socketpair()
    for sock in (s_sock, c_sock):
        sock.settimeout(15)
    done = threading.Thread(target=server.handshake, args=(s_sock,))
    done.start()
    client.handshake(c_sock)
    done.join()
    return server, client, s_sock, c_sock


def test_a_line_that_arrives_with_close_notify_is_still_read(tmp_path):
    """The last frame before a close (an error frame, say) and the TLS
    close_notify often come in one read; the frame must not be lost."""
    server, client, s_sock, c_sock = tls_pair(tmp_path)
    line = b'{"code":"busy","message":"bye","type":"error"}\n'
    try:
        s_sock.sendall(server.encrypt(line) + server.goodbye())
        s_sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c_sock.recv(65536):
            data += chunk
        assert client.receive(data) == line                 # all of it in one read
        assert client.receive(b"") is None                  # and then the end
    finally:
        s_sock.close()
        c_sock.close()


def test_lines_that_come_with_the_last_handshake_flight_are_read_at_once(live, monkeypatch):
    """A dialler may send its first line in the same segment as its TLS
    Finished; the node reads it then, not when more bytes arrive."""
    monkeypatch.setattr(secral, "HANDSHAKE_TIMEOUT", 3)     # a stalled line would end in timeout
    node = live(42)
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=15)
    link = secral.TlsLink(secral.tls_dialler_context(), server_side=False)
    with link.lock:                                         # drive TLS by hand: Finished + a line, one write
        with contextlib.suppress(ssl.SSLWantReadError):
            link.tls.do_handshake()
        sock.sendall(link.outgoing.read())
        while True:
            link.incoming.write(sock.recv(65536))
            try:
                link.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
        link.tls.write(b"this is not json\n")
        sock.sendall(link.outgoing.read())
    lines, frames = secral.LineBuffer(), []
    while not any(f.get("type") == "error" for f in frames):
        data = sock.recv(65536)
        plain = link.receive(data) if data else None
        if plain is None:
            break
        frames += [secral.decode_frame(line) for line in lines.split(plain)[0]]
    assert [f["code"] for f in frames if f["type"] == "error"] == ["not_json"]
    sock.close()


def test_tls_handshakes_count_toward_the_inbound_caps(live, monkeypatch):
    """Connections still in TLS cost the listener a thread and a signature:
    one address gets its share of them and no more (9.3), and a peer that
    trickles its ClientHello gets no more time than one that sends nothing."""
    monkeypatch.setattr(secral, "HANDSHAKE_TIMEOUT", 2)
    node = live(43)
    stalled = [plain_tcp(node.port, 150) for _ in range(node.config.max_inbound_per_ip)]
    eventually(lambda: [subject for subject, _ in node.shell.handshaking.values()] == ["ip:127.0.0.150"] * len(stalled))
    refused = plain_tcp(node.port, 150)
    assert refused.recv(100) == b""                         # closed before TLS
    other = RawPeer(node.port, key(44), source="127.0.0.151")   # another address still gets in
    other.handshake()
    trickle = plain_tcp(node.port, 152)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in bytes.fromhex("16030100c8010000c40303") + bytes(200):
            trickle.sendall(bytes([byte]))
            time.sleep(0.05)
    # The node hung up within its one deadline, though every byte came in time.
    assert trickle.recv(100) == b"" and time.monotonic() - started < 2 * secral.HANDSHAKE_TIMEOUT + 5
    eventually(lambda: not node.shell.handshaking)


def test_a_listener_speaks_tls13_only_and_its_certificate_is_its_domain(live):
    """Any TLS 1.3 client reaches a node; the key in its certificate derives
    its domain (8.1).  Lower versions are refused."""
    node = live(38)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=15)) as tls:
        assert tls.version() == "TLSv1.3"
        der = tls.getpeercert(binary_form=True)
        assert secral.domain_of_key(secral.certificate_key(der)) == node.domain
        assert der == node.identity.certificate
        hello = secral.decode_frame(tls.makefile("rb").readline())
        assert hello["type"] == "hello" and hello["v"] == secral.PROTOCOL_VERSION == 3 and hello["record"]["domain"] == node.domain
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        old.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=15))


def test_openssl_s_client_negotiates_tls13_with_a_node(live, tmp_path):
    """OpenSSL's own client, without SNI: TLS 1.3, and the certificate it
    prints holds the node's key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    node = live(39)
    result = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{node.port}", "-tls1_3",
                             "-noservername", "-showcerts"], input="", capture_output=True, text=True,
                            timeout=60)
    out = result.stdout
    assert "TLSv1.3" in out, out + result.stderr
    pem = out[out.index("-----BEGIN CERTIFICATE-----"):out.index("-----END CERTIFICATE-----") + 25]
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert secral.domain_of_key(secral.certificate_key(der)) == node.domain


def test_the_link_holds_under_full_duplex_load(live):
    """Both sides send big mails at once, as fast as the send pacing allows:
    the reader and the paced writer share one TLS session without a lost
    frame or a dropped link (8.1)."""
    a = live(40)
    b = live(41, [a])
    eventually(lambda: b.domain in a.peer_domains() and a.domain in b.peer_domains())
    with a.shell.lock:
        link = a.shell.core.open[b.domain].conn
    ids: dict[str, list[str]] = {"a": [], "b": []}
    body = "".join(chr(0x41 + i % 26) for i in range(100_000))

    def send_all(name: str, sender: LiveNode, to: LiveNode) -> None:
        for n in range(24):
            ids[name].append(sender("send", to=to.address(), subject=f"{name} {n}", body=body)["id"])
    threads = [threading.Thread(target=send_all, args=args) for args in (("a", a, b), ("b", b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, sender in (("a", a), ("b", b)):
        for mail_id in ids[name]:
            assert sender("wait", id=mail_id, timeout=60)["status"] == "delivered"
    for node, other in ((a, "b"), (b, "a")):
        assert sorted(m["subject"] for m in node("inbox")) == sorted(f"{other} {n}" for n in range(24))
    with a.shell.lock:
        assert a.shell.core.open[b.domain].conn == link        # the same link throughout


# =============================================================================
# Command line: python3 secral.py node as real processes
# =============================================================================

PYTHON = sys.executable
SCRIPT = os.path.join(HERE, "secral.py")


def cli(*args, data_dir: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PYTHON, SCRIPT, *args, "--data-dir", data_dir], input=input,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"secral {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


class NodeProcess:
    """`python3 secral.py node` in a subprocess, on 127.0.0.1 with port 0."""

    def __init__(self, data_dir: str, index: int | None, *extra: str):
        self.data_dir = data_dir
        os.makedirs(data_dir, exist_ok=True)
        if index is not None and not os.path.exists(os.path.join(data_dir, "node.key")):
            seed_key(data_dir, index)
        self.log = open(os.path.join(data_dir, "node.log"), "ab")
        self.proc = subprocess.Popen(
            [PYTHON, SCRIPT, "node", "--json", "--data-dir", data_dir, "--host", "127.0.0.1", "--port", "0",
             "--test-key-pool", mail_key_files(), *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()         # node --json: one line once it runs
        if not line:
            raise AssertionError("node did not start: " + read_text(os.path.join(data_dir, "node.log")))
        self.banner = json.loads(line)
        self.domain = self.banner["domain"]
        self.port = self.banner["listen"][1] if self.banner["listen"] else None
        self.drain = threading.Thread(target=self.proc.stdout.read, daemon=True)
        self.drain.start()

    def address(self, user: str = "Default") -> str:
        return f"{user}@{self.domain}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.drain.join(timeout=5)
        self.proc.stdout.close()
        self.log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def procs():
    started: list[NodeProcess] = []

    def start(*args, **kw) -> NodeProcess:
        proc = NodeProcess(*args, **kw)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        with contextlib.suppress(Exception):
            proc.stop(signal.SIGKILL)


def test_cli_two_processes_end_to_end(procs, tmp_path):
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    a = procs(A, 30)
    b = procs(B, 31, "--peer", f"127.0.0.1:{a.port}")
    assert a.banner["addresses"][0] == f"Core@{a.domain}"
    eventually(lambda: json.loads(cli("peers", "--json", data_dir=A).stdout))
    sent = cli("send", b.address(), "--subject", "hi", "--body", "there", "--wait", "20", data_dir=A)
    assert sent.stdout.startswith("delivered ")
    mail_id = sent.stdout.split()[1]
    inbox = json.loads(cli("inbox", "--json", data_dir=B).stdout)
    assert [(m["id"], m["subject"]) for m in inbox] == [(mail_id, "hi")]
    assert "there" in cli("read", mail_id[:8], data_dir=B).stdout
    # The body may come from standard input.
    piped = cli("send", b.address(), "--subject", "piped", "--wait", "20", data_dir=A, input="line 1\nline 2\n")
    assert piped.stdout.startswith("delivered ")
    assert cli("read", piped.stdout.split()[1], data_dir=B).stdout.endswith("line 1\nline 2\n\n")
    outbox = json.loads(cli("outbox", "--json", data_dir=A).stdout)
    assert [e["status"] for e in outbox] == ["delivered", "delivered"]
    peers = json.loads(cli("peers", "--json", data_dir=B).stdout)
    assert [(p["domain"], p["direction"]) for p in peers] == [(a.domain, "outbound")]
    who = json.loads(cli("whoami", "--json", data_dir=B).stdout)
    assert who["domain"] == b.domain and f"Default@{b.domain}" in who["addresses"]
    # Rejections are reported as such, with a non-zero exit.
    rejected = cli("send", b.address("nobody"), "-s", "x", "-b", "y", "--wait", "20", data_dir=A, check=False)
    assert rejected.returncode == 6 and "no_such_user" in rejected.stdout
    assert a.stop() == 0 and b.stop() == 0
    assert not os.path.exists(os.path.join(A, "control.json"))
    for name in os.listdir(B):                  # nobody else may read the node's files
        if name.endswith(".db"):
            assert os.stat(os.path.join(B, name)).st_mode & 0o077 == 0, name


def test_raw_peer_example_written_from_the_spec_delivers_over_tls(procs, tmp_path):
    """examples/raw_peer.py, the porters' model written from spec/PROTOCOL.md
    alone, is a leaf (8.4): it dials a real `secral.py node` over TLS 1.3,
    seals a mail to Default@<the node's domain> and exits 0 once the node's
    ack says delivered; on its next connection it acks the mail the node
    held for it.  It also passes its own check against spec/vectors/."""
    example = os.path.join(HERE, "examples", "raw_peer.py")
    D = str(tmp_path / "node")
    node = procs(D, 30)
    leaf_dir = str(tmp_path / "leaf")
    os.makedirs(leaf_dir)
    seed_key(leaf_dir, 49)                      # a pool key: the example skips key generation
    leaf_key = os.path.join(leaf_dir, "node.key")

    def raw_peer(*args):
        return subprocess.run([PYTHON, example, *args], capture_output=True, text=True, timeout=120)

    run = raw_peer(f"127.0.0.1:{node.port}", "--key", leaf_key)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().splitlines()[-1].startswith("OK"), run.stdout
    assert "TLSv1.3" in run.stdout and "status 'delivered'" in run.stdout
    leaf = re.search(r"our domain \(5\.1\): (node-[a-z2-7]{24})", run.stdout).group(1)
    mail_id = re.search(r"sealed mail ([0-9a-f]{32})", run.stdout).group(1)
    [got] = json.loads(cli("inbox", "--json", data_dir=D).stdout)
    assert (got["id"], got["from"], got["to"], got["subject"]) == \
        (mail_id, f"Default@{leaf}", node.address(), "Hello from a raw peer")

    # The node learnt the leaf's record from its hello; a mail for the leaf
    # waits for it and is handed over at its next handshake (7.2), and the
    # leaf answers it with an ack (7.4, 8.4).
    cli("send", f"Default@{leaf}", "--subject", "to the leaf", "--body", "hi", data_dir=D)
    again = raw_peer(f"127.0.0.1:{node.port}", "--key", leaf_key)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "mail for us from " + node.address() in again.stdout
    eventually(lambda: [e["status"] for e in json.loads(cli("outbox", "--json", data_dir=D).stdout)]
               == ["delivered"])
    assert len(json.loads(cli("inbox", "--json", data_dir=D).stdout)) == 2

    # Its functions agree with spec/vectors/ (section 11).
    check = raw_peer("--self-test")
    assert check.returncode == 0 and " 0 failed" in check.stdout, check.stdout + check.stderr

    # A bad command line is exit status 2.
    assert raw_peer().returncode == 2


class RecordingProxy:
    """A TCP relay on 127.0.0.1 that forwards to `port` and keeps every byte
    it forwards, each way: what an observer of the link sees."""

    def __init__(self, port: int):
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen = {"up": bytearray(), "down": bytearray()}     # dialler to listener, and back
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
                for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                    threading.Thread(target=self.pump, args=(src, dst, way), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self.lock:
                    self.seen[way] += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def test_an_observer_of_the_link_sees_tls_and_no_name_subject_or_body(procs, tmp_path):
    """Two real node processes, A dialling B through a recording proxy, and a
    mail between users with distinctive names: the proxy sees a TLS 1.3
    handshake each way and none of the users, addresses, domains, subject
    or body (spec 12.1)."""
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    b = procs(B, 36)
    proxy = RecordingProxy(b.port)
    a = procs(A, 37, "--no-listen", "--peer", f"127.0.0.1:{proxy.port}")   # so B cannot dial around it
    cli("users", "add", "Zanzibarine", data_dir=A)
    cli("users", "add", "Quetzalcoatlus", data_dir=B)
    eventually(lambda: b.domain in peers_of(A))
    subject, body = "Obsidian marmalade at dawn", "The walrus knows the second password: hyacinth"
    sent = cli("send", f"Quetzalcoatlus@{b.domain}", "--from", "Zanzibarine", "-s", subject, "-b", body,
               "--wait", "30", data_dir=A)
    assert sent.stdout.startswith("delivered "), sent.stdout
    assert cli("read", sent.stdout.split()[1], data_dir=B).stdout.count(body) == 1
    proxy.close()
    up, down = bytes(proxy.seen["up"]), bytes(proxy.seen["down"])
    assert up[:1] == b"\x16" and up[5] == 0x01           # a TLS record: handshake, ClientHello
    assert down[:1] == b"\x16" and down[5] == 0x02       # ServerHello
    assert b'"type"' not in up + down                    # no frame in the clear
    for secret in ("Zanzibarine", "Quetzalcoatlus", a.domain, b.domain, subject, body,
                   "Obsidian", "walrus", a.domain[5:], b.domain[5:]):
        for form in (secret.encode(), secret.lower().encode(), base64.b64encode(secret.encode())):
            assert form not in up and form not in down, secret


def test_cli_without_a_node_says_so(tmp_path):
    for args in (["inbox"], ["outbox"], ["peers"], ["send", "x@node-" + "a" * 24, "-s", "s", "-b", "b"],
                 ["read", "abcd"], ["nis", "lookup", "node-" + "a" * 24], ["users", "list"]):
        result = cli(*args, data_dir=str(tmp_path / "none"), check=False)
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1 and "no node is running" in result.stderr


def test_whoami_creates_the_identity_offline(tmp_path):
    d = str(tmp_path / "fresh")
    out = json.loads(cli("whoami", "--json", data_dir=d).stdout)
    assert os.stat(os.path.join(d, "node.key")).st_mode & 0o777 == 0o600
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    import hashlib
    private = serialization.load_pem_private_key(read_bytes(os.path.join(d, "node.key")), None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 3072
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    domain = "node-" + base64.b32encode(hashlib.sha256(der).digest()[:15]).decode().lower()
    assert out == {"domain": domain, "addresses": [f"Core@{domain}", f"Default@{domain}"]}


def secral_cli(*args, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """secral.py with exactly these arguments, wherever --data-dir stands; the
    default data directory points nowhere useful, so a misplaced option shows."""
    env = {**os.environ, "SECRAL_HOME": os.path.join(HERE, ".no-such-secral-home")}
    return subprocess.run([PYTHON, SCRIPT, *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_ci_runs_the_readme_test_command(tmp_path):
    """The README's test command is the one CI runs: .ci/run reads it from
    the README, and it installs what the tests import."""
    readme = read_text(os.path.join(HERE, "README.md"))
    shown = re.search(r"<!-- ci: test command -->\n```sh\n(python3 [^\n]+)\n```", readme).group(1)
    fake = tmp_path / "bin"                         # run .ci/run with a bash that only prints
    fake.mkdir()
    (fake / "bash").write_text('#!/bin/sh\n[ "$1" = "-c" ] && { echo "$2" > "$RAN"; exit 0; }\nexec /bin/bash "$@"\n')
    (fake / "bash").chmod(0o755)
    ran = tmp_path / "ran"
    subprocess.run(["/bin/bash", os.path.join(HERE, ".ci", "run")], check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RAN": str(ran)})
    assert ran.read_text().strip() == shown
    assert "python3 -m venv .venv" in shown and "requirements-dev.txt" in shown
    dev = read_text(os.path.join(HERE, "requirements-dev.txt"))
    assert "-r requirements.txt" in dev and "pytest" in dev and "cryptography" in dev


def test_one_node_per_data_directory(procs, tmp_path):
    A = str(tmp_path / "A")
    a = procs(A, 30)
    second = secral_cli("node", "--data-dir", A, "--port", "0", "--host", "127.0.0.1")
    assert f"PID {a.proc.pid}" in one_line_error(second) and "already running" in second.stderr
    assert json.loads(cli("whoami", "--json", data_dir=A).stdout)["domain"] == a.domain   # still served
    a.stop()
    b = procs(A, 30)                                # the lock went with the first node
    assert b.domain == a.domain


def test_common_options_mean_the_same_wherever_they_stand(procs, tmp_path):
    D = str(tmp_path / "D")
    node = procs(D, 32)
    for n, line in enumerate([["--data-dir", D, "users", "add", "U0"], ["users", "--data-dir", D, "add", "U1"],
                              ["users", "add", "--data-dir", D, "U2"], ["users", "add", "U3", "--data-dir", D]]):
        assert secral_cli(*line).stdout.strip() == f"added U{n}@{node.domain}", line
    for n, line in enumerate([["--json", "--data-dir", D, "contacts", "add", "C0", node.address()],
                              ["contacts", "--json", "add", "--data-dir", D, "C1", node.address()],
                              ["contacts", "add", "C2", node.address(), "--data-dir", D, "--json"]]):
        assert json.loads(secral_cli(*line).stdout) == {"name": f"C{n}", "address": node.address()}, line
    assert [c["name"] for c in json.loads(secral_cli("contacts", "--json", "list", "--data-dir", D).stdout)] \
        == ["C0", "C1", "C2"]
    cli("send", node.address("U1"), "-s", "for U1", "-b", "x", data_dir=D)    # a mail makes --force matter
    eventually(lambda: json.loads(cli("inbox", "--json", "--user", "U1", data_dir=D).stdout))
    for line in (["--data-dir", D, "users", "remove", "U1", "--force"], ["users", "--data-dir", D, "remove", "U0"],
                 ["users", "remove", "--force", "U2", "--data-dir", D], ["-v", "users", "remove", "U3", "--data-dir", D]):
        assert secral_cli(*line).stdout.startswith("removed U"), line
    assert [u["name"] for u in json.loads(cli("users", "list", "--json", data_dir=D).stdout)] == ["Default"]
    assert not os.path.exists(os.path.join(HERE, ".no-such-secral-home"))     # nothing went elsewhere


def test_start_up_mistakes_are_one_line_and_name_the_fix(tmp_path):
    d = str(tmp_path / "n")
    os.makedirs(d)
    seed_key(d, 33)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        ("--port", port): "Address already in use",
        ("--port", "70000"): "not a port number",
        ("--port", "-1"): "not a port number",
        ("--host", "999.1.1.1"): "cannot listen on 999.1.1.1",
        ("--port", "0", "--smtp-port", port): "(--smtp-port)",
        ("--port", "0", "--advertise", "0.0.0.0:7700"): "not an address peers can dial",
        ("--port", "0", "--advertise", "example.org:0"): "out of range",
    }
    for extra, message in cases.items():
        result = secral_cli("node", "--data-dir", d, "--host", "127.0.0.1", *extra, timeout=30)
        assert message in one_line_error(result), (extra, result.stderr)
    assert "is a file, not a directory" in one_line_error(secral_cli("inbox", "--data-dir", str(a_file)))
    assert "is a file, not a directory" in one_line_error(secral_cli("node", "--data-dir", str(a_file)))
    busy.close()


def test_ctrl_c_ends_a_waiting_command_quietly_with_130(procs, tmp_path):
    A = str(tmp_path / "A")
    procs(A, 34)
    nobody = f"Default@{key(35).domain}"
    for line in (["send", nobody, "-s", "x", "-b", "y", "--wait", "60"],
                 ["nis", "lookup", key(35).domain, "--timeout", "60"]):
        # SIGINT back to its default: a test run started in the background (bash
        # ignores SIGINT for background jobs) would otherwise pass SIG_IGN on.
        proc = subprocess.Popen([PYTHON, SCRIPT, *line, "--data-dir", A], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(1.5)                             # (the command is waiting by now)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "Traceback" not in err and err.strip() == "", (line, err)


def test_errors_a_script_can_read(procs, tmp_path):
    none = secral_cli("--json", "inbox", "--data-dir", str(tmp_path / "none"))
    assert none.returncode == 3 and json.loads(none.stdout)["error"]["code"] == "not_running"
    A = str(tmp_path / "A")
    a = procs(A, 36)
    missing = secral_cli("read", "abcdef", "--json", "--data-dir", A)
    assert missing.returncode == 4 and json.loads(missing.stdout)["error"]["code"] == "not_found"
    bad = secral_cli("users", "add", "no spaces", "--json", "--data-dir", A)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "bad_address"
    too_long = secral_cli("send", a.address(), "-s", "x" * 300, "-b", "y", "--data-dir", A)
    assert too_long.returncode == 1 and "limit is 256" in one_line_error(too_long)
    with open(os.path.join(A, "control.json")) as f:
        info = json.load(f)
    with open(os.path.join(A, "control.json"), "w") as f:
        json.dump(info | {"token": "0" * 64}, f)
    wrong = secral_cli("status", "--json", "--data-dir", A)
    assert wrong.returncode == 5 and json.loads(wrong.stdout)["error"]["code"] == "unauthorized"
    with open(os.path.join(A, "control.json"), "w") as f:
        json.dump(info, f)
    cli("send", a.address(), "-s", "to myself", "-b", "body", data_dir=A)
    [sent] = json.loads(cli("outbox", "--json", data_dir=A).stdout)
    assert set(sent) == {"id", "folder", "from", "to", "subject", "created", "expires", "status", "reason",
                         "note", "lookups", "last_lookup", "sent", "acked", "submitted_ms", "done_ms",
                         "contact", "key_id"}
    [got] = json.loads(cli("inbox", "--json", data_dir=A).stdout)
    assert got["user"] == "Default"                 # the name as the user wrote it


def test_the_outbox_says_why_and_mail_can_be_withdrawn_or_deleted(procs, tmp_path):
    A = str(tmp_path / "A")
    a = procs(A, 37)
    nobody = f"Default@{key(38).domain}"
    queued = cli("send", nobody, "-s", "to nobody", "-b", "x", data_dir=A).stdout     # says so at once
    assert queued.startswith("queued ") and "waiting for the recipient's key: NIS not found \u00d71" in queued
    mail_id = queued.split()[1]
    listing = cli("outbox", data_dir=A).stdout
    assert "NIS not found" in listing and max(len(line) for line in listing.splitlines()) <= 100
    withdrawn = json.loads(cli("outbox", "cancel", mail_id[:8], "--json", data_dir=A).stdout)
    assert (withdrawn["id"], withdrawn["status"]) == (mail_id, "cancelled")
    again = cli("outbox", "cancel", mail_id, data_dir=A, check=False)
    assert again.returncode == 1 and "nothing to withdraw" in again.stderr
    # A sent mail can be read; a received one deleted on its own.
    own = json.loads(cli("send", a.address(), "-s", "note to self", "-b", "kept", "--json", data_dir=A).stdout)
    other = json.loads(cli("send", a.address(), "-s", "second", "-b", "also", "--json", data_dir=A).stdout)
    assert "Status:  cancelled" in cli("read", mail_id, data_dir=A).stdout
    assert "kept" in cli("read", own["id"], data_dir=A).stdout
    assert "deleted" in cli("inbox", "delete", own["id"][:6], data_dir=A).stdout
    assert [m["id"] for m in json.loads(cli("inbox", "--json", data_dir=A).stdout)] == [other["id"]]
    assert json.loads(cli("read", own["id"], "--json", data_dir=A).stdout)["folder"] == "sent"
    assert json.loads(cli("read", other["id"], "--json", data_dir=A).stdout)["folder"] == "inbox"


def test_logs_never_hold_a_subject_or_a_body(procs, tmp_path):
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    a = procs(A, 39)
    b = procs(B, 40, "--peer", f"127.0.0.1:{a.port}", "-v")
    eventually(lambda: peers_of(B))
    subject, body = "Quarterly figures for Ingrid", "The vault code is 7731"
    assert cli("send", a.address(), "-s", subject, "-b", body, "--wait", "20", data_dir=B).returncode == 0
    eventually(lambda: json.loads(cli("inbox", "--json", data_dir=A).stdout))
    cli("read", json.loads(cli("inbox", "--json", data_dir=A).stdout)[0]["id"], data_dir=A)
    a.stop()
    b.stop()
    for d in (A, B):
        log_text = read_text(os.path.join(d, "node.log"))
        assert "mail " in log_text or d == B
        assert "Quarterly" not in log_text and "vault" not in log_text, d


def test_help_and_first_start_say_what_is_happening(tmp_path):
    bare = secral_cli()
    assert bare.returncode == 2 and "usage: secral.py" in bare.stdout and "exit status:" in bare.stdout
    users = secral_cli("users", "--help")
    assert all(f"    {action} " in users.stdout for action in ("list", "add", "remove"))
    assert "--timeout" in secral_cli("nis", "lookup", "--help").stdout
    fresh = secral_cli("whoami", "--data-dir", str(tmp_path / "fresh"))
    assert "generating the node key (RSA-3072)" in fresh.stderr
    assert f"created a new identity in {tmp_path / 'fresh'}" in fresh.stderr
    assert "created" not in secral_cli("whoami", "--data-dir", str(tmp_path / "fresh")).stderr


def test_people_read_times_with_their_zone_counts_in_words_and_ambiguity_spelt_out():
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \S+", secral.when(NOW))
    assert (secral.plural(1, "peer"), secral.plural(2, "peer")) == ("1 peer", "2 peers")
    entries = [(f"k{n}", {"id": f"abcd{n}" + "0" * 27}) for n in range(3)]
    with pytest.raises(LocalError, match=r"ambiguous: 3 mails match \(abcd00000000, abcd10000000, abcd20000000\)"):
        secral.find_by_prefix(entries, "abcd", "mail")
    assert secral.find_by_prefix(entries, "ABCD1", "mail")[0] == "k1"


# =============================================================================
# Store and forward with real processes (offline recipients, clocks, crashes)
# =============================================================================

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(data_dir: str) -> dict:
    return json.loads(cli("status", "--json", data_dir=data_dir).stdout)


def outbox(data_dir: str) -> dict[str, str]:
    return {e["id"]: e["status"] for e in json.loads(cli("outbox", "--json", data_dir=data_dir).stdout)}


def peers_of(data_dir: str) -> set[str]:
    return {p["domain"] for p in json.loads(cli("peers", "--json", data_dir=data_dir).stdout)}


def introduce(b_dir: str, r, index: int, procs, *extra) -> str:
    """Start B once so that R learns its record, then stop it: B is 'offline'."""
    b = procs(b_dir, index, "--no-listen", "--peer", f"127.0.0.1:{r.port}", *extra)
    eventually(lambda: r.domain in peers_of(b_dir))
    b.stop()
    return b.domain


def test_relay_keeps_mail_for_an_offline_recipient(procs, tmp_path):
    A, R, B = (str(tmp_path / n) for n in "ARB")
    r = procs(R, 40)
    b_domain = introduce(B, r, 41, procs)
    a = procs(A, 42, "--peer", f"127.0.0.1:{r.port}")
    eventually(lambda: r.domain in peers_of(A))
    sent = cli("send", f"Default@{b_domain}", "-s", "while you were out", "-b", "stored at R",
               "--wait", "3", data_dir=A, check=False)
    assert sent.returncode == 7 and "waiting for the recipient's ack" in sent.stdout
    mail_id = re.search(r"\b[0-9a-f]{32}\b", sent.stdout).group(0)
    assert outbox(A) == {mail_id: "sent"}
    eventually(lambda: status(R)["relay"]["mail"] == 1)
    a.stop()                                     # the sender goes away
    procs(B, 41, "--no-listen", "--peer", f"127.0.0.1:{r.port}")   # the recipient returns
    inbox = eventually(lambda: json.loads(cli("inbox", "--json", data_dir=B).stdout))
    assert [(m["id"], m["subject"]) for m in inbox] == [(mail_id, "while you were out")]
    eventually(lambda: status(R)["relay"]["mail"] == 0)
    procs(A, 42)                                 # the sender restarts, without --peer
    eventually(lambda: outbox(A) == {mail_id: "delivered"}, timeout=30)


def test_a_day_offline_is_fine_but_past_the_ttl_is_expired(procs, tmp_path):
    A, R, B = (str(tmp_path / n) for n in "ARB")
    clock = str(tmp_path / "clock")                     # every node adds this many seconds
    with open(clock, "w") as f:
        f.write("0")
    r = procs(R, 43, "--clock-file", clock)
    b_domain = introduce(B, r, 44, procs, "--clock-file", clock)
    a = procs(A, 45, "--peer", f"127.0.0.1:{r.port}", "--clock-file", clock)
    eventually(lambda: r.domain in peers_of(A))
    keep = cli("send", f"Default@{b_domain}", "-s", "a day later", "-b", "x", "--json", data_dir=A)
    lost = cli("send", f"Default@{b_domain}", "-s", "too late", "-b", "y", "--ttl", "3600", "--json", data_dir=A)
    keep, lost = json.loads(keep.stdout)["id"], json.loads(lost.stdout)["id"]
    eventually(lambda: status(R)["relay"]["mail"] == 2)
    a.stop()
    with open(clock, "w") as f:                         # 24 hours pass, no sleeping
        f.write(str(24 * 3600))
    eventually(lambda: status(R)["relay"]["mail"] == 1)   # R purged the mail past its TTL
    assert status(R)["time"] > time.time() + 86000
    procs(B, 44, "--no-listen", "--peer", f"127.0.0.1:{r.port}", "--clock-file", clock)
    eventually(lambda: [m["subject"] for m in json.loads(cli("inbox", "--json", data_dir=B).stdout)] == ["a day later"])
    procs(A, 45, "--clock-file", clock)
    eventually(lambda: outbox(A) == {keep: "delivered", lost: "expired"}, timeout=30)


def test_a_relay_killed_in_the_middle_of_a_group_commit_forwarded_nothing_it_had_not_stored(procs, tmp_path):
    """Group commit (issue 17): the frames of one read are committed together,
    and what they cause is sent only after the commit.  So whatever the
    relay had forwarded when it was killed -9 mid-stream is in its store
    when it comes back."""
    R = str(tmp_path / "R")
    relay = procs(R, 60, "--send-rate", "100000")     # forward at once: no pacing hides the order
    pusher, sink = RawPeer(relay.port, key(61)), RawPeer(relay.port, key(62), source="127.0.0.2")
    pusher.handshake()
    sink.handshake()                            # the target: the relay forwards to it at once (7.2)
    mails = [seal_mail(key(61), Address("Default", key(61).domain), Address("Default", key(62).domain),
                              key(62).public_b64, f"burst {n}", "x", now_int()) for n in range(150)]
    forwarded: list[str] = []

    def receive() -> None:                      # the sink never acks: the relay keeps every mail
        with contextlib.suppress(OSError):
            while (frame := sink.recv()) is not None:
                if frame["type"] == "mail":
                    forwarded.append(frame["mail"]["id"])

    def push() -> None:
        with contextlib.suppress(OSError):
            for mail in mails:
                pusher.send({"type": "mail", "hops": 8, "mail": mail})
    threads = [threading.Thread(target=receive, daemon=True), threading.Thread(target=push, daemon=True)]
    for t in threads:
        t.start()
    eventually(lambda: len(forwarded) >= 20, interval=0.001)
    relay.kill()                                # mid-stream, mid-batch
    seen_by_sink = set(forwarded)
    assert 20 <= len(seen_by_sink) < len(mails)
    relay = procs(R, None, "--send-rate", "100000")
    held = {k.rsplit("/", 1)[1] for k in status(R)["relay"]["keys"] if k.startswith("mail/")}
    assert seen_by_sink <= held                 # nothing was forwarded before its commit
    assert held <= {m["id"] for m in mails}


def test_no_mail_is_lost_when_relay_and_recipient_are_killed(procs, tmp_path):
    A, R, B = (str(tmp_path / n) for n in "ARB")
    port = free_port()
    relay = ["--port", str(port)]
    r = procs(R, 46, *relay)
    b_args = ("--no-listen", "--peer", f"127.0.0.1:{port}")
    b = procs(B, 47, *b_args)
    a = procs(A, 48, "--peer", f"127.0.0.1:{port}")
    eventually(lambda: r.domain in peers_of(A) and r.domain in peers_of(B))
    ids: list[str] = []
    done = threading.Event()

    def sender():
        for n in range(24):
            result = cli("send", b.address(), "-s", f"mail {n}", "-b", f"body {n}", "--json", data_dir=A,
                         check=False)
            if result.returncode == 0:
                ids.append(json.loads(result.stdout)["id"])
            time.sleep(0.15)
        done.set()
    thread = threading.Thread(target=sender)
    thread.start()
    for cycle in range(3):                              # kill -9 R and B, several times, mid-stream
        time.sleep(0.6)
        r.kill()
        r = procs(R, 46, *relay)
        time.sleep(0.6)
        b.kill()
        b = procs(B, 47, *b_args)
    thread.join()
    assert len(ids) == 24
    eventually(lambda: set(outbox(A).values()) == {"delivered"}, timeout=150, interval=1)
    inbox = json.loads(cli("inbox", "--json", data_dir=B).stdout)
    assert sorted(m["id"] for m in inbox) == sorted(ids)        # each exactly once
    assert sorted(m["subject"] for m in inbox) == sorted(f"mail {n}" for n in range(24))


# -- forward secrecy: epoch mail keys (spec 5.6), with a moved clock --------------

def test_no_valid_mail_can_be_sealed_to_a_deleted_mail_key():
    """Spec 5.6: whatever the clocks, a mail sealed to epoch e's key expires
    before the key is deleted: sealed earliest 1,200 s before e (a sender
    whose clock is behind takes the next epoch's key), latest in e's last
    second, and living at most MAX_TTL; the recipient's clock may be the
    tolerance behind."""
    W = secral.MAIL_KEY_EPOCH
    for e in (0, 2976, 10**6):
        for created in (e * W - secral.CLOCK_TOLERANCE, e * W, (e + 1) * W - 1):
            assert created + secral.MAX_TTL + secral.CLOCK_TOLERANCE <= secral.mail_key_deletion(e)
    record = make_record(key(0), None, 0, 1, NOW + secral.RECORD_LIFETIME, now=NOW)
    for now in range(NOW, NOW + secral.RECORD_LIFETIME, 3600):   # a valid record always has a key
        assert secral.mail_key_for(record, now)["epoch"] == secral.epoch_of(now)


def set_clock(path: str, at: float, *running: str) -> float:
    """Move every node on this clock file to Unix time `at` (no sleeping),
    and wait until the nodes `running` (data directories) have read it."""
    with open(path, "w") as f:
        f.write(str(int(at - time.time())))
    for data_dir in running:
        eventually(lambda: status(data_dir)["time"] >= at - 2)
    return at


def key_material(identity: Identity) -> list[bytes]:
    """What would betray a private key in a file: its private exponent and
    primes (raw, big-endian), its DER, and the lines of its PEM past the
    modulus (which the public key shares)."""
    numbers = [identity.key.d, identity.key.p, identity.key.q]
    raw = [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in numbers]
    pem = identity.to_pem().decode().splitlines()[1:-1]
    return raw + [identity.key.export_key(format="DER", pkcs=8)] + [line.encode() for line in pem[10:]]


def files_holding(directory: str, secrets: list[bytes]) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            data = read_bytes(os.path.join(root, name))
            found += [os.path.join(root, name) for secret in secrets if secret in data]
    return found


def listed_key(record: dict, epoch: int) -> Identity:
    """The pool mail key a node listed for `epoch` (its private half, known to the test)."""
    [public] = [k["key"] for k in record["mail_keys"] if k["epoch"] == epoch]
    return next(pool_mail_key(e) for e in range(MAIL_KEY_POOL) if pool_mail_key(e).public_b64 == public)


def test_a_mail_key_opens_mail_until_its_deletion_and_is_then_in_no_file(procs, tmp_path):
    """Spec 5.6, 12.4: a mail sealed at the very end of epoch E, held while
    its recipient is away, opens when the recipient is back just before E's
    key is deleted; at the deletion time the key's private half is gone from
    every file under the data directory; a mail then sealed to it (by a
    sender with a stale record and a fresh `created`) is answered with a
    rejected ack that says `retired_key`, and one sealed to a key B never
    had with `unknown_key`."""
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    clock = str(tmp_path / "clock")
    set_clock(clock, time.time())
    a = procs(A, 70, "--clock-file", clock)
    b = procs(B, 71, "--peer", f"127.0.0.1:{a.port}", "--clock-file", clock)
    epoch = secral.epoch_of(time.time())
    eventually(lambda: len(status(B)["mail_keys"]["listed"]) >= 5)     # made ahead, record re-signed
    record = eventually(lambda: (r := json.loads(cli("nis", "lookup", b.domain, "--json", data_dir=A).stdout))
                        and len(r["mail_keys"]) >= 5 and r)
    secret = listed_key(record, epoch)
    b.stop()
    set_clock(clock, (epoch + 1) * secral.MAIL_KEY_EPOCH - 30, A)      # the last 30 s of epoch E
    sent = json.loads(cli("send", b.address(), "-s", "end of E", "-b", "sealed in E", "--json", data_dir=A).stdout)
    assert sent["key_id"] == secral.mail_key_id(secret.public_b64)
    deletion = secral.mail_key_deletion(epoch)
    set_clock(clock, sent["expires"] - 60)      # B is back in the mail's last minute
    b = procs(B, 71, "--peer", f"127.0.0.1:{a.port}", "--clock-file", clock)
    eventually(lambda: outbox(A)[sent["id"]] == "delivered", timeout=30)
    assert "sealed in E" in cli("read", sent["id"][:8], data_dir=B).stdout
    assert epoch in status(B)["mail_keys"]["held"] and files_holding(B, key_material(secret))

    now = set_clock(clock, deletion + 1, A, B)
    eventually(lambda: epoch not in status(B)["mail_keys"]["held"])
    assert f"{epoch}.pem" not in os.listdir(os.path.join(B, "mail-keys"))
    assert files_holding(B, key_material(secret)) == []

    peer = RawPeer(b.port, key(72))
    peer.handshake(now=int(now))
    stale = sealed_raw(72, 71, {"subject": "stale", "body": "x"}, now=int(now), mail_key=secret)
    never = sealed_raw(72, 71, {"subject": "never", "body": "y"}, now=int(now), mail_key=key(73))
    for mail in (stale, never):
        peer.send({"type": "mail", "hops": 8, "mail": mail})
    acks = {}
    while len(acks) < 2 and (frame := peer.recv()) is not None:
        if frame["type"] == "ack":
            acks[frame["ack"]["id"]] = (frame["ack"]["status"], frame["ack"]["reason"])
    assert acks == {stale["id"]: ("rejected", "retired_key"), never["id"]: ("rejected", "unknown_key")}
    peer.close()


def test_a_node_offline_for_its_records_lifetime_reads_what_is_still_valid(procs, tmp_path):
    """Spec 5.6: B's record lists a mail key for every epoch of its 30 days.
    B goes away for all of them; A seals a mail late in each epoch, to that
    epoch's key.  B comes back just before its record expires: every mail
    still alive opens, each with its own epoch's key; the older ones had
    expired (7 days is the longest a mail lives), and B had deleted their
    keys, which is the point."""
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    clock = str(tmp_path / "clock")
    set_clock(clock, time.time())
    a = procs(A, 74, "--clock-file", clock)
    b = procs(B, 75, "--peer", f"127.0.0.1:{a.port}", "--clock-file", clock)
    record = eventually(lambda: (r := json.loads(cli("nis", "lookup", b.domain, "--json", data_dir=A).stdout))
                        and r["expires"] - time.time() > secral.RECORD_LIFETIME - 600 and r)
    b.stop()
    expires, sent = record["expires"], {}
    for entry in record["mail_keys"]:          # late in each epoch, or just before B returns
        at = set_clock(clock, min((entry["epoch"] + 1) * secral.MAIL_KEY_EPOCH - 60, expires - 3600), A)
        out = json.loads(cli("send", b.address(), "-s", f"epoch {entry['epoch']}", "-b", "x", "--json",
                             data_dir=A).stdout)
        assert out["key_id"] == secral.mail_key_id(entry["key"])
        sent[out["id"]] = (entry["epoch"], at)
    back = set_clock(clock, expires - 600)
    procs(B, 75, "--peer", f"127.0.0.1:{a.port}", "--clock-file", clock)
    alive = {i for i, (_, at) in sent.items() if at + secral.MAX_TTL > back}
    assert len({sent[i][0] for i in alive}) >= 2          # mail sealed to two epoch keys, at least
    eventually(lambda: outbox(A) == {i: "delivered" if i in alive else "expired" for i in sent}, timeout=60)
    inbox = json.loads(cli("inbox", "--json", data_dir=B).stdout)
    assert sorted(m["subject"] for m in inbox) == sorted(f"epoch {sent[i][0]}" for i in alive)
    held = status(B)["mail_keys"]["held"]
    assert all(secral.mail_key_deletion(e) > back for e in held)
    assert {sent[i][0] for i in alive} <= set(held)


def test_a_node_that_lost_its_mail_keys_refuses_mail_to_them_and_the_sender_is_told(procs, tmp_path):
    """Spec 6.3, 7.4: B restored without mail-keys/ (as 12.4 advises for
    backups) cannot open mail sealed to its old keys; it says unknown_key,
    never tries another key, and A's outbox and inbox (a bounce) show it."""
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    a = procs(A, 76)
    b = procs(B, 77, "--peer", f"127.0.0.1:{a.port}")
    eventually(lambda: b.domain in peers_of(A))
    old_seq = json.loads(cli("nis", "lookup", b.domain, "--json", data_dir=A).stdout)["seq"]
    b.stop()
    sent = json.loads(cli("send", b.address(), "-s", "to the old key", "-b", "x", "--json", data_dir=A).stdout)
    shutil.rmtree(os.path.join(B, "mail-keys"))
    fresh = str(tmp_path / "fresh")              # other keys than the ones B lost
    for n in range(78, 84):
        secral.save_identity(key(n), os.path.join(fresh, f"{n}.pem"))
    b = procs(B, 77, "--peer", f"127.0.0.1:{a.port}", "--test-key-pool", fresh)
    eventually(lambda: outbox(A)[sent["id"]] == "rejected", timeout=30)
    # B's record listed the keys it lost: it signs a new one at once, and new mail opens.
    eventually(lambda: json.loads(cli("nis", "lookup", b.domain, "--json", data_dir=A).stdout)["seq"]
               > old_seq)
    again = json.loads(cli("send", b.address(), "-s", "to the new key", "-b", "y", "--json", data_dir=A).stdout)
    eventually(lambda: outbox(A)[again["id"]] == "delivered", timeout=30)
    entry = json.loads(cli("outbox", "--json", data_dir=A).stdout)[0]
    assert entry["reason"] == "unknown_key"
    bounce = [m for m in json.loads(cli("inbox", "--json", data_dir=A).stdout) if m["from"].startswith("Core@")]
    assert len(bounce) == 1 and bounce[0]["subject"] == "Undelivered: to the old key"
    assert [m["subject"] for m in json.loads(cli("inbox", "--json", data_dir=B).stdout)] == ["to the new key"]


# =============================================================================
# NIS over real sockets
# =============================================================================

def test_nis_lookup_along_a_chain_of_five_despite_a_forger(live, tmp_path):
    """N0 - N1 - N2 - N3 - N4: N0 asks for N4's record, four hops away, while a
    peer of N0 answers first with forgeries.  No node advertises an address,
    so the chain stays a chain and records spread only through lookups."""
    chain: list[LiveNode] = []
    for i in range(5):
        chain.append(live(50 + i, chain[-1:], advertise=False))
    for x, y in zip(chain, chain[1:]):
        eventually(lambda: x.domain in y.peer_domains())
    asker, owner = chain[0], chain[-1]
    with asker.shell.lock:
        assert asker.shell.core.known_record(owner.domain, time.time()) is None

    forger = RawPeer(asker.port, key(56), source="127.0.0.2")
    forger.handshake()
    forgeries = []

    def forge():
        """Answer every query at once: a record signed by the forger for the
        asked domain, then one whose key does not derive the domain."""
        while (frame := forger.recv()) is not None:
            if frame["type"] == "nis_query":
                now = int(time.time())
                wrong_key = make_record(key(56), "127.0.0.1", 1, 2**40, now + 600)
                for bad in (key(56).sign({**wrong_key, "domain": frame["domain"]}),
                            {**owner.shell.core.record, "host": "127.0.0.66"}):
                    forger.send({"type": "nis_answer", "qid": frame["qid"], "record": bad})
                    forgeries.append(bad)
    threading.Thread(target=forge, daemon=True).start()
    result = cli("nis", "lookup", owner.domain, "--json", "--timeout", "15", data_dir=asker.data_dir)
    record = json.loads(result.stdout)
    assert record["domain"] == owner.domain and record["key"] == owner.identity.public_b64
    assert record["seq"] <= owner.shell.core.record["seq"]   # (it re-signs as its mail keys are made)
    assert len(forgeries) == 2
    with asker.shell.lock:                  # one answer per peer asked: one forgery scored
        assert asker.shell.core.score(key(56).domain, time.time()) == \
            secral.REPUTATION_EVENTS["forged_record"][0]
    text = cli("nis", "lookup", owner.domain, data_dir=asker.data_dir).stdout
    assert f"domain   {owner.domain}" in text and "key      sha256:" in text
    missing = cli("nis", "lookup", "node-" + "a" * 24, "--timeout", "1", data_dir=asker.data_dir, check=False)
    assert missing.returncode == 4 and "no NIS record" in missing.stderr
    forger.close()


def test_restarted_node_rejoins_the_peers_it_knew(live, tmp_path):
    a = live(57)
    b = live(58, [a])
    eventually(lambda: a.domain in b.peer_domains())
    b.stop()
    again = LiveNode(tmp_path, 58)          # the same directory, no --peer
    try:
        eventually(lambda: a.domain in again.peer_domains())
    finally:
        again.stop()


# =============================================================================
# Local users and contacts
# =============================================================================

def test_users_and_contacts_on_real_nodes(procs, tmp_path):
    A, B = str(tmp_path / "A"), str(tmp_path / "B")
    a = procs(A, 60)
    b = procs(B, 61, "--peer", f"127.0.0.1:{a.port}")
    eventually(lambda: peers_of(B))
    assert "added alice@" in cli("users", "add", "alice", data_dir=B).stdout
    for bad, message in [("alice", "exists"), ("ALICE", "exists"), ("Core", "system user"),
                         ("no spaces", "1-64 of"), (".dot", "1-64 of")]:
        result = cli("users", "add", bad, data_dir=B, check=False)
        assert result.returncode == 1 and message in result.stderr, (bad, result.stderr)
    users = json.loads(cli("users", "list", "--json", data_dir=B).stdout)
    assert [u["name"] for u in users] == ["alice", "Default"]

    # A keeps an address book; the contact name stands for the address.
    cli("contacts", "add", "Al", f"alice@{b.domain}", data_dir=A)
    for bad_args, message in [(["Al", f"x@{b.domain}"], "exists"), (["bob", "not-an-address"], "is not user@"),
                              (["x@y", f"x@{b.domain}"], "contact name"), (["bob", "bob@node-123"], "node- domain")]:
        result = cli("contacts", "add", *bad_args, data_dir=A, check=False)
        assert result.returncode == 1 and message in result.stderr, (bad_args, result.stderr)
    assert "delivered" in cli("send", "Al", "-s", "for alice", "-b", "1", "--wait", "20", data_dir=A).stdout
    assert "delivered" in cli("send", b.address(), "-s", "for default", "-b", "2", "--wait", "20", data_dir=A).stdout
    unknown = cli("send", "Nobody", "-s", "x", "-b", "y", data_dir=A, check=False)
    assert unknown.returncode == 4 and "neither an address nor a contact" in unknown.stderr

    def subjects(user):
        return [m["subject"] for m in json.loads(cli("inbox", "--user", user, "--json", data_dir=B).stdout)]
    assert subjects("alice") == ["for alice"] and subjects("Default") == ["for default"]
    assert subjects("ALICE") == ["for alice"]
    # B names A in its own address book: the inbox shows who is known.
    cli("contacts", "add", "Anna", a.address(), data_dir=B)
    listing = cli("inbox", data_dir=B).stdout
    assert "Anna" in listing and a.address()[:20] not in listing
    cli("contacts", "remove", "Anna", data_dir=B)
    assert a.address()[:20] in cli("inbox", data_dir=B).stdout

    # Removing a user with mail needs --force; afterwards its mail is rejected.
    refused = cli("users", "remove", "alice", data_dir=B, check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert "removed alice (1 mail)" in cli("users", "remove", "alice", "--force", data_dir=B).stdout
    late = cli("send", "Al", "-s", "too late", "-b", "3", "--wait", "20", data_dir=A, check=False)
    assert late.returncode == 6 and "no_such_user" in late.stdout
    statuses = {e["subject"]: (e["status"], e["reason"]) for e in json.loads(cli("outbox", "--json", data_dir=A).stdout)}
    assert statuses["too late"] == ("rejected", "no_such_user")
    assert cli("users", "remove", "Core", data_dir=B, check=False).returncode == 1

    # Users and contacts survive a restart.
    cli("users", "add", "carol", data_dir=B)
    assert "password set for carol" in cli("passwd", "carol", data_dir=B, input="carol-secret\n").stdout
    short = cli("passwd", "carol", data_dir=B, input="abc\n", check=False)
    assert short.returncode == 1 and "at least 8" in short.stderr
    b.stop()
    a.stop()
    procs(B, 61)
    procs(A, 60)
    assert [u["name"] for u in json.loads(cli("users", "list", "--json", data_dir=B).stdout)] == ["carol", "Default"]
    assert json.loads(cli("contacts", "list", "--json", data_dir=A).stdout) == [{"name": "Al", "address": f"alice@{b.domain}"}]


# =============================================================================
# Hostile input: a node under attack keeps serving honest peers
# =============================================================================

@pytest.fixture
def no_crashes():
    """Fail the test if any thread dies or the node logs an unexpected error."""
    import logging
    problems: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            problems.append(self.format(record))
    handler = Catch(level=logging.ERROR)
    logger = logging.getLogger("secral")
    logger.addHandler(handler)
    old_hook = threading.excepthook
    threading.excepthook = lambda args: problems.append(f"thread died: {args.exc_value!r}")
    yield problems
    logger.removeHandler(handler)
    threading.excepthook = old_hook
    assert problems == []


class Attacker(RawPeer):
    """A hostile peer with its own key and its own loopback address."""

    def __init__(self, port: int, index: int, key_index: int | None = None):
        super().__init__(port, None, source=f"127.0.0.{index}")
        self.sock.settimeout(15)
        self.ip = f"127.0.0.{index}"
        self.key_index = index if key_index is None else key_index
        self.sock.settimeout(15)

    @property
    def identity(self) -> Identity:             # only attackers that shake hands need a key
        return key(self.key_index)

    def raw(self, data: bytes) -> None:
        self.send_bytes(data)

    def closed_by_peer(self) -> bool:
        """Read until the node hangs up (True) or goes quiet for a while (False)."""
        try:
            while self.recv() is not None:
                pass
            return True
        except (socket.timeout, OSError):
            return False


def score_of(node: LiveNode, subject: str) -> int:
    with node.shell.lock:
        return node.shell.core.reputation.score(subject, int(time.time()))


def banned(node: LiveNode, subject: str) -> bool:
    with node.shell.lock:
        return node.shell.core.reputation.banned(subject, int(time.time()))


@pytest.fixture
def target(live, no_crashes):
    """A node under attack and an honest peer that keeps sending it mail."""
    t = live(70)
    honest = live(71, [t])
    eventually(lambda: t.domain in honest.peer_domains())
    counter = iter(range(10**6))

    def honest_mail_arrives() -> bool:
        entry = honest("send", to=t.address(), subject=f"honest {next(counter)}", body="still here")
        return honest("wait", id=entry["id"], timeout=20)["status"] == "delivered"
    t.honest_mail_arrives = honest_mail_arrives
    t.honest = honest
    return t


def now_int() -> int:
    return int(time.time())


def test_hostile_bytes_before_the_handshake(target):
    """Before the handshake any error ends the connection, scored by its event."""
    cases = [
        # (attacker index, what it sends, expected score change)
        (101, os.urandom(2000).replace(b"\n", b"") + b"\n", -20),        # random bytes
        (102, b'{"type":"ping","s":"\xff\xfe"}\n', -20),                # invalid UTF-8
        (103, b'[1,2,3]\n', -10),                                       # JSON, not an object
        (104, b'{"type":"mail","hops":1,"mail":{}}\n', -50),             # a frame before the handshake
        (105, b'{"type":"hello","v":1}\n', -10),                          # a hello without its fields
        (106, b'{"type":"hello","v":1,"record":{},"nonce":"","agent":""}\n', 0),   # another version
        (107, b'{"type":"teleport"}\n', -2),                              # an unknown type
    ]
    for index, data, change in cases:
        attacker = Attacker(target.port, index)
        attacker.wait_for("hello")
        attacker.raw(data)
        assert attacker.closed_by_peer(), index
        assert score_of(target, f"ip:{attacker.ip}") == change, index
        assert attacker.received[-1]["type"] == "error", index      # told why, before the close
        attacker.close()
    assert target.honest_mail_arrives()


def plain_tcp(port: int, index: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(f"127.0.0.{index}", 0))
    RawPeer.opened.append(types.SimpleNamespace(close=sock.close))
    return sock


def test_hostile_bytes_where_tls_belongs(target):
    """A link is TLS 1.3 from its first byte (8.1).  Anything else proves no
    domain, so the address pays bad_tls; a v1 node's JSON hello is told, in
    plain JSON, which version this is."""
    noise = plain_tcp(target.port, 108)
    noise.sendall(b"\x80" + os.urandom(2999))   # (a first "{" would be a v1 node's hello, below)
    assert noise.recv(100) == b""
    eventually(lambda: score_of(target, "ip:127.0.0.108") == secral.REPUTATION_EVENTS["bad_tls"][0])
    old = plain_tcp(target.port, 109)
    old.sendall(b'{"type":"hello","v":1,"record":{},"nonce":"","agent":"secral.py/0.9"}\n')
    answer = old.makefile("rb").readline()
    assert secral.decode_frame(answer)["code"] == "version" and old.recv(100) == b""
    assert score_of(target, "ip:127.0.0.109") == 0
    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.check_hostname, tls12.verify_mode = False, ssl.CERT_NONE
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        tls12.wrap_socket(plain_tcp(target.port, 114))
    eventually(lambda: score_of(target, "ip:127.0.0.114") == secral.REPUTATION_EVENTS["bad_tls"][0])
    assert target.honest_mail_arrives()


def test_hostile_line_limits_and_slow_lines(target, monkeypatch):
    monkeypatch.setattr(secral, "HANDSHAKE_TIMEOUT", 1)    # (no test waits out the real 10 s)
    slow = Attacker(target.port, 110)
    slow.raw(b'{"type":"hel')                     # a line never finished
    half = Attacker(target.port, 111)             # a connection that says nothing
    under = Attacker(target.port, 112)
    pad = secral.MAX_LINE - len(b'{"type":"ping","p":""}\n')
    under.raw(b'{"type":"ping","p":"' + b"a" * pad + b'"}\n')     # exactly at the limit: parsed
    eventually(lambda: score_of(target, "ip:127.0.0.112") == -50)   # (and then: not_ready)
    over = Attacker(target.port, 113)
    over.raw(b'{"type":"ping","p":"' + b"a" * (pad + 1) + b'"}\n')  # one byte over: not buffered
    assert over.closed_by_peer()
    assert score_of(target, "ip:127.0.0.113") == -50
    assert target.honest_mail_arrives()
    # The handshake timeout closes the slow and the silent ones.
    assert slow.closed_by_peer() and half.closed_by_peer()
    for a in (slow, half, under, over):
        a.close()


def test_hostile_replayed_handshake_and_borrowed_identity(target):
    record = make_record(key(120), None, 0, 1, now_int() + 3600)
    first = Attacker(target.port, 120)              # a genuine handshake, recorded
    hello = first.wait_for("hello")
    first.send(secral.make_hello(record, os.urandom(16)))
    sent_auth = secral.make_auth(key(120), hello["nonce"], target.domain)
    first.send(sent_auth)
    first.send({"type": "ping"})
    assert first.wait_for("pong")
    first.close()
    replay = Attacker(target.port, 121)             # the same auth on a new connection
    replay.wait_for("hello")
    replay.send(secral.make_hello(record, os.urandom(16)))
    replay.send(sent_auth)                         # signed for the old connection's nonce
    assert replay.closed_by_peer()
    assert score_of(target, "ip:127.0.0.121") == -25
    assert score_of(target, f"domain:{key(120).domain}") == 0      # the victim is not blamed
    impostor = Attacker(target.port, 122)          # presents the honest node's record
    hello = impostor.wait_for("hello")
    impostor.send(secral.make_hello(target.honest.shell.core.record, os.urandom(16)))
    impostor.send(secral.make_auth(key(122), hello["nonce"], target.domain))
    assert impostor.closed_by_peer()
    assert score_of(target, f"domain:{target.honest.domain}") >= 0
    assert target.honest.domain in target.peer_domains()
    assert target.honest_mail_arrives()


def test_hostile_relayed_auth_cannot_borrow_an_identity(live, no_crashes, tmp_path):
    """The attack of 11.2, over real TLS.  U dials M; M dials V and shows U
    V's challenge, hoping U signs an auth that V will take as U's.  M cannot
    show U V's certificate (it lacks V's key), so U signs for M's domain --
    the name TLS proved -- and V, checking the auth names V, refuses it."""
    v = live(125)
    m_id = key(127)
    server = socket.create_server(("127.0.0.1", 0))
    listener, _ = secral.tls_contexts(m_id, str(tmp_path))
    u = live(126, [types.SimpleNamespace(port=server.getsockname()[1])])   # U dials M
    server.settimeout(15)
    raw, _ = server.accept()
    to_u = listener.wrap_socket(raw, server_side=True)
    from_u = to_u.makefile("rb")
    to_v = Attacker(v.port, 127, key_index=127)
    v_hello = to_v.wait_for("hello")
    m_record = make_record(m_id, "127.0.0.1", server.getsockname()[1], 1, now_int() + 3600)
    to_u.sendall(secral.encode_frame(secral.make_hello(m_record, secral.b64d(v_hello["nonce"], "n"))))
    frames = [secral.decode_frame(from_u.readline()) for _ in range(2)]
    assert [f["type"] for f in frames] == ["hello", "auth"]
    u_hello, u_auth = frames
    secral.verify_auth(u_auth, u_hello["record"], v_hello["nonce"], m_id.domain)   # U signed for M ...
    to_v.send(u_hello)
    to_v.send(u_auth)                               # ... so V, which is not M, refuses it
    assert to_v.closed_by_peer()
    assert to_v.received[-1]["code"] == "bad_signature"
    assert score_of(v, f"domain:{u.domain}") == 0               # U is not blamed
    assert score_of(v, "ip:127.0.0.127") == secral.REPUTATION_EVENTS["bad_signature"][0]
    assert u.domain not in v.peer_domains()
    to_u.close()
    server.close()


def mail_frame(sender: int, recipient: Identity, hops: int = 8, **change) -> dict:
    now = now_int()
    mail = seal_mail(key(sender), Address("Default", key(sender).domain), Address("Default", recipient.domain),
                            recipient.public_b64, "attack", "body", change.pop("created", now),
                            change.pop("ttl", 600))
    if change:
        mail = key(change.pop("signer", sender)).sign({**mail, **change})
    return {"type": "mail", "hops": hops, "mail": mail}


def test_hostile_mail_after_the_handshake(target):
    t = target.identity
    cases = [
        # (attacker, frame, expected event)
        (130, lambda: {**mail_frame(130, t), "mail": {**mail_frame(130, t)["mail"], "subject": "x", "id": "a" * 32}},
         "bad_signature"),
        (131, lambda: mail_frame(131, t, from_key=key(132).public_b64, signer=132), "bad_domain"),
        (133, lambda: mail_frame(133, t, created=now_int() - 7200, ttl=3600), "expired"),
        (134, lambda: mail_frame(134, t, created=now_int() + 3600), "future"),
        (135, lambda: {**mail_frame(135, t), "hops": 9}, "bad_hops"),
        (136, lambda: {"type": "mail", "hops": 1, "mail": {"kind": "mail"}}, "malformed"),
        (137, lambda: {"type": "teleport"}, "unknown_type"),
    ]
    for index, make, event in cases:
        attacker = Attacker(target.port, index)
        attacker.handshake()
        attacker.send(make())
        attacker.send({"type": "ping"})
        assert attacker.wait_for("pong"), index
        assert score_of(target, f"domain:{key(index).domain}") == secral.REPUTATION_EVENTS[event][0], index
        attacker.close()
    # An oversize body passes relays (they cannot see it) but the recipient rejects it.
    attacker = Attacker(target.port, 138)
    attacker.handshake()
    big = sealed_raw(138, 70, {"subject": "s", "body": "x" * (secral.MAX_BODY + 1)}, now=now_int())
    attacker.send({"type": "mail", "hops": 8, "mail": big})
    ack = attacker.wait_for("ack")["ack"]
    assert (ack["status"], ack["reason"]) == ("rejected", "too_large")
    attacker.close()
    assert target.honest_mail_arrives()


def test_hostile_every_frame_type_with_bad_fields(target):
    """Every frame type with missing, wrong-typed, out-of-range and extra fields."""
    d = target.domain
    bad = {
        "mail": [{}, {"hops": "1", "mail": {}}, {"hops": 99, "mail": {}}, {"hops": 1, "mail": []}],
        "ack": [{}, {"hops": None, "ack": {}}, {"hops": -5, "ack": {}}, {"hops": 1, "ack": {"kind": "ack"}}],
        "nis_query": [{}, {"qid": 5, "domain": d, "hops": 1}, {"qid": "0" * 32, "domain": "x", "hops": 1},
                      {"qid": "0" * 32, "domain": d, "hops": 4}],
        "nis_answer": [{}, {"qid": "0" * 32, "record": "x"}],
        "peers": [{}, {"records": "x"}, {"records": [{"kind": "nis"}]}],
        "error": [{}, {"code": 1, "message": "x"}],
        "hello": [{}], "auth": [{}],
    }
    for n, (type_, variants) in enumerate(bad.items()):
        subject = f"domain:{key(140 + n).domain}"          # one attacker key per frame type
        for m, fields in enumerate(variants):
            before = score_of(target, subject)
            attacker = Attacker(target.port, 150 + 5 * n + m, key_index=140 + n)
            attacker.handshake()
            attacker.send({"type": type_, **fields, "extra": {"ignored": [1, 2]}})
            attacker.send({"type": "ping"})
            if type_ not in ("hello", "auth"):
                assert attacker.wait_for("pong"), (type_, fields)
            eventually(lambda: score_of(target, subject) < before, timeout=5)
            attacker.close()
    assert target.honest_mail_arrives()


class ForeignService:
    """A TCP service that is not Secral (an SSH server, say) on 127.0.0.1:
    each connection gets a greeting and is closed; accepts are counted."""

    def __init__(self, greeting: bytes = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.greeting = greeting
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.greeting)
                conn.recv(4096)                 # the node's hello, or its hanging up

    def close(self) -> None:
        self.sock.close()


def test_hostile_records_naming_a_third_party_get_nobody_banned_but_their_owners(target, monkeypatch):
    """Off-path ban poisoning (9.1, 12): five valid records that name someone
    else's service.  The node dials each and meets a greeting that is not
    JSON; that must cost the address nothing, nor the peer that passed the
    records on; the owners whose signatures made the claims pay for them."""
    monkeypatch.setattr(secral, "MAINTAIN_SECONDS", 0.2)    # dial the new addresses at once
    service = ForeignService()
    try:
        supplier = Attacker(target.port, 200)
        supplier.handshake()
        liars = [key(i) for i in range(201, 206)]
        supplier.send({"type": "peers", "records": [
            make_record(k, "127.0.0.1", service.port, 1, now_int() + 3600) for k in liars]})
        eventually(lambda: service.accepted >= len(liars))
        lie = secral.REPUTATION_EVENTS["bad_record"][0]
        eventually(lambda: all(score_of(target, f"domain:{k.domain}") == lie for k in liars))
        assert score_of(target, f"domain:{key(200).domain}") == 0     # passing records on is no lie
        assert not banned(target, "ip:127.0.0.1") and score_of(target, "ip:127.0.0.1") == 0
        with target.shell.lock:
            assert not {k.domain for k in liars} & set(target.shell.core.stores.peers)
        # The victim's address still gets in: a newcomer from 127.0.0.1 shakes hands.
        newcomer = RawPeer(target.port, key(206))
        newcomer.handshake()
        assert target.honest_mail_arrives()
    finally:
        service.close()


def test_hostile_query_flood_leaves_room_for_other_peers_questions(target, monkeypatch):
    """NIS table exhaustion (5.4, 9.3): two peers at one address flood
    questions nobody can answer; a peer elsewhere still has its question
    forwarded and answered (the share is the address's, not each connection's)."""
    monkeypatch.setattr(secral, "MAX_QUERIES", 2 * secral.MAX_QUERIES_PER_PEER)
    honest = target.honest
    known = key(215)                            # a record only the honest node has
    with honest.shell.lock:
        honest.shell.core.learn_record(make_record(known, None, 0, 1, now_int() + 3600),
                                       time.time())
    for key_index in (216, 142):
        flooder = Attacker(target.port, 216, key_index=key_index)
        flooder.handshake()
        for i in range(3 * secral.MAX_QUERIES_PER_PEER):
            flooder.send({"type": "nis_query", "qid": os.urandom(16).hex(),
                          "domain": key(217).domain if i % 2 else f"node-{'a' * 23}{'bcdefg'[i % 6]}",
                          "hops": 3})
        flooder.send({"type": "ping"})
        assert flooder.wait_for("pong")         # the node has read the whole flood
    asker = Attacker(target.port, 218)
    asker.handshake()
    asker.send({"type": "nis_query", "qid": "ab" * 16, "domain": known.domain, "hops": 3})
    answer = asker.wait_for("nis_answer")
    assert answer is not None and answer["record"]["domain"] == known.domain
    with target.shell.lock:
        pending = [q for q in target.shell.core.names.queries.values() if q.origin is not None]
    assert len(pending) <= secral.MAX_QUERIES_PER_PEER + 1


def test_hostile_flood_of_fresh_addresses_keeps_the_reputation_table_bounded(target, monkeypatch):
    """Unbounded reputation table (9.3, 12): every fresh address that sends
    garbage is a new subject; the table, and its store, stay under the bound,
    and a ban earned before the flood still holds."""
    monkeypatch.setattr(secral, "MAX_REPUTATION_SUBJECTS", 40)
    for _ in range(5):                          # five garbage lines: -100, banned
        first = Attacker(target.port, 190)
        first.raw(b"garbage\n")
        assert first.closed_by_peer()
        first.close()
    assert banned(target, "ip:127.0.0.190")
    for i in range(120):
        flood = RawPeer(target.port, None, source=f"127.0.1.{10 + i}")
        flood.sock.settimeout(15)
        flood.send_bytes(b"garbage\n")
        flood.wait_for("never")                 # until the node hangs up
        flood.close()
    eventually(lambda: score_of(target, "ip:127.0.1.129") < 0)
    with target.shell.lock:
        reputation = target.shell.core.reputation
        reputation.flush(now_int())
        assert len(reputation.entries) <= 40 and len(reputation.store) <= 40
    assert banned(target, "ip:127.0.0.190")
    assert plain_tcp(target.port, 190).recv(100) == b""     # refused before TLS
    assert target.honest_mail_arrives()


def relay_flood(target, flooder: "Attacker", until, most: int = 200) -> int:
    """Send big valid mails for a node that is not running, which `target`
    relays to every peer, in rounds of eight until `until()` holds (however
    much the kernel buffers on this machine); returns how many were sent."""
    nowhere = key(223)
    for sent in range(0, most, 8):
        if until():
            return sent
        for i in range(sent, sent + 8):
            flooder.send({"type": "mail", "hops": 8, "mail": seal_mail(
                key(flooder.key_index), Address("Default", key(flooder.key_index).domain),
                Address("Default", nowhere.domain), nowhere.public_b64, f"big {i}",
                "x" * secral.MAX_BODY, now_int())})
        flooder.send({"type": "ping"})
        assert flooder.wait_for("pong")
        time.sleep(0.05)
    raise AssertionError(f"{most} relayed mails did not bring about {until.__doc__}")


def queues_balance(target) -> bool:
    """The node's budget counts exactly the bytes its queues hold."""
    with target.shell.lock:
        return target.shell.budget.used == sum(conn.queued for conn in target.shell.conns.values())


def conns_from(target, ip: str) -> list:
    with target.shell.lock:
        return [conn for conn in target.shell.conns.values() if conn.ip == ip]


def test_hostile_peers_that_never_read_cannot_pile_up_the_nodes_memory(target):
    """No total cap on send queues (9.3, 12): two peers shake hands and then
    never read, while a third floods big valid mails that the node relays to
    every peer.  All queues together stay under the node-wide bound; the
    peers that read least are dropped, the honest one is kept."""
    limit = 1 << 20
    target.shell.budget.limit = limit           # (64 MiB by default)
    sinks = [Attacker(target.port, 220 + i) for i in range(2)]
    for sink in sinks:
        sink.handshake()                        # and from now on reads nothing
    flooder = Attacker(target.port, 222)
    flooder.handshake()

    def sinks_dropped() -> bool:
        """both sinks dropped"""
        return not any(conns_from(target, sink.ip) for sink in sinks)
    relay_flood(target, flooder, sinks_dropped)
    eventually(lambda: queues_balance(target))
    with target.shell.lock:
        assert sum(conn.queued for conn in target.shell.conns.values()) <= limit
    assert target.honest.domain in target.peer_domains()
    assert target.honest_mail_arrives()


def test_hostile_peer_that_resets_with_bytes_queued_leaves_none_counted(target):
    """A peer that lets bytes pile up and then resets its connection: the
    node's budget gets them back, so repeating it cannot fill the budget."""
    sink = Attacker(target.port, 224)
    sink.handshake()
    flooder = Attacker(target.port, 225)
    flooder.handshake()

    def bytes_queued() -> bool:
        """bytes queued for the sink"""
        return any(conn.queued for conn in conns_from(target, sink.ip))
    relay_flood(target, flooder, bytes_queued)
    sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sink.close()                                # a reset, with the node's queue full
    eventually(lambda: not conns_from(target, sink.ip) and queues_balance(target))
    with target.shell.lock:
        assert target.shell.budget.used <= sum(conn.queued for conn in target.shell.conns.values())
    assert target.honest_mail_arrives()


def test_hostile_squatters_leave_room_for_a_newcomer_to_fetch_its_mail(target):
    """Inbound slot squatting (9.3, 12): identities from four addresses in two
    ranges take every inbound slot, behave and sit idle.  A recipient that can
    only fetch its held mail by dialling in still gets a slot and its mail, and
    keeps the slot while the crowd churns: each squatter that comes back
    evicts one of its own range."""
    newcomer_key = key(138)
    sender = Attacker(target.port, 139, key_index=140)      # leaves a mail for the newcomer
    sender.handshake()
    sender.send(mail_frame(140, newcomer_key))
    sender.send({"type": "ping"})
    assert sender.wait_for("pong")
    sender.close()
    eventually(lambda: len(target.peer_domains()) == 1)
    target.config.max_inbound = 9               # the honest peer and eight squatters
    crowd = {130 + i: f"127.0.{1 + i // 4}.{1 + i % 2}" for i in range(8)}
    squatters = {}

    def squat(index: int) -> None:
        squatters[index] = RawPeer(target.port, key(index), source=crowd[index])
        squatters[index].handshake()
    for index in crowd:
        squat(index)
    assert len(target.peer_domains()) == 9
    newcomer = RawPeer(target.port, newcomer_key, source="127.0.3.1")
    newcomer.handshake()
    held = next((f for f in newcomer.received if f["type"] == "mail"), None) or newcomer.wait_for("mail")
    assert held["mail"]["to"] == newcomer_key.domain
    for _ in range(4):                          # the evicted come back, one at a time
        gone = eventually(lambda: [i for i in crowd if key(i).domain not in target.peer_domains()])
        squat(gone[0])
        assert newcomer_key.domain in target.peer_domains() and target.honest.domain in target.peer_domains()
    assert target.honest_mail_arrives()


def test_hostile_handshake_churn_evicts_the_churner_not_a_slow_newcomer(target):
    """Handshake churn (9.3, 12): an address opens connection after connection
    and never finishes a handshake, while an honest newcomer from elsewhere
    takes its time (a WAN round trip) over its own.  The churner's
    connections make room from its own; the newcomer's handshake completes."""
    target.config.max_inbound = 4               # the honest peer, the newcomer, two more
    slow = RawPeer(target.port, key(141), source="127.0.5.1")
    hello = slow.recv()
    churn = []
    for _ in range(20):
        churn.append(Attacker(target.port, 142, key_index=142))
        assert churn[-1].wait_for("hello")
    mine = make_record(key(141), None, 0, now_int(), now_int() + 3600)
    slow.send(secral.make_hello(mine, os.urandom(secral.HELLO_NONCE)))
    slow.send(secral.make_auth(key(141), hello["nonce"], target.domain))
    slow.send({"type": "ping"})
    assert slow.wait_for("pong") is not None, slow.received
    slow.close()
    assert target.honest.domain in target.peer_domains()
    assert target.honest_mail_arrives()


def test_hostile_duplicate_flood_gets_banned(target):
    attacker = Attacker(target.port, 170)
    attacker.handshake()
    frame = mail_frame(170, target.identity)
    for _ in range(40):
        attacker.send(frame)
    assert attacker.closed_by_peer()
    assert banned(target, f"domain:{key(170).domain}") and banned(target, "ip:127.0.0.170")
    assert [m for m in target("inbox") if m["subject"] == "attack"] and len(
        [m for m in target("inbox") if m["subject"] == "attack"]) == 1
    bans = target("peers", banned=True)
    assert {b["subject"] for b in bans} >= {f"domain:{key(170).domain}", "ip:127.0.0.170"}
    # The banned address is refused at once, before TLS.
    assert plain_tcp(target.port, 170).recv(100) == b""
    assert target.honest_mail_arrives()


def test_hostile_two_hundred_idle_connections(target):
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", target.port), source_address=(f"127.0.{1 + i // 100}.{10 + i % 100}", 0))
        socks.append(s)
    time.sleep(0.5)
    with target.shell.lock:
        assert len(target.shell.core.peers) <= target.config.max_inbound + 2
    threads = threading.active_count()
    assert target.honest_mail_arrives()
    late = Attacker(target.port, 180)               # a newcomer still gets a hello
    assert late.wait_for("hello")
    late.close()
    for s in socks:
        s.close()
    eventually(lambda: len(target.shell.conns) <= 3)
    assert threading.active_count() <= threads


# =============================================================================
# Fuzzing: random frames never raise anything but Secral's own errors
# =============================================================================

def random_json(rng: random.Random, depth: int = 0):
    choice = rng.randrange(10 if depth < 4 else 6)
    if choice == 0:
        return rng.randint(-2**60, 2**60) if rng.random() < 0.1 else rng.randint(-5, 300)
    if choice == 1:
        return rng.choice(["", "x" * rng.randint(0, 300), "node-" + "a" * 24, "0" * 32, "\u2028\ud7ff",
                           "Default@node-" + "a" * 24, secral.b64e(os.urandom(rng.choice([12, 16, 384])))])
    if choice == 2:
        return rng.choice([True, False, None])
    if choice == 3:
        return rng.random() * 10
    if choice in (4, 5):
        return rng.choice(list(secral.FRAME_TYPES)) if rng.random() < 0.5 else "".join(
            chr(rng.randrange(32, 0x3000)) for _ in range(rng.randint(0, 8)))
    if choice in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["type", "hops", "mail", "ack", "record", "qid", "domain", "records", "code",
                        "message", "ref", "sig", "nonce", "v", "agent", "x"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 6))}


def mutate(rng: random.Random, obj):
    """Change one leaf of a valid object: the errors that are hardest to catch."""
    obj = json.loads(json.dumps(obj))
    target = obj
    path = []
    while isinstance(target, dict) and target and rng.random() < 0.8:
        k = rng.choice(list(target))
        path.append((target, k))
        target = target[k]
    if not path:
        return random_json(rng)
    parent, k = path[-1]
    roll = rng.random()
    if roll < 0.3:
        del parent[k]
    elif roll < 0.6:
        parent[k] = random_json(rng)
    elif isinstance(parent[k], str) and parent[k]:
        s = parent[k]
        i = rng.randrange(len(s))
        parent[k] = s[:i] + rng.choice("A/+=0a-@.") + s[i + 1:]
    elif isinstance(parent[k], int):
        parent[k] = rng.choice([-1, 0, 2**53, parent[k] + 1, parent[k] - 1])
    return obj


def test_fuzz_verify_functions_only_raise_remote_errors():
    rng = random.Random(2026)
    now = NOW
    valid = {
        "mail": sealed(0, 1), "ack": secral.make_ack(key(1), sealed(0, 1), "delivered", "", NOW),
        "record": make_record(key(0), "127.0.0.1", 7700, 1, NOW + 100),
    }
    checks = [
        lambda o: secral.verify_mail(o, now), lambda o: secral.verify_ack(o, now),
        lambda o: secral.verify_record(o, now), lambda o: secral.verify_frame(o if isinstance(o, dict) and
                                                                              isinstance(o.get("type"), str) else {"type": "x"}),
        lambda o: open_mail(key(1), secral.verify_mail(o, now)),
        lambda o: secral.verify_nis_answer({"record": o}, key(0).domain, now),
        lambda o: secral.parse_address(o), lambda o: secral.b64d(o, "x"),
    ]
    outcomes = collections.Counter()
    for i in range(1500):
        base = valid[rng.choice(list(valid))]
        obj = mutate(rng, base) if i % 3 else random_json(rng)
        for check in checks:
            try:
                check(obj)
                outcomes["ok"] += 1
            except RemoteError as exc:
                outcomes[exc.code] += 1
    # The fuzzer got past the shape checks into the deep ones, and valid inputs passed.
    assert {"ok", "bad_signature", "bad_domain", "bad_address", "malformed", "expired"} <= set(outcomes)


def test_fuzz_the_core_with_random_frames():
    """Random and mutated frames into a core, most of them sent by the peer's
    core on an open link so that they reach the handlers, some raw lines,
    some on fresh connections mid-handshake: line_received must never raise."""
    for seed in range(4):
        rng = random.Random(seed)
        wire, a, b = two_nodes()
        wire.submit("b", addr(a))               # so there are valid frames of every kind to mutate
        samples = [f for f in wire.frames() if f["type"] != "error"]
        handled = collections.Counter()
        for i in range(400):
            a.reputation.entries.clear()        # keep the fuzzer talking: no bans here
            b.reputation.entries.clear()
            if b.domain not in a.open:
                wire.connect("b", "a")
            conn_b = wire.conn_between("b", "a")
            roll = rng.random()
            if roll < 0.8:                      # a frame from b's core: reaches the handlers
                frame = mutate(rng, rng.choice(samples)) if roll < 0.6 else random_json(rng, 1)
                if not isinstance(frame, dict):
                    frame = {"type": "ping", "x": frame}
                handled[str(frame.get("type"))[:12]] += 1
                wire.transmit("b", conn_b, frame)
            elif roll < 0.9:                    # raw lines: not even JSON
                line = json.dumps(random_json(rng)).encode() if roll < 0.85 else os.urandom(rng.randint(0, 80))
                wire.inject("a", wire.links[("b", conn_b)][1], line + b"\n")
            else:                               # a fresh connection, mid-handshake
                conn = 10_000 + i
                a.connection_made(conn, f"10.7.{seed}.{i % 250}", wire.now)
                frame = mutate(rng, rng.choice(samples))
                wire.run("a", a.line_received(conn, json.dumps(frame).encode() + b"\n", wire.now))
        assert len(handled) >= 8                # every kind of frame got through to a handler
        # The fuzzed cores still work: a mail gets through, and what each
        # counts as held for others is exactly what its relay store holds.
        a.reputation.entries.clear()
        b.reputation.entries.clear()
        if b.domain not in a.open:
            wire.connect("b", "a")
        mail_id = wire.submit("b", addr(a), subject="after the storm")
        assert wire.status("b", mail_id) == "delivered"
        for node in (a, b):
            held = [i for i in node.items.values() if i.store == "relay"]
            assert node.quota.bytes == sum(i.size for i in held)
            assert node.quota.bytes == sum(len(secral.canonical_json(e["obj"]))
                                                    for e in node.stores.relay.values())



# =============================================================================
# Mail clients: SMTP submission and POP3
# =============================================================================

@pytest.fixture
def mail_pair(live, no_crashes):
    a = live(90, mail=True)
    b = live(91, [a], mail=True)
    eventually(lambda: a.domain in b.peer_domains())
    a("passwd", user="Default", password="alice-password")
    b("users_add", name="bob")
    b("passwd", user="bob", password="bob-password")
    return a, b


def smtp_client(node):
    import smtplib
    client = smtplib.SMTP("127.0.0.1", node.mail_ports["smtp"], timeout=10)
    client.ehlo("test")
    return client


def pop3_client(node, user, password):
    import poplib
    client = poplib.POP3("127.0.0.1", node.mail_ports["pop3"], timeout=10)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def test_smtp_to_secral_to_pop3_is_byte_correct(mail_pair):
    from email import policy
    from email.message import EmailMessage
    from email.parser import BytesParser
    a, b = mail_pair
    subject = "Grüße aus dem Netz ✉ — “quoted”"
    body = "Hello Bob,\n.this line starts with a dot\n..and this with two\n\nÜnïcødé 😀\n" + "long " * 300 + "\n"
    message = EmailMessage()
    message["From"] = a.address()
    message["To"] = b.address("bob")
    message["Subject"] = subject
    message.set_content(body)
    client = smtp_client(a)
    client.login("Default", "alice-password")
    refused = client.send_message(message)
    client.quit()
    assert refused == {}
    [entry] = a("outbox")
    assert a("wait", id=entry["id"], timeout=20)["status"] == "delivered"

    pop = pop3_client(b, "bob", "bob-password")
    count, size = pop.stat()
    assert count == 1
    uid = pop.uidl(1).split()[2]
    _, lines, octets = pop.retr(1)
    got = BytesParser(policy=policy.default).parsebytes(b"\r\n".join(lines) + b"\r\n")
    assert got["Subject"] == subject
    assert got.get_content().replace("\r\n", "\n") == body
    assert got["From"].addresses[0].addr_spec == a.address()
    assert got["Message-ID"] == f"<{entry['id']}@{a.domain}>"
    assert octets == size
    pop.quit()
    # UIDL is stable across sessions; DELE takes effect only at QUIT.
    pop = pop3_client(b, "bob", "bob-password")
    assert pop.uidl(1).split()[2] == uid
    import poplib
    with pytest.raises(poplib.error_proto, match="no such message"):
        pop._shortcmd("RETR \u00b2")          # a Unicode digit is not a message number
    assert pop.stat()[0] == 1                   # and the session goes on
    _, top, _ = pop.top(1, 2)                   # the headers and the first two body lines
    head_end = top.index(b"")
    assert top[head_end + 1:] == [b"Hello Bob,", b".this line starts with a dot"]   # stuffed, unstuffed
    assert any(line.startswith(b"Subject: ") for line in top[:head_end])
    pop.dele(1)
    assert pop.stat()[0] == 0
    pop.rset()
    assert pop.stat()[0] == 1
    pop.dele(1)
    pop.sock.shutdown(socket.SHUT_RDWR)         # hanging up without QUIT deletes nothing
    pop.close()

    def reopened():
        """the mailbox, unlocked once the server noticed the hang-up"""
        import poplib
        try:
            return pop3_client(b, "bob", "bob-password")
        except poplib.error_proto:
            return None
    pop = eventually(reopened)
    assert pop.stat()[0] == 1
    pop.dele(1)
    pop.quit()
    assert b("inbox", user="bob") == []


def test_mail_clients_need_the_right_password(mail_pair):
    import poplib
    import smtplib
    a, b = mail_pair
    client = smtp_client(a)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login("Default", "wrong-password")
    assert err.value.smtp_code == 535
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("nobody", "alice-password")
    client.quit()
    with pytest.raises(poplib.error_proto):
        pop3_client(b, "bob", "alice-password")
    with pytest.raises(poplib.error_proto):
        pop3_client(b, "Default", "bob-password")     # a user without a password
    with pytest.raises(LocalError):
        b("passwd", user="bob", password="short")


def test_smtp_errors_for_bad_sequences_and_recipients(mail_pair):
    a, b = mail_pair
    client = smtp_client(a)
    assert client.docmd("MAIL", "FROM:<Default@" + a.domain + ">")[0] == 530     # not logged in
    client.login("Default", "alice-password")
    assert client.docmd("RCPT", f"TO:<{b.address()}>")[0] == 503                  # RCPT before MAIL
    assert client.docmd("DATA")[0] == 503                                          # DATA before RCPT
    assert client.docmd("MAIL", f"FROM:<bob@{b.domain}>")[0] == 553               # someone else's address
    assert client.docmd("MAIL", f"FROM:<Default@{a.domain}>")[0] == 250
    assert client.docmd("RCPT", "TO:<friend@example.com>")[0] == 550               # not a Secral address
    assert client.docmd("RCPT", f"TO:<{b.address()}>")[0] == 250
    assert client.docmd("RCPT", f"TO:<{b.address('bob')}>")[0] == 452             # a second recipient
    assert client.docmd("RSET")[0] == 250
    assert client.docmd("DATA")[0] == 503                                          # RSET forgot them
    assert client.docmd("XYZZY")[0] == 500
    assert client.docmd("NOOP")[0] == 250
    client.docmd("MAIL", f"FROM:<Default@{a.domain}>")
    client.docmd("RCPT", f"TO:<{b.address()}>")
    code, _ = client.data(b"Subject: big\r\n\r\n" + b"x" * (secral.MAX_BODY + 10) + b"\r\n")
    assert code == 552                                                             # over the body limit
    client.quit()
    assert a("outbox") == []


def test_concurrent_mail_clients(mail_pair):
    a, b = mail_pair
    errors = []

    def submit(n):
        try:
            client = smtp_client(a)
            client.login("Default", "alice-password")
            client.sendmail(a.address(), [b.address("bob")], f"Subject: n{n}\r\n\r\nbody {n}\r\n".encode())
            client.quit()
        except Exception as exc:               # collected, then asserted below
            errors.append(exc)
    threads = [threading.Thread(target=submit, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    eventually(lambda: len(b("inbox", user="bob")) == 6)
    first = pop3_client(b, "bob", "bob-password")
    import poplib
    with pytest.raises(poplib.error_proto):        # one session per mailbox (RFC 1939)
        pop3_client(b, "bob", "bob-password")
    uidls = [line.split()[1] for line in first.uidl()[1]]
    assert len(set(uidls)) == 6 and first.stat()[0] == 6
    first.quit()
    pop3_client(b, "bob", "bob-password").quit()    # free again after QUIT


def test_smtp_refuses_a_broken_subject_and_accepts_common_logins(mail_pair):
    import smtplib
    a, b = mail_pair
    client = smtp_client(a)
    client.login(a.address(), "alice-password")      # the whole address as the login name
    line_breaker = "Subject: two\u2028lines\r\n\r\nbody\r\n".encode()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(a.address(), [b.address("bob")], line_breaker)
    assert refused.value.smtp_code == 554
    client.quit()
    assert a("outbox") == []                          # nothing accepted, nothing half-sent
    client = smtp_client(a)
    client.user, client.password = "Default", "alice-password"
    assert client.auth("LOGIN", client.auth_login)[0] == 235    # RFC 4954 AUTH LOGIN
    client.sendmail(a.address(), [b.address("bob")], b"Subject: plain\r\n\r\nplain text\r\n")
    client.quit()
    eventually(lambda: b("inbox", user="bob"))


def test_a_stored_mail_with_any_subject_never_locks_its_owner_out(mail_pair):
    a, b = mail_pair
    with b.shell.lock:                              # as an older node may have stored it
        for n, subject in enumerate(["line\u2028separator", "para\u2029graph", "nel\u0085x", "\ud800 lone"]):
            b.shell.stores.inbox[f"mail/{a.domain}/{n:032x}"] = {
                "ack": {}, "user": "bob", "id": f"{n:032x}", "from": a.address(), "to": b.address("bob"),
                "subject": subject, "body": "still readable", "created": NOW, "received": NOW, "unread": True}
    pop = pop3_client(b, "bob", "bob-password")
    assert pop.stat()[0] == 4
    for n in range(1, 5):
        assert b"still readable" in b"\n".join(pop.retr(n)[1])
    pop.quit()
    listing = cli("inbox", data_dir=b.data_dir).stdout
    assert len(listing.splitlines()) == 5 and "line separator" in listing    # a row each, on one line
    assert "still readable" in cli("read", f"{3:032x}", data_dir=b.data_dir).stdout


def test_a_second_pop3_session_is_told_the_mailbox_is_in_use(mail_pair):
    import poplib
    a, b = mail_pair
    first = pop3_client(b, "bob", "bob-password")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        pop3_client(b, "bob", "bob-password")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop3_client(b, "bob", "wrong-password")
    first.quit()
    pop3_client(b, "bob@" + b.domain, "bob-password").quit()    # the whole address will do


# -- whole messages, bounces, IMAP (issue 16) ----------------------------------------

def smtp_send(node, message, user="Default", password="alice-password"):
    client = smtp_client(node)
    try:
        client.login(user, password)
        return client.send_message(message)
    finally:
        client.quit()


def imap_client(node, user, password):
    import imaplib
    client = imaplib.IMAP4("127.0.0.1", node.mail_ports["imap"], timeout=10)
    client.login(user, password)
    return client


class ImapWire:
    """A raw IMAP session, for what imaplib cannot say: IDLE, Thunderbird's
    exact commands, hostile bytes."""

    def __init__(self, node):
        self.sock = socket.create_connection(("127.0.0.1", node.mail_ports["imap"]), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.n = 0

    def close(self):
        self.file.close()
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def response(self) -> bytes:
        """One response line, with any literals in it."""
        line = self.file.readline()
        assert line, "the server closed the connection"
        while (literal := re.search(rb"\{(\d+)\}\r\n$", line)):
            line += self.file.read(int(literal.group(1)))
            line += self.file.readline()
        return line

    def tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def command(self, text) -> tuple[list[bytes], bytes]:
        tag = self.tag()
        self.send(tag + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.until(tag)

    def until(self, tag: bytes) -> tuple[list[bytes], bytes]:
        untagged = []
        while not (line := self.response()).startswith(tag + b" "):
            untagged.append(line)
        return untagged, line


@pytest.fixture
def imap_pair(mail_pair):
    a, b = mail_pair
    a("users_add", name="carol")
    return a, b


def test_a_thunderbird_shaped_imap_session(imap_pair):
    """Thunderbird's own sequence: CAPABILITY, AUTHENTICATE PLAIN, LIST, SELECT,
    UID FETCH 1:* (FLAGS), the header fields it shows, IDLE until new mail,
    the body, \\Seen, and its copy of a sent message APPENDed to Sent."""
    from email.message import EmailMessage
    a, b = imap_pair
    tb = ImapWire(b)
    assert tb.greeting.startswith(b"* OK")
    untagged, done = tb.command("capability")
    assert b"IDLE" in untagged[0] and b"AUTH=PLAIN" in untagged[0] and done.startswith(b"t1 OK")
    tag = tb.tag()
    tb.send(tag + b" authenticate PLAIN\r\n")
    assert tb.response() == b"+ \r\n"
    tb.send(base64.b64encode(b"\0bob\0bob-password") + b"\r\n")
    assert tb.until(tag)[1].startswith(tag + b" OK")
    untagged, done = tb.command('list (SPECIAL-USE) "" "*"')
    assert b'* LIST (\\HasNoChildren \\Sent) "/" Sent\r\n' in untagged and done.startswith(b"t3 OK")
    untagged, done = tb.command('select "INBOX"')
    assert b"* 0 EXISTS\r\n" in untagged and b"READ-WRITE" in done
    validity = next(re.search(rb"UIDVALIDITY (\d+)", l).group(1) for l in untagged if b"UIDVALIDITY" in l)
    assert tb.command("UID fetch 1:* (FLAGS)")[1].startswith(b"t5 OK")

    tag = tb.tag()
    tb.send(tag + b" IDLE\r\n")
    assert tb.response() == b"+ idling\r\n"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = a.address(), b.address("bob"), "Lunch?"
    message.set_content("Noon at the harbour.")
    smtp_send(a, message)
    assert tb.response() == b"* 1 EXISTS\r\n"      # pushed, not polled for by the client
    tb.send(b"DONE\r\n")
    assert tb.until(tag)[1].startswith(tag + b" OK")

    fields = ("From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups "
              "In-Reply-To Content-Type Reply-To")
    untagged, done = tb.command(f"UID fetch 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({fields})])")
    assert done.startswith(b"t7 OK") and b"Subject: Lunch?" in untagged[0] and b"FLAGS ()" in untagged[0]
    [mail] = b("inbox", user="bob")
    assert mail["unread"]
    untagged, _ = tb.command("UID fetch 1 (UID RFC822.SIZE BODY.PEEK[])")
    size = int(re.search(rb"RFC822.SIZE (\d+)", untagged[0]).group(1))
    body = untagged[0].split(b"}\r\n", 1)[1]
    assert len(body) == size + 3 and b"Noon at the harbour." in body    # (+ ")\r\n")
    assert b("inbox", user="bob")[0]["unread"]                            # PEEK leaves it unread
    untagged, done = tb.command("uid store 1 +Flags (\\Seen)")
    assert b"FLAGS (\\Seen)" in untagged[0]
    assert not b("inbox", user="bob")[0]["unread"]                        # the CLI sees it read

    reply = EmailMessage()
    reply["From"], reply["To"], reply["Subject"] = b.address("bob"), a.address(), "Re: Lunch?"
    reply["Message-ID"] = "<tb-1@bobs-laptop>"
    reply["In-Reply-To"] = f"<{mail['id']}@{a.domain}>"
    reply.set_content("Yes.")
    smtp_send(b, reply, "bob", "bob-password")
    copy = reply.as_bytes().replace(b"\n", b"\r\n")
    tag = tb.tag()
    tb.send(tag + b' APPEND "Sent" (\\Seen) {%d}\r\n' % len(copy))
    assert tb.response() == b"+ Ready for literal data\r\n"
    tb.send(copy + b"\r\n")
    _, done = tb.until(tag)
    assert b"APPENDUID" in done
    untagged, _ = tb.command('STATUS "Sent" (MESSAGES)')
    assert untagged == [b"* STATUS Sent (MESSAGES 1)\r\n"]               # Thunderbird's copy is the mail
    tb.command("logout")
    tb.close()

    # The reply threads on both sides: it names the Message-ID Alice's Sent copy has.
    [sent] = a("outbox")
    eventually(lambda: len(a("inbox")) == 1)
    alice = imap_client(a, "Default", "alice-password")
    alice.select("INBOX")
    _, data = alice.fetch("1", "(BODY.PEEK[HEADER.FIELDS (IN-REPLY-TO)])")
    alice.select("Sent")
    _, sent_id = alice.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    alice.logout()
    assert sent_id[0][1].split(b":", 1)[1].strip() == data[0][1].split(b":", 1)[1].strip()
    assert sent_id[0][1].strip().endswith(f"<{sent['id']}@{a.domain}>".encode())

    # UIDVALIDITY and UIDs are kept across a restart of the node.
    b.stop()
    b.shell = secral.NodeShell(b.data_dir, b.config, ("127.0.0.1", 0), imap=("127.0.0.1", 0))
    b.shell.start()
    b.mail_ports = {n: s.server_address[1] for n, s in b.shell.mail_servers.items()}
    again = imap_client(b, "bob", "bob-password")
    assert again.select("INBOX")[1] == [b"1"]
    assert again.response("UIDVALIDITY")[1] == [validity]
    assert again.uid("FETCH", "1", "(FLAGS)")[1] == [b"1 (UID 1 FLAGS (\\Seen))"]
    again.logout()


def test_in_reply_to_names_the_node_that_sent_the_mail_answered():
    """A reply threads under a mail we sent, and a follow-up under the
    sender's own earlier mail: In-Reply-To names the node that sent it."""
    stores, own, other = Stores.memory(), key(0).domain, key(1).domain
    mine, theirs = "a" * 32, "b" * 32
    stores.outbox[mine] = {"id": mine}
    stores.inbox[secral.mail_key(other, theirs)] = {"id": theirs}
    entry = {"id": "c" * 32, "from": f"Default@{other}", "to": f"Default@{own}", "subject": "Re", "body": "x",
             "created": NOW, "parts": []}
    for answered, domain in ((mine, own), (theirs, other), ("d" * 32, None)):
        entry["in_reply_to"] = answered
        assert secral.replied_domain(stores, own, entry) == domain
        message = secral.message_of(entry, replied=domain).decode()
        assert f"In-Reply-To: <{answered}@{domain or own}>" in message


def test_whole_messages_arrive_as_they_were_sent(imap_pair):
    """HTML, a binary attachment, an inline image, a forwarded message and a
    second text part go through SMTP, the network and IMAP and POP3 as the
    same bytes; format=flowed is undone (delsp=yes keeps CJK words whole);
    display names survive in Sent."""
    from email import policy
    from email.message import EmailMessage
    from email.parser import BytesParser
    a, b = imap_pair
    picture, blob = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, bytes(range(256))[::-1] * 40
    forwarded = b"From: someone@example.org\r\nSubject: the original\r\n\r\nquoted body\r\n"
    message = EmailMessage()
    message["From"] = f"Alice Liddell <{a.address()}>"
    message["To"] = f"Bob Builder <{b.address('bob')}>"
    message["Subject"] = "Everything at once"
    message.set_content("日本語の文章がここで折り返さ \r\nれます。\r\nA soft  \r\nbreak.\r\n", params={"format": "flowed", "delsp": "yes"}, cte="8bit")
    message.add_alternative("<p>Hello <img src='cid:pic'></p>", subtype="html")
    message.get_payload()[1].add_related(picture, maintype="image", subtype="png", cid="<pic>")
    message.add_attachment(blob, maintype="application", subtype="octet-stream", filename="data.bin")
    message.add_attachment("a second text\n", subtype="plain", filename="notes.txt")
    message.add_attachment(BytesParser(policy=policy.default).parsebytes(forwarded), filename="fwd.eml")
    assert smtp_send(a, message) == {}
    [entry] = a("outbox")
    assert a("wait", id=entry["id"], timeout=20)["status"] == "delivered"

    bob = imap_client(b, "bob", "bob-password")
    bob.select("INBOX")
    _, data = bob.fetch("1", "(BODY[] BODYSTRUCTURE)")
    got = BytesParser(policy=policy.default).parsebytes(data[0][1])
    assert got.get_body(("plain",)).get_content().replace("\r\n", "\n") == "日本語の文章がここで折り返されます。\nA soft break.\n"
    assert "Hello" in got.get_body(("html",)).get_content()
    attachments = {p.get_filename(): p for p in got.iter_attachments()}
    assert attachments["data.bin"].get_content() == blob
    assert attachments["notes.txt"].get_content().replace("\r\n", "\n") == "a second text\n"   # (text: CRLF on the wire)
    assert [p.get_content() for p in got.walk() if p.get_content_type() == "image/png"] == [picture]
    inner = attachments["fwd.eml"].get_content()
    assert inner["Subject"] == "the original" and "quoted body" in inner.get_content()
    assert b'("application" "octet-stream" NIL NIL NIL "base64"' in data[1]
    _, part = bob.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert part[0][1] == b"Subject: Everything at once\r\n\r\n"
    bob.logout()
    pop = pop3_client(b, "bob", "bob-password")
    _, lines, _ = pop.retr(1)
    pop.quit()
    assert b"\r\n".join(lines) + b"\r\n" == data[0][1]           # POP3 and IMAP serve the same bytes

    alice = imap_client(a, "Default", "alice-password")
    alice.select("Sent")
    _, sent = alice.fetch("1", "(BODY.PEEK[HEADER.FIELDS (FROM TO)])")
    alice.logout()
    assert b"Alice Liddell <" in sent[0][1] and b"Bob Builder <" in sent[0][1]


def test_smtp_refuses_what_does_not_fit_and_says_why(imap_pair):
    import smtplib
    from email.message import EmailMessage
    a, b = imap_pair
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = a.address(), b.address("bob"), "too big"
    message.set_content("see attached")
    message.add_attachment(os.urandom(150_000), maintype="application", subtype="zip", filename="big.zip")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp_send(a, message)
    assert refused.value.smtp_code == 552 and b"192000" in refused.value.smtp_error.replace(b",", b"")
    parts = EmailMessage()
    parts["From"], parts["To"], parts["Subject"] = a.address(), b.address("bob"), "many parts"
    parts.set_content("x")
    for n in range(secral.MAX_PARTS + 1):
        parts.add_attachment(b"x", maintype="application", subtype="octet-stream", filename=f"{n}.bin")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp_send(a, parts)
    assert refused.value.smtp_code == 552 and b"parts" in refused.value.smtp_error
    assert a("outbox") == []                                     # refused, never accepted and dropped


def test_a_refused_mail_bounces_into_the_senders_inbox(imap_pair):
    """A rejected mail brings a delivery status notification (RFC 3464) from
    Core to its sender's inbox, which every mail client shows."""
    from email import policy
    from email.parser import BytesParser
    a, b = imap_pair
    client = smtp_client(a)
    client.login("Default", "alice-password")
    client.sendmail(a.address(), [b.address("nobody")], "Subject: Hällo\r\n\r\nanyone?\r\n".encode())
    client.quit()
    [entry] = a("outbox")
    assert a("wait", id=entry["id"], timeout=20)["status"] == "rejected"
    [bounce] = eventually(lambda: a("inbox", user="Default"))
    assert bounce["from"] == f"Core@{a.domain}" and bounce["unread"]
    alice = imap_client(a, "Default", "alice-password")
    alice.select("INBOX")
    _, data = alice.fetch("1", "(BODY.PEEK[] BODYSTRUCTURE)")
    alice.logout()
    report = BytesParser(policy=policy.default).parsebytes(data[0][1])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["In-Reply-To"] == f"<{entry['id']}@{a.domain}>"
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
    assert "Status: 5.1.1" in status.as_string() and "no_such_user" in status.as_string()
    assert "Hällo" in report["Subject"]
    assert b'"report" ("report-type" "delivery-status"' in data[1]
    assert a("outbox")[0]["status"] == "rejected"                # the outbox says so as before
    assert len(a("inbox", user="Default")) == 1                  # one bounce per mail
    assert a("inbox", user="carol") == []                        # and only for its sender


def test_imap_sessions_share_one_mailbox(imap_pair):
    """Two clients and the CLI on one mailbox: flags, new mail and deletions
    made by one are reported to the other."""
    a, b = imap_pair
    for n in range(3):
        client = smtp_client(a)
        client.login("Default", "alice-password")
        client.sendmail(a.address(), [b.address("bob")], f"Subject: n{n}\r\n\r\nbody {n}\r\n".encode())
        client.quit()
    eventually(lambda: len(b("inbox", user="bob")) == 3)
    phone, laptop = imap_client(b, "bob", "bob-password"), imap_client(b, "bob", "bob-password")
    assert phone.select("INBOX")[1] == laptop.select("INBOX")[1] == [b"3"]
    phone.store("2", "+FLAGS", "(\\Seen \\Flagged)")
    laptop.noop()
    assert any(b"FLAGS (\\Flagged \\Seen)" in r for r in laptop.untagged_responses.pop("FETCH", []))
    assert laptop.search(None, "FLAGGED")[1] == [b"2"] and laptop.search(None, "UNSEEN")[1] == [b"1 3"]
    phone.store("1", "+FLAGS", "(\\Deleted)")
    phone.expunge()
    laptop.noop()
    assert laptop.untagged_responses.pop("EXPUNGE", None) == [b"1"]
    first = b("inbox", user="bob")[0]
    b("inbox_delete", id=first["id"])                          # the CLI deletes one too
    laptop.noop()
    assert laptop.untagged_responses.pop("EXPUNGE", None) == [b"1"]
    assert laptop.uid("SEARCH", "ALL")[1] == [b"3"]
    [left] = b("inbox", user="bob")
    assert laptop.search(None, "SUBJECT", left["subject"])[1] == [b"1"]
    assert laptop.search(None, "BODY", f'"body {left["subject"][1]}"')[1] == [b"1"]     # (imaplib quotes nothing)
    assert laptop.search(None, "OR", "BODY", '"no such text"', "NOT", "SUBJECT", left["subject"])[1] == [b""]
    laptop.store("1", "-FLAGS", "(\\Seen)")
    assert b("inbox", user="bob")[0]["unread"]
    assert phone.select("INBOX", readonly=True)[0] == "OK"        # EXAMINE
    assert phone.store("1", "+FLAGS", "(\\Seen)")[0] == "NO"     # EXAMINE is read-only
    assert laptop.uid("MOVE", "3", "Trash")[0] == "OK"
    assert b("inbox", user="bob") == []
    assert laptop.status("Trash", "(MESSAGES)")[1] == [b"Trash (MESSAGES 1)"]
    phone.logout()
    laptop.logout()


HOSTILE_IMAP = [
    b"",                                        # an empty line
    b"t1",                                      # a tag alone
    b"+ LOGIN a b",                             # a tag that cannot be one
    b"t2 FETCH 1 (FLAGS)",                      # FETCH before login
    b"t3 LOGIN \"unterminated",
    b"t4 LOGIN \"bad\\escape\" x",
    b"t5 LOGIN (a b",
    b"t6 LOGIN a b)",
    b"t7 " + b"(" * 50 + b")" * 50,
    b"t8 \xff\xfe\x00binary",
    b"t10 LOGIN {9000} x",                      # not a literal (not at the end): BAD
    b"t11 LOGIN {9000}",                        # before login, a literal that big is refused unsent
    b"t9 LOGIN {5}",                             # a literal then a hang-up: answered below
]


def test_imap_answers_bad_to_anything_malformed_and_goes_on(imap_pair):
    a, b = imap_pair
    wire = ImapWire(b)
    for line in HOSTILE_IMAP[:-1]:
        wire.send(line + b"\r\n")
        answer = wire.response()
        assert re.match(rb"\S+ (BAD|NO) ", answer), (line, answer)
    assert wire.command("LOGIN bob bob-password")[1].startswith(b"t1 OK")
    for command in ["FETCH 1 (FLAGS)", "SELECT", "SELECT Nowhere", "CREATE Archive"]:
        assert re.match(rb"t\d+ (BAD|NO) ", wire.command(command)[1]), command
    b("send", to=b.address("bob"), subject="to myself", body="a note", user="bob")
    eventually(lambda: b("inbox", user="bob"))
    wire.command("SELECT INBOX")
    for command, status in [
            ("FETCH 2 (FLAGS)", "BAD"), ("FETCH 0 (FLAGS)", "BAD"), ("FETCH 1:x (FLAGS)", "BAD"),
            ("UID FETCH 1 (BODY[2])", "NO"), ("UID FETCH 1 (BODY[1.HEADER])", "NO"),     # no such part
            ("UID FETCH 1 (BODY[1.2.3.4.5.6.7.8.9.10.11.12] BODY[1.MIME] BODY[TEXT]<99999.3>)", "NO"),
            ("UID FETCH 1:* (NOSUCH)", "BAD"), ("UID FETCH 1:* BODY[HEADER.FIELDS ()]", "BAD"),
            ("UID FETCH 1:* BODY[1.MIME", "BAD"), ("UID FETCH 1:* BODY[0]", "BAD"),
            ("UID STORE 1 FLAGS (\\Recent)", "BAD"), ("UID STORE 1 XFLAGS (\\Seen)", "BAD"),
            ("UID SEARCH", "BAD"), ("UID SEARCH OR SEEN", "BAD"), ("UID SEARCH SINCE 32-Foo-2026", "BAD"),
            ("UID SEARCH LARGER x", "BAD"), ("UID SEARCH CHARSET KOI8-R ALL", "NO"),
            ("UID SEARCH " + "NOT " * 5000 + "ALL", "BAD"), ("UID SEARCH " + "OR ALL " * 3000 + "ALL", "BAD"),
            ("UID BOGUS 1", "BAD"), ("APPEND INBOX (\\Seen)", "BAD"), ("UID COPY 1 Nowhere", "NO"),
            ('LIST "" "' + "*" * 200 + 'Q"', "OK")]:         # a pattern that would make a regex backtrack
        answer = wire.command(command)[1]
        assert re.match(rb"t\d+ %s " % status.encode(), answer), (command, answer)
    wire.send(b"t48 IDLE\r\nDONE\r\n")                # DONE in the same write as IDLE
    assert wire.until(b"t48")[1].startswith(b"t48 OK")
    wire.send(b"t50 APPEND Nowhere {1}\r\n")
    assert wire.response().startswith(b"+ ")
    wire.send(b"x\r\n")
    assert wire.until(b"t50")[1].startswith(b"t50 NO [TRYCREATE]")
    _, answer = wire.command(b"APPEND INBOX {%d}" % (secral.MAIL_MESSAGE + 1))
    assert b"TOOBIG" in answer                                 # refused before it is sent
    assert wire.command("NOOP")[1].endswith(b"OK NOOP completed\r\n")     # and the session goes on
    wire.send(b"t99 NOOP " + b"x" * (secral.IMAP_LINE + 10) + b"\r\n")
    assert wire.file.readline() == b""                         # a line past the limit ends the session
    wire.close()
    other = imap_client(b, "bob", "bob-password")              # and costs nobody else anything
    assert other.select("INBOX")[0] == "OK"
    other.logout()


def test_imap_moves_leave_exactly_one_copy(imap_pair):
    """A MOVE onto its own folder keeps the message; two sessions moving the
    same message at once make one copy, not two."""
    a, b = imap_pair
    b("send", to=b.address("bob"), subject="moved about", body="x", user="bob")
    eventually(lambda: b("inbox", user="bob"))
    sessions = [imap_client(b, "bob", "bob-password") for _ in range(2)]
    sent = sessions[0]
    sent.select("Sent")
    assert sent.uid("MOVE", "1:*", "Sent")[0] == "OK"
    assert len(sent.uid("SEARCH", "ALL")[1][0].split()) == 1
    assert [e["subject"] for e in b("outbox") if e["from"] == b.address("bob")] == ["moved about"]
    sent.close()
    for session in sessions:
        session.select("INBOX")
    threads = [threading.Thread(target=session.uid, args=("MOVE", "1:*", "Trash")) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sessions[0].select("Trash")
    assert len(sessions[0].uid("SEARCH", "ALL")[1][0].split()) == 1
    assert b("inbox", user="bob") == []
    for session in sessions:
        session.logout()


def test_a_real_mail_client_curl_sends_and_reads(imap_pair, tmp_path):
    """curl's SMTP, IMAP and POP3 (Debian's curl, as on most machines)."""
    curl = shutil.which("curl")
    if curl is None or "imap" not in subprocess.run([curl, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("curl with IMAP support is not installed")
    a, b = imap_pair
    mail = tmp_path / "mail.eml"
    mail.write_bytes(f"From: {a.address()}\r\nTo: {b.address('bob')}\r\nSubject: via curl\r\n\r\n"
                     "Sent by curl.\r\n".encode())
    subprocess.run([curl, "-sS", f"smtp://127.0.0.1:{a.mail_ports['smtp']}", "--mail-from", a.address(),
                    "--mail-rcpt", b.address("bob"), "--user", "Default:alice-password", "-T", str(mail)],
                   check=True, timeout=30)
    [entry] = a("outbox")
    assert a("wait", id=entry["id"], timeout=20)["status"] == "delivered"
    fetched = subprocess.run([curl, "-sS", f"imap://127.0.0.1:{b.mail_ports['imap']}/INBOX;UID=1",
                              "--user", "bob:bob-password"], capture_output=True, check=True, timeout=30)
    assert b"Subject: via curl" in fetched.stdout and b"Sent by curl." in fetched.stdout
    listed = subprocess.run([curl, "-sS", f"imap://127.0.0.1:{b.mail_ports['imap']}/", "--user",
                             "bob:bob-password"], capture_output=True, check=True, timeout=30)
    assert b"Sent" in listed.stdout and b"INBOX" in listed.stdout
    popped = subprocess.run([curl, "-sS", f"pop3://127.0.0.1:{b.mail_ports['pop3']}/1", "--user",
                             "bob:bob-password"], capture_output=True, check=True, timeout=30)
    assert popped.stdout.replace(b"\r\n", b"\n") == fetched.stdout.replace(b"\r\n", b"\n")


def test_real_mail_clients_msmtp_and_fetchmail(imap_pair, tmp_path):
    """Debian's msmtp sends, fetchmail fetches over IMAP (skipped where absent)."""
    msmtp, fetchmail = shutil.which("msmtp"), shutil.which("fetchmail")
    if msmtp is None or fetchmail is None:
        pytest.skip("msmtp and fetchmail are not installed (apt install msmtp fetchmail)")
    a, b = imap_pair
    message = f"From: {a.address()}\nTo: {b.address('bob')}\nSubject: via msmtp\n\nSent by msmtp.\n"
    subprocess.run([msmtp, "--host=127.0.0.1", f"--port={a.mail_ports['smtp']}", "--auth=plain",
                    "--user=Default", "--passwordeval=echo alice-password", "--tls=off",
                    f"--from={a.address()}", b.address("bob")], input=message.encode(), check=True, timeout=30)
    [entry] = a("outbox")
    assert a("wait", id=entry["id"], timeout=20)["status"] == "delivered"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f"poll 127.0.0.1 service {b.mail_ports['imap']} protocol IMAP auth password\n"
                  f"  user bob password bob-password sslproto '' keep\n"
                  f"  mda \"cat >> {tmp_path / 'fetched'}\"\n")
    rc.chmod(0o600)
    subprocess.run([fetchmail, "-f", str(rc), "--nosyslog", "-s"], check=True, timeout=60,
                   env={**os.environ, "HOME": str(tmp_path)})
    fetched = (tmp_path / "fetched").read_bytes()
    assert b"Subject: via msmtp" in fetched and b"Sent by msmtp." in fetched
    assert not b("inbox", user="bob")[0]["unread"]             # fetchmail read it, the CLI knows


# =============================================================================
# Demo and benchmark
# =============================================================================

def test_demo_runs_and_tells_each_step():
    result = subprocess.run([PYTHON, SCRIPT, "demo"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("[1/6] Seven nodes", "all 12 links are up", "Node 5 mails node 3", "carried by node",
                 'outbox says "delivered"', "What an eavesdropper sees", "bytes of ciphertext",
                 "opening it with its own key fails: wrong_recipient", "goes offline",
                 "the sealed mail for it", "node 6 is back and receives", "the ack reaches node 4",
                 'node 1 says: error "banned"', "and bans it: domain:", "Temporary data in"):
        assert step in out, step
    assert "Meet at the harbour" in out and "Bring the map" in out      # the recipient read it
    assert out.count("Meet at the harbour") == 1                        # and the eavesdropper did not
    assert not os.path.exists(re.search(r"Temporary data in (\S+) removed", out).group(1))


def test_bench_measures_every_figure():
    """Small sizes, and no assertion on any time: the figures must exist and be sane."""
    result = subprocess.run([PYTHON, SCRIPT, "bench", "--json", "--mails", "20", "--relay-mails", "40",
                             "--stored", "100"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["machine"]["cores"] == os.cpu_count()
    assert r["end_to_end"]["delivered"] == 20 and r["relay"]["relayed"] == 40
    assert r["memory"]["stored"] == 100
    for figure in (r["crypto"]["recipient_bound"], r["crypto"]["durable_relay_bound"],
                   r["end_to_end"]["ratio_to_recipient_bound"], r["relay"]["ratio_to_durable_relay_bound"]):
        assert figure > 0
    assert r["end_to_end"]["p50_ms"] <= r["end_to_end"]["p99_ms"]
    # The figures issue 17 set goals for, each a ratio from this one run.
    for field in ("machine_bound", "e2e_mails_per_s", "e2e_vs_machine_bound", "relay_mails_per_s",
                  "relay_vs_verify_bound", "relay_vs_durable_bound", "idle_latency_ms", "idle_crypto_ms",
                  "idle_latency_vs_crypto", "restart_s", "rss_mib"):
        assert r[field] > 0, field
    assert r["e2e_vs_machine_bound"] == r["e2e_mails_per_s"] / r["machine_bound"]
    assert r["stored"] == 100



def test_simulator_delivers_everything_and_leaves_no_copies():
    """examples/simulate.py on a small network with churn: every mail arrives
    and the acks clear every copy relays kept (the figures in the README)."""
    sys.path.insert(0, os.path.join(HERE, "examples"))
    import simulate
    for topology in ("random", "scale-free"):
        result = simulate.simulate([key(i) for i in range(10)] + [pool_mail_key(0)], topology, mails=12, churn=0.2,
                                   minutes=20, seed=3)
        assert result["delivered"] == 1.0 and result["left_over"] == 0, result
        assert result["frames_per_mail"] > 0 and result["copies_per_mail"] > 0
