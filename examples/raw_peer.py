#!/usr/bin/env python3
"""A third-party Secral peer, protocol version 3, written from spec/PROTOCOL.md alone.

This is the model for porters.  It does not import secral.py: everything a
compatible leaf peer (8.4) needs is here, in the order the specification
gives it, with the section numbers of spec/PROTOCOL.md in the comments.  The
only dependencies are the Python standard library (ssl for the TLS 1.3 link,
socket, json, re, base64, hashlib, ipaddress, os, time; argparse for the
command line; tempfile and threading for the self-test) and pycryptodome's
primitives:

    Crypto.PublicKey.RSA        keys (RFC 8017)
    Crypto.Signature.pss        RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt (4.2)
    Crypto.Signature.pkcs1_15   RSASSA-PKCS1-v1_5, SHA-256: only for the link certificate (8.1)
    Crypto.Cipher.PKCS1_OAEP    RSAES-OAEP, SHA-256, MGF1-SHA-256, empty label (4.3)
    Crypto.Cipher.AES           AES-256-GCM, 12-byte nonce, 16-byte tag (4.4)
    Crypto.Hash.SHA256

If the `cryptography` package is installed, it is used for one thing only:
to generate RSA-3072 keys, which it does in a fraction of a second where
pycryptodome may take several (the key is then handed to pycryptodome as
PEM PKCS#8).  Nothing else depends on it.

What it does, printing each step:

 1. loads its RSA-3072 node key from --key FILE, or generates one (4.1), and
    derives its domain from the public key (5.1);
 2. loads its mail keys (5.6) from FILE.mailkeys/, deletes those whose time
    is up (remembering their ids), and generates a mail key for every epoch
    its record's lifetime touches that it holds none for: one, or two when
    the record crosses the end of a week;
 3. builds and signs its NIS record (5.3) with "host": null and "port": 0
    (it is a leaf, 8.4, it does not listen, so nobody can dial it), valid
    for one hour only, and listing those mail keys in "mail_keys";
 4. connects to a node at HOST:PORT over TCP and runs TLS 1.3 as the dialler
    (8.1): no SNI, no session, any certificate accepted; then it reads the
    node key from the certificate's SubjectPublicKeyInfo, checks it as a
    record key (4.1) and derives the listener's domain, domain_B (5.1);
 5. sends its hello (8.1): v 3, its record, a fresh 16-byte nonce;
 6. checks the node's hello in the order of 8.1 (version, nonce, record
    (5.3, its mail keys included), not our own domain, the record is
    domain_B's);
 7. signs the auth statement {"domain","kind":"auth","nonce","peer"} over the
    node's hello nonce and domain_B (4.2, 8.1) and sends only its "sig"; the
    connection is now open at our end (8.1 "Opening"), and it sends getpeers
    (5.5);
 8. seals a mail to Default@<the node's domain> (6.1) with the node's mail
    key for the current epoch (5.6), named in the envelope by "key_id": the
    envelope names the two domains only, the sealed plaintext carries both
    addresses and a "pad" of "0"s up to a bucket size; it sends it in a mail
    frame with hops 8 (7.2);
 9. while it waits, it does what a leaf MUST (8.4): answers ping with pong
    (8.3) and getpeers with an empty peers frame (5.5), and answers a mail
    for its own domain with an ack (7.4), opened with the mail key its
    key_id names (6.3), and ignores what a leaf MAY ignore;
10. checks the ack (7.3): that it answers this mail, was signed by domain_B
    and is for us; then closes with error "shutdown" (9.4).

It keeps no reputation scores and relays nothing: it is a leaf (8.4).

Usage:
    python3 examples/raw_peer.py HOST:PORT [--key FILE]
    python3 examples/raw_peer.py --self-test [--vectors DIR]

With --key FILE, the key is read from FILE (PEM, PKCS#8) if it exists, and
generated and written there (mode 0600) if it does not; the mail keys are
kept in the directory FILE.mailkeys/ (one file per key, mode 0600,
written before any record lists it, and wiped when its time is up, 5.6);
without --key, fresh keys are generated and forgotten.  Mail that arrives
for this peer's own domain is stored in FILE.inbox (one JSON object per
line, synced before the ack is sent, 7.4) when --key is given, else only
printed.  Try it against a local node:

    python3 secral.py node --data-dir /tmp/ex-node --host 127.0.0.1 --port 0
    python3 examples/raw_peer.py 127.0.0.1:<the port it prints>
    python3 secral.py inbox --data-dir /tmp/ex-node

--self-test runs this file's functions against spec/vectors/ (section 11)
and a TLS 1.3 loopback of make_certificate's certificate, without network.

Exit status: 0 when the node acknowledged the mail as delivered (or, with
--self-test, when every vector passed); 1 on any failure, with the reason on
stderr; 2 for a bad command line.
"""

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import tempfile
import threading
import time

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15, pss

# -----------------------------------------------------------------------------
# Numbers from the specification (section 10, "Limits")
# -----------------------------------------------------------------------------

PROTOCOL_VERSION = 3            # hello.v (8.1)
AGENT = "raw_peer.py/3 (examples/, written from PROTOCOL.md)"   # at most 128 characters
MAX_LINE = 262_144              # bytes in one line, line feed included (3.1)
MAX_INT = 2**53 - 1             # JSON integers (3.2)
MAX_DEPTH = 16                  # levels of arrays and objects; the outermost is 1 (3.2)
MAX_SUBJECT = 256               # characters (6)
MAX_BODY = 131_072              # bytes of UTF-8 (6)
MAX_PARTS = 32                  # parts of a mail (6)
MAX_MEDIA_TYPE = 127            # characters (6)
MAX_FILE_NAME = 255             # characters (6)
MAX_PLAINTEXT = 192_000         # bytes of canonical JSON with an empty pad (6.1)
BUCKETS = (1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 65_536, 131_072, 192_000)   # (6.1)
GCM_TAG = 16                    # (4.4)
MAX_CT = MAX_PLAINTEXT + GCM_TAG    # 192,016 bytes (6.2 step 12)
RSA_BITS = 3072                 # the only modulus size (4.1)
RSA_BYTES = 384                 # a signature and a wrapped key (4.2, 4.3)
PSS_SALT = 32                   # (4.2)
AES_KEY, GCM_NONCE = 32, 12     # (4.4)
HELLO_NONCE = 16                # (8.1)
MAIL_ID = 16                    # random bytes, written as 32 hex digits (3.3)
RECORD_LIFETIME = 2_592_000     # the longest own record: now + 30 days (5.3)
OWN_RECORD_LIFETIME = 3_600     # ours lives an hour (our choice): one or two mail keys
CLOCK_TOLERANCE = 1_200         # two honest clocks may differ by 20 minutes (7.7)
MAX_RECORD_AHEAD = RECORD_LIFETIME + CLOCK_TOLERANCE    # 2,593,200 (5.3 step 10)
EPOCH = 604_800                 # a mail-key epoch: a week from Unix time 0 (5.6)
MAIL_KEY_RETENTION = 606_000    # a mail key is deleted this long after its epoch ends (5.6)
MAX_MAIL_KEYS = 6               # mail keys in a record (5.3 step 11)
MAIL_KEY_ID = 16                # bytes of SHA-256, written as 32 hex digits (5.6)
MAX_MAIL_LIFETIME = 604_800     # 7 days (6.2 step 7)
ACK_LIFETIME = 606_000          # created + 7 days + 20 minutes (7.3)
MAX_ACK_REASON = 256            # characters (7.3)
MAIL_TTL = 3_600                # our mail lives an hour (at most 604,800 s, 6.1)
MAX_HOPS = 8                    # the origin sends 8 (7.2)
MAX_PEERS_RECORDS = 32          # records in one peers frame (5.5)
HANDSHAKE_SECONDS = 10          # TCP connect to open, TLS included (8.1)
PING_AFTER = 60                 # a quiet open connection is pinged (8.3)
WAIT_SECONDS = 30               # how long we wait for the ack (our choice, not the spec's)

# The canonical DER of an RSA-3072 public key with e = 65537 is always 422
# bytes: this prefix, the 384-byte modulus, this suffix (4.1).
SPKI_PREFIX = bytes.fromhex("308201a2300d06092a864886f70d01010105000382018f003082018a0282018100")
SPKI_SUFFIX = bytes.fromhex("0203010001")

# The wire error codes (9.4): the only codes we ever put in an error frame.
WIRE_CODES = {"not_json", "too_large", "malformed", "unknown_type", "bad_key", "bad_domain",
              "bad_address", "bad_signature", "expired", "future", "bad_ttl", "bad_hops",
              "decrypt_failed", "mismatch", "wrong_recipient", "no_such_user",
              "unknown_key", "retired_key", "not_ready",
              "bad_tls", "wrong_peer", "self_connection", "duplicate_connection", "version",
              "timeout", "rate_exceeded", "duplicate", "quota_exceeded", "banned", "busy",
              "shutdown"}
# Events whose row in the table of 9.1 says "disconnect" (after the handshake
# every other failing frame is only dropped, 8.2).
DISCONNECT_CODES = {"oversize_line", "not_ready"}

B32_LOWER = "abcdefghijklmnopqrstuvwxyz234567"     # RFC 4648 base32 alphabet, lowercase (5.1)
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")                  # (5.2)
HEX_ID_RE = re.compile(r"[0-9a-f]{32}\Z")                                   # (3.3)
LINE_BREAKER_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")           # Cc, U+2028, U+2029 (6)
MEDIA_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")   # (6)
SURROGATE_RE = re.compile("[\ud800-\udfff]")


class ProtocolError(Exception):
    """A check of the specification failed.  `code` is the error code of 9.4
    that the spec names for it (a node would score the peer with it, 9.1).
    `from_node` is set when the node itself sent the error frame."""

    from_node = False

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def step(n, text):
    print(f"[{n:2}] {text}", flush=True)


def info(text):
    print(f"     {text}", flush=True)


# =============================================================================
# 3 Encoding
# =============================================================================

# -- 3.2 Canonical JSON ---------------------------------------------------------

def _check_secral_value(value):
    """3.2 "Values": objects with ASCII member names, arrays, strings,
    integers within +-(2^53 - 1), true, false, null; no floats."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for name, child in item.items():
                if not isinstance(name, str) or not name.isascii():
                    raise ProtocolError("malformed", f"member name {name!r}")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            pass
        elif isinstance(item, int):
            if abs(item) > MAX_INT:
                raise ProtocolError("malformed", "an integer outside +-(2^53 - 1)")
        else:
            raise ProtocolError("malformed", f"{type(item).__name__} is not a Secral value")


def canonical_json(value):
    """3.2: sorted member names, no white space, UTF-8, integers only.

    Python's json.dumps with these options produces exactly the spec's form:
    names sorted by code point; `"` and `\\` escaped; \\b \\t \\n \\f \\r for
    those five controls and \\u00xx (lowercase hex) for the other controls
    U+0000-U+001F; every other character, / and U+007F and U+2028 included,
    written as itself in UTF-8 (ensure_ascii=False).  A string with an
    unpaired surrogate has no UTF-8 form: .encode() raises, which the spec
    calls `malformed`.  A port MAY use an RFC 8785 (JCS) library instead: for
    Secral values the output is identical.
    """
    _check_secral_value(value)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ProtocolError("malformed", f"no canonical JSON: {exc}")


# The example of 3.2, as a check of the encoder above.
assert canonical_json({"to": "…", "id": 'a"b', "n": -5, "list": [True, None, "é\n"]}) == \
    '{"id":"a\\"b","list":[true,null,"é\\n"],"n":-5,"to":"…"}'.encode("utf-8")


# -- 3.2 Parsing rules (strict Secral JSON), in two stages ---------------------
#
# Stage 1 is the RFC 8259 grammar of the whole text; only if it passes are
# Secral's rules (stage 2) applied, so a line that breaks both is `not_json`
# (3.1, Appendix A 28).  Python's json module applies hooks *while* it parses
# and recurses once per nesting level, so stage 1 is a small iterative
# grammar check of its own: it also measures the nesting depth, so that a
# 5,000-level line that is JSON is told (`malformed`) from one that is not
# (`not_json`) without recursing 5,000 deep.

_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERAL = re.compile(r"true|false|null")


def json_grammar_depth(text):
    """Stage 1: is `text` one RFC 8259 JSON value (white space around it
    allowed)?  Returns its nesting depth (3.2 "Nesting"), or raises
    `not_json`.  NaN, Infinity, a byte order mark, trailing data and raw
    control characters in strings all fail here."""
    def fail(why):
        raise ProtocolError("not_json", f"{why} at character {pos}")
    stack, depth, expect = [], 0, "value"
    pos = _WS.match(text, 0).end()
    while True:
        if expect == "value":
            c = text[pos:pos + 1]
            if c in ("{", "["):
                stack.append(c)
                depth = max(depth, len(stack))
                pos = _WS.match(text, pos + 1).end()
                if text[pos:pos + 1] == ("}" if c == "{" else "]"):
                    stack.pop()
                    pos += 1
                    expect = "after"
                else:
                    expect = "name" if c == "{" else "value"
                continue
            match = (_STRING.match(text, pos) or _NUMBER.match(text, pos)
                     or _LITERAL.match(text, pos))
            if not match:
                fail("no JSON value")
            pos, expect = match.end(), "after"
        elif expect == "name":
            match = _STRING.match(text, pos)
            if not match:
                fail("no member name")
            pos = _WS.match(text, match.end()).end()
            if text[pos:pos + 1] != ":":
                fail("no ':'")
            pos = _WS.match(text, pos + 1).end()
            expect = "value"
        else:                                           # after a value
            pos = _WS.match(text, pos).end()
            if not stack:
                if pos != len(text):
                    fail("trailing data")
                return depth
            c = text[pos:pos + 1]
            if c == ",":
                pos = _WS.match(text, pos + 1).end()
                expect = "name" if stack[-1] == "{" else "value"
            elif c == ("}" if stack[-1] == "{" else "]"):
                stack.pop()
                pos += 1
            else:
                fail("no ',' or closing bracket")


def _stage2_int(text):
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_INT:     # "-0" reads as 0 (3.2)
        raise ValueError("an integer outside +-(2^53 - 1)")
    return int(text)


def _stage2_float(text):
    raise ValueError(f"{text} is not an integer")


def _stage2_object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("two members of the same name")
    if not all(name.isascii() for name in obj):
        raise ValueError("a member name that is not ASCII")
    return obj


def parse_json(data):
    """Strict Secral JSON (3.2): bytes -> value, or ProtocolError."""
    try:
        text = data.decode("utf-8")     # refuses overlong forms and encoded surrogates
    except UnicodeDecodeError:
        raise ProtocolError("not_json", "not UTF-8")
    depth = json_grammar_depth(text)                                    # stage 1
    if depth > MAX_DEPTH:                                               # stage 2
        raise ProtocolError("malformed", f"nested {depth} levels deep; at most {MAX_DEPTH}")
    try:
        value = json.loads(text, parse_int=_stage2_int, parse_float=_stage2_float,
                           object_pairs_hook=_stage2_object)
    except ValueError as exc:           # the grammar passed: what is left is a Secral rule
        raise ProtocolError("malformed", str(exc))
    # Escapes may spell unpaired surrogates ("\ud800"): Python decodes them
    # into lone surrogates, which no Secral value holds (3.2).
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and SURROGATE_RE.search(item):
            raise ProtocolError("malformed", "an unpaired surrogate")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# -- 3.1 Frames and lines --------------------------------------------------------

def decode_frame(line):
    """3.1: one received line (line feed included) to a frame, with the
    checks in the order of 3.1."""
    if len(line) > MAX_LINE:                                            # 1
        raise ProtocolError("too_large", f"a line of {len(line)} bytes")
    frame = parse_json(line)                                            # 2, 3, 4
    if not isinstance(frame, dict):                                     # 5
        raise ProtocolError("malformed", "a frame is a JSON object")
    if not isinstance(frame.get("type"), str):                          # 6
        raise ProtocolError("malformed", 'a frame needs a string "type"')
    return frame


def encode_frame(frame):
    """3.1: a frame is one line: canonical JSON (SHOULD) and a line feed."""
    line = canonical_json(frame) + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError("too_large", "we must never send a line this long")
    return line


# -- 3.3 Base64, integers, times, identifiers -------------------------------------

def b64e(data):
    """3.3: standard alphabet, with padding."""
    return base64.b64encode(data).decode("ascii")


def b64d(text, what="value", size=None):
    """3.3: accept a string only if it is the canonical base64 of its bytes
    (this refuses white space, missing padding, the URL-safe alphabet and
    non-zero padding bits); `size` is a fixed length in bytes."""
    if not isinstance(text, str) or not text.isascii():
        raise ProtocolError("malformed", f"{what}: not a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("malformed", f"{what}: invalid base64")
    if b64e(data) != text:
        raise ProtocolError("malformed", f"{what}: not canonical base64")
    if size is not None and len(data) != size:
        raise ProtocolError("malformed", f"{what}: {len(data)} bytes, expected {size}")
    return data


def is_int(value):
    return type(value) is int and abs(value) <= MAX_INT     # true/false are never integers (3.3)


def is_time(value):
    return is_int(value) and value >= 0     # (3.3)


def is_str(value):
    return isinstance(value, str)


def is_hex_id(value):
    """3.3: mail ids and query ids are 32 lowercase hexadecimal digits."""
    return isinstance(value, str) and HEX_ID_RE.match(value) is not None


def check_members(obj, members, what):
    """Each (name, check, code) in order: a missing member is malformed, one
    that fails its check has that code (3.1: the first failure decides)."""
    for name, check, code in members:
        if name not in obj:
            raise ProtocolError("malformed", f"{what}: no {name!r}")
        if not check(obj[name]):
            raise ProtocolError(code, f"{what}.{name}: wrong type or form")


def has_line_breaker(text):
    """6: the control characters of category Cc (U+0000-U+001F, U+007F,
    U+0080-U+009F) and U+2028, U+2029: never in a subject, a file name
    or an ack's reason (7.3)."""
    return LINE_BREAKER_RE.search(text) is not None


# =============================================================================
# 4 Cryptography
# =============================================================================

# -- 4.1 Keys ---------------------------------------------------------------------

def public_key_der(key):
    """4.1: the canonical DER SubjectPublicKeyInfo, 422 bytes.
    pycryptodome's export_key(format="DER") of a public key is exactly that."""
    der = key.public_key().export_key(format="DER")
    assert len(der) == 422 and der.startswith(SPKI_PREFIX) and der.endswith(SPKI_SUFFIX)
    return der


def public_key_from_der(der, what="key"):
    """4.1 step 2 and 3 on bytes: the canonical encoding of an RSA-3072 key
    with e = 65537, an odd modulus not divisible by 65537; else `bad_key`.
    Because the canonical encoding is fixed (prefix, modulus, suffix), no
    DER parser is needed: compare bytes, read the modulus."""
    if (len(der) != 422 or not der.startswith(SPKI_PREFIX)
            or not der.endswith(SPKI_SUFFIX)):
        raise ProtocolError("bad_key", f"{what}: not the canonical RSA-3072 e=65537 encoding")
    n = int.from_bytes(der[len(SPKI_PREFIX):-len(SPKI_SUFFIX)], "big")
    if n.bit_length() != RSA_BITS:                                      # top bit set
        raise ProtocolError("bad_key", f"{what}: the modulus is not 3072 bits long")
    if n % 2 == 0 or n % 65537 == 0:                                    # 3
        raise ProtocolError("bad_key", f"{what}: impossible modulus")
    return RSA.construct((n, 65537))


def parse_public_key(text, what="key"):
    """4.1: check a public key field in the spec's order: canonical base64
    (`malformed`), then the canonical DER of RSA-3072 e = 65537 (`bad_key`)."""
    return public_key_from_der(b64d(text, what), what)                 # 1, then 2 and 3


def generate_key():
    """4.1: a fresh RSA-3072 key with e = 65537 (a node key or a mail key,
    5.6).  With the `cryptography` package installed it makes the key (much
    faster) and pycryptodome imports it; else pycryptodome makes it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        return RSA.generate(RSA_BITS, e=65537)
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return RSA.import_key(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))


def check_private_key(key, what):
    if not key.has_private() or key.size_in_bits() != RSA_BITS or key.e != 65537:
        raise ProtocolError("bad_key", f"{what} is not a private RSA-3072 key with e = 65537")
    return key


def write_secret_file(path, data):
    """Appendix B: a secret file is mode 0600, written atomically
    (temporary file, flush, fsync, rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_generate_key(path):
    """4.1: a node's key is RSA-3072 with e = 65537, kept as unencrypted PEM
    PKCS#8, mode 0600, written atomically (temporary file, flush, rename)."""
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            key = check_private_key(RSA.import_key(f.read()), path)
        return key, f"loaded from {path}"
    key = generate_key()
    if not path:
        return key, "generated (not saved; use --key FILE to keep it)"
    write_secret_file(path, key.export_key(format="PEM", pkcs=8))
    return key, f"generated and saved to {path} (mode 0600)"


# -- 4.2 Signed objects -------------------------------------------------------------

def sign(private_key, obj, rng=None):
    """4.2: remove "sig", sign the canonical JSON of the rest with RSASSA-PSS
    (SHA-256, MGF1-SHA-256, 32-byte salt), add "sig" in base64.

    pss.new() uses MGF1 with the message's hash (SHA-256) by default; the
    salt is drawn from `rng`, os.urandom (a cryptographically secure
    generator) unless a test vector supplies fixed bytes (11)."""
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    signer = pss.new(private_key, salt_bytes=PSS_SALT, rand_func=rng or os.urandom)
    signature = signer.sign(SHA256.new(canonical_json(unsigned)))
    assert len(signature) == RSA_BYTES
    return {**unsigned, "sig": b64e(signature)}


def verify_signature(obj, public_key, what):
    """4.2: `sig` is canonical base64 of exactly 384 bytes (else malformed);
    PSS over the canonical JSON of everything else, salt length exactly 32
    (else bad_signature).  Unknown members are covered too: never drop them."""
    signature = b64d(obj.get("sig"), f"{what}.sig", RSA_BYTES)
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    try:
        pss.new(public_key, salt_bytes=PSS_SALT).verify(SHA256.new(canonical_json(unsigned)),
                                                        signature)
    except (ValueError, TypeError):
        raise ProtocolError("bad_signature", f"{what}: the signature does not verify")


# -- 4.3 Key wrapping ---------------------------------------------------------------

def wrap_key(public_key, aes_key, rng=None):
    """4.3: RSAES-OAEP, SHA-256, MGF1-SHA-256 (the default with hashAlgo),
    empty label; pycryptodome draws the 32-byte seed with one call of
    `rng` (os.urandom unless a test vector supplies it).  384 bytes."""
    wrapped = PKCS1_OAEP.new(public_key, hashAlgo=SHA256, randfunc=rng or os.urandom).encrypt(aes_key)
    assert len(wrapped) == RSA_BYTES
    return wrapped


def unwrap_key(private_key, wrapped):
    """4.3, the other way.  Any failure -- a block that does not decrypt, or
    a result that is not exactly 32 bytes -- is `decrypt_failed`, with one
    message for both (4.3: do not reveal which step failed)."""
    try:
        aes_key = PKCS1_OAEP.new(private_key, hashAlgo=SHA256).decrypt(wrapped)
    except (ValueError, TypeError):
        aes_key = b""
    if len(aes_key) != AES_KEY:
        raise ProtocolError("decrypt_failed", "the wrapped key does not open with our key")
    return aes_key


# -- 4.4 Content encryption -----------------------------------------------------------

AD_MEMBERS = ("created", "expires", "from", "id", "key_id", "to")


def associated_data(mail):
    """4.4 and 6.1 step 6: the canonical JSON of exactly these six members
    of the mail, so a relay cannot readdress the ciphertext, move it to
    another mail, change its times or the mail key it names.  "from" and
    "to" are domains (6).  (4.4 itself still says five members, without
    "key_id"; 6.1 step 6 and the vectors of version 3 have six.)"""
    return canonical_json({k: mail[k] for k in AD_MEMBERS})


def gcm_seal(aes_key, nonce, plaintext, ad):
    """4.4: AES-256-GCM, 12-byte nonce, 16-byte tag appended to the ciphertext."""
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG)
    cipher.update(ad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext + tag


def gcm_open(aes_key, nonce, sealed, ad):
    """4.4: `decrypt_failed` if shorter than the tag or the tag does not verify."""
    if len(sealed) < GCM_TAG:
        raise ProtocolError("decrypt_failed", "the ciphertext is shorter than its tag")
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG)
    cipher.update(ad)
    try:
        return cipher.decrypt_and_verify(sealed[:-GCM_TAG], sealed[-GCM_TAG:])
    except ValueError:
        raise ProtocolError("decrypt_failed", "the ciphertext does not open")


# =============================================================================
# 5 Names and NIS
# =============================================================================

def domain_of_der(der):
    """5.1: SHA-256 of the 422-byte DER, first 15 bytes, base32 (24 letters,
    no padding), lowercase, "node-" in front."""
    digest = hashlib.sha256(der).digest()[:15]
    return "node-" + base64.b32encode(digest).decode("ascii").lower()


def is_domain(value):
    """5.1: exactly node- and 24 characters of a-z, 2-7 (29 in all)."""
    return (isinstance(value, str) and len(value) == 29 and value.startswith("node-")
            and set(value[5:]) <= set(B32_LOWER))


def parse_address(value, what="address"):
    """5.2: user@domain; the user is 1-64 of A-Z a-z 0-9 . _ -, starting with
    a letter or a digit.  Returns (user, domain); anything else is bad_address."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise ProtocolError("bad_address", f"{what}: not user@domain")
    user, domain = value.split("@")
    if not USER_RE.match(user):
        raise ProtocolError("bad_address", f"{what}: bad user name {user!r}")
    if not is_domain(domain):
        raise ProtocolError("bad_address", f"{what}: bad domain {domain!r}")
    return user, domain


def fold_address(value):
    """5.2: users compare case-insensitively (ASCII folding), domains exactly."""
    user, domain = parse_address(value)
    return f"{user.lower()}@{domain}"


# -- 5.3 NIS records ------------------------------------------------------------------

_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+\Z|0[xX][0-9a-fA-F]*\Z")
_IPV4_RE = re.compile(r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\Z")


def _dialable(address):
    """5.3: an unspecified, multicast or broadcast address is refused, and so
    is its IPv4-mapped IPv6 form: nobody can be dialled there."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return not (address.is_unspecified or address.is_multicast
                or address == ipaddress.IPv4Address("255.255.255.255"))


def check_host(host):
    """5.3 "The host grammar": null, or an ASCII string of at most 253
    characters that is an IPv4 address (dotted decimal, no leading zeros),
    an IPv6 address (RFC 4291 text, no zone index), or a DNS host name
    whose last label does not read as a number; else `malformed`."""
    if host is None:
        return
    if not isinstance(host, str) or not host.isascii() or not 1 <= len(host) <= 253:
        raise ProtocolError("malformed", f"host {host!r}: not a host")
    if ":" in host:                                                     # IPv6
        try:
            if "%" in host:
                raise ValueError("a zone index")
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError("malformed", f"host {host!r}: not an IPv6 address")
    elif _IPV4_RE.match(host):                                          # IPv4
        if any(int(part) > 255 for part in host.split(".")):
            raise ProtocolError("malformed", f"host {host!r}: not an IPv4 address")
        address = ipaddress.IPv4Address(host)
    else:                                                               # a DNS name
        labels = host.split(".")
        if not all(_LABEL_RE.match(label) for label in labels) or _NUMERIC_LABEL_RE.match(labels[-1]):
            raise ProtocolError("malformed", f"host {host!r}: not a host name")
        return
    if not _dialable(address):
        raise ProtocolError("malformed", f"host {host!r}: nobody can be dialled there")


def make_record(private_key, der, domain, now, mail_keys, lifetime=OWN_RECORD_LIFETIME):
    """5.3 "A node's own record".  We do not listen, so "host" is null and
    "port" is exactly 0 (8.4).  seq is normally the Unix time of signing.
    expires is the smaller of now + `lifetime` and the end of the last epoch
    for which we hold a mail key, counting from E(now) without a gap; and
    "mail_keys" lists our keys from E(now) to E(expires - 1) (5.6).

    The reference uses a lifetime of 30 days (RECORD_LIFETIME); a leaf that
    only runs for a minute chooses one hour, so it needs one mail key, or
    two when the hour crosses the end of an epoch.  Any expires later than
    now and within 5.3 step 10 is valid."""
    assert 0 < lifetime <= RECORD_LIFETIME
    first = epoch_of(now)
    end = first
    while end in mail_keys.by_epoch:                                    # without a gap
        end += 1
    if end == first:
        raise ProtocolError("bad_key", f"no mail key for the current epoch {first} (5.6)")
    expires = min(now + lifetime, end * EPOCH)
    listed = [{"epoch": e, "key": b64e(public_key_der(mail_keys.by_epoch[e]))}
              for e in range(first, epoch_of(expires - 1) + 1)]
    return sign(private_key, {
        "kind": "nis", "domain": domain, "host": None, "port": 0, "key": b64e(der),
        "mail_keys": listed, "seq": now, "expires": expires,
    })


def _check_host_member(value):
    try:
        check_host(value)
        return True
    except ProtocolError:
        return False


def verify_record(record, now, what="record"):
    """5.3 "Validity": the checks in the spec's order; the first failure
    decides the error.  Returns the record's public key."""
    if not isinstance(record, dict):                                    # 1
        raise ProtocolError("malformed", f"{what}: not an object")
    members = [                                                         # 2
        ("kind", is_str, "malformed"),
        ("domain", is_str, "malformed"), ("domain", is_domain, "bad_domain"),
        ("host", _check_host_member, "malformed"),
        ("port", is_int, "malformed"),
        ("key", is_str, "malformed"),
        ("mail_keys", lambda v: isinstance(v, list), "malformed"),
        ("seq", is_int, "malformed"),
        ("expires", is_time, "malformed"),
        ("sig", is_str, "malformed"),
    ]
    check_members(record, members, what)
    if record["kind"] != "nis":                                         # 3
        raise ProtocolError("malformed", f'{what}.kind is not "nis"')
    port, host = record["port"], record["host"]
    if not 0 <= port <= 65535 or (host is None and port != 0):         # 4
        raise ProtocolError("malformed", f"{what}.port: 0-65535, and 0 without a host")
    if host is not None and port == 0:                                  # 5
        raise ProtocolError("malformed", f"{what}.port: a host needs a port")
    if record["seq"] < 0:                                               # 6
        raise ProtocolError("malformed", f"{what}.seq is negative")
    key = parse_public_key(record["key"], f"{what}.key")                # 7
    if domain_of_der(b64d(record["key"])) != record["domain"]:          # 8
        raise ProtocolError("bad_domain", f"{what}: the domain does not derive from the key")
    if record["expires"] <= now:                                        # 9
        raise ProtocolError("expired", f"{what}: expired")
    if record["expires"] > now + MAX_RECORD_AHEAD:                      # 10
        raise ProtocolError("future", f"{what}: expires too far ahead")
    check_mail_keys(record, now, f"{what}.mail_keys")                   # 11 (5.6)
    verify_signature(record, key, what)                                 # 12
    return key


def check_mail_keys(record, now, what):
    """5.3 step 11: 1 to 6 elements; each, in order, an object with a time
    "epoch" and a string "key", its epoch one more than the previous one's,
    its key a valid public key (4.1: malformed or bad_key) that is neither
    the record's key nor an earlier element's; and the epochs cover the
    record's lifetime.  Every failure but bad_key is malformed."""
    mail_keys = record["mail_keys"]
    if not 1 <= len(mail_keys) <= MAX_MAIL_KEYS:
        raise ProtocolError("malformed", f"{what}: {len(mail_keys)} keys, 1 to {MAX_MAIL_KEYS}")
    # Both sides are canonical base64 of canonical DER (4.1), so equal keys
    # are equal strings.
    seen = {record["key"]}
    previous = None
    for i, entry in enumerate(mail_keys):
        where = f"{what}[{i}]"
        if not isinstance(entry, dict):
            raise ProtocolError("malformed", f"{where}: not an object")
        if "epoch" not in entry or not is_time(entry["epoch"]):
            raise ProtocolError("malformed", f"{where}.epoch: missing or not a time")
        if "key" not in entry or not is_str(entry["key"]):
            raise ProtocolError("malformed", f"{where}.key: missing or not a string")
        if previous is not None and entry["epoch"] != previous + 1:
            raise ProtocolError("malformed", f"{where}.epoch: not one more than the previous")
        parse_public_key(entry["key"], f"{where}.key")                  # malformed or bad_key
        if entry["key"] in seen:
            raise ProtocolError("malformed", f"{where}.key: the node key or an earlier mail key")
        seen.add(entry["key"])
        previous = entry["epoch"]
    expires = record["expires"]
    if mail_keys[0]["epoch"] > epoch_of(min(now + CLOCK_TOLERANCE, expires - 1)):
        raise ProtocolError("malformed", f"{what}: the first key is for a later epoch than now's")
    if mail_keys[-1]["epoch"] < epoch_of(expires - 1):
        raise ProtocolError("malformed", f"{what}: the keys stop before the record expires")


# -- 5.6 Mail keys ------------------------------------------------------------------------
#
# Mail is never wrapped to a node key.  It is wrapped to a mail key: an
# RSA-3072 key for one epoch (a week from Unix time 0), whose private half
# is deleted once no valid mail can still be sealed to it.  A record lists
# the public halves for every epoch its lifetime touches (5.3 step 11).

def epoch_of(t):
    """5.6: E(t) = floor(t / 604,800)."""
    return t // EPOCH


def mail_key_id(key_text):
    """5.6: the lowercase hex of the first 16 bytes of SHA-256 of the key's
    DER SubjectPublicKeyInfo (the bytes whose base64 is the key)."""
    parse_public_key(key_text, "mail key")
    return hashlib.sha256(b64d(key_text)).digest()[:MAIL_KEY_ID].hex()


def record_mail_key(record, now):
    """5.6 "Choice": the record's mail key for epoch E(now) or, if it lists
    none (the sender's clock is behind the signer's), its first key of a
    later epoch.  The epochs are consecutive and ascending (5.3 step 11), so
    that is the first key whose epoch is at least E(now).  A record valid at
    `now` always has one: its last epoch is at least E(expires - 1) >= E(now).
    Returns the "key" (base64 DER) and its epoch."""
    for entry in record["mail_keys"]:
        if entry["epoch"] >= epoch_of(now):
            return entry["key"], entry["epoch"]
    raise ProtocolError("expired", "the record lists no mail key for now or later")


def deletion_time(epoch):
    """5.6 "Deletion": the end of the epoch, plus the longest a mail may
    live, plus the clock tolerance."""
    return (epoch + 1) * EPOCH + MAIL_KEY_RETENTION


class MailKeys:
    """A node's mail keys (5.6): the private half of each key it holds, by
    epoch and by id, and the ids of the keys it has deleted, so that a mail
    sealed to one of those is `retired_key` and one sealed to any other id
    `unknown_key` (6.3 step 2).

    With a directory (our --key FILE + ".mailkeys", mode 0700) they are kept
    as the reference keeps them (Appendix B, 12.4): each private key in its
    own file <epoch>.pem (PEM PKCS#8, mode 0600, written like the node key),
    synced with the directory before any record lists it, or mail sealed to
    it could be lost in a crash; and a file "retired", one line
    "<epoch> <id>" per deleted key.  No other file ever holds a private
    mail key, so deleting one is possible: see delete_expired."""

    PEM_RE = re.compile(r"(0|[1-9][0-9]*)\.pem\Z")

    def __init__(self, directory=None):
        self.directory = directory
        self.by_epoch = {}          # epoch -> private key
        self.by_id = {}             # key id -> private key
        self.deleted = set()        # ids of the keys we have deleted
        if directory and os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                match = self.PEM_RE.match(name)
                if match:
                    with open(os.path.join(directory, name), "rb") as f:
                        key = check_private_key(RSA.import_key(f.read()), name)
                    self.add(int(match.group(1)), key)
            retired = os.path.join(directory, "retired")
            if os.path.exists(retired):
                with open(retired, encoding="ascii") as f:
                    for line in f:
                        _, key_id = line.split()
                        self.deleted.add(key_id)

    def add(self, epoch, private_key):
        self.by_epoch[epoch] = private_key
        self.by_id[mail_key_id(b64e(public_key_der(private_key)))] = private_key

    def _sync_directory(self):
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete_expired(self, now):
        """5.6 "Deletion" and 12.4: forget the private half of every key
        whose deletion time has come, keeping its id.  On disk: append the
        id to "retired" and sync it, then overwrite the key's file with
        zeros in place, sync it, unlink it and sync the directory.  (12.4
        says what no program can promise: a copy-on-write filesystem, an
        SSD or a backup may keep the old bytes.)  Returns the epochs
        deleted."""
        gone = sorted(e for e in self.by_epoch if now >= deletion_time(e))
        for e in gone:
            key_id = mail_key_id(b64e(public_key_der(self.by_epoch[e])))
            if self.directory:
                fd = os.open(os.path.join(self.directory, "retired"),
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a", encoding="ascii") as f:
                    f.write(f"{e} {key_id}\n")
                    f.flush()
                    os.fsync(f.fileno())
                path = os.path.join(self.directory, f"{e}.pem")
                with open(path, "r+b") as f:
                    f.write(bytes(os.fstat(f.fileno()).st_size))
                    f.flush()
                    os.fsync(f.fileno())
                os.unlink(path)
                self._sync_directory()
            del self.by_epoch[e], self.by_id[key_id]
            self.deleted.add(key_id)
        return gone

    def ensure(self, first, last):
        """Hold a key for every epoch first..last (5.6 "Generation"): make
        the missing ones, and store them before they are published.  Returns
        the epochs made."""
        made = [e for e in range(first, last + 1) if e not in self.by_epoch]
        for e in made:
            key = generate_key()
            if self.directory:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                write_secret_file(os.path.join(self.directory, f"{e}.pem"),
                                  key.export_key(format="PEM", pkcs=8))
                self._sync_directory()
            self.add(e, key)
        return made

    def private_key(self, key_id):
        """6.3 step 2: the private half of the key `key_id` names, or
        retired_key (we deleted it) or unknown_key (we never had it).  No
        other key is ever tried."""
        if key_id in self.by_id:
            return self.by_id[key_id]
        if key_id in self.deleted:
            raise ProtocolError("retired_key", f"mail key {key_id} was deleted (5.6)")
        raise ProtocolError("unknown_key", f"mail key {key_id} is not one of ours")


# =============================================================================
# 6 Mail
# =============================================================================

def check_part(part):
    """6: one part: a lowercase media type without parameters (at most 127
    characters), canonical base64 data, and an optional safe file name.
    Returns the part with only the members a part defines; else `malformed`."""
    if not isinstance(part, dict):
        raise ProtocolError("malformed", "a part is an object")
    media_type, data = part.get("type"), part.get("data")
    if not (isinstance(media_type, str) and len(media_type) <= MAX_MEDIA_TYPE
            and MEDIA_TYPE_RE.match(media_type)):
        raise ProtocolError("malformed", f"part type {media_type!r}")
    b64d(data, "part data")
    kept = {"type": media_type, "data": data}
    if "name" in part:
        name = part["name"]
        if not (isinstance(name, str) and len(name) <= MAX_FILE_NAME and not has_line_breaker(name)
                and "/" not in name and "\\" not in name and name not in ("", ".", "..")):
            raise ProtocolError("malformed", f"part name {name!r}")
        kept["name"] = name
    return kept


def make_plaintext(sender, recipient, subject, body, parts=(), in_reply_to=None):
    """6 and 6.1 step 5: the plaintext object, after the local checks a
    sealer makes (6.1), padded to its bucket.  Returns the canonical JSON,
    exactly one bucket long."""
    user, _ = parse_address(sender, "from")
    if user.lower() == "core":
        raise ProtocolError("bad_address", "Core sends acks, never mail (5.2)")
    parse_address(recipient, "to")
    if not isinstance(subject, str) or not isinstance(body, str):
        raise ProtocolError("malformed", "the subject and the body are strings")
    if len(subject) > MAX_SUBJECT:
        raise ProtocolError("too_large", f"the subject is over {MAX_SUBJECT} characters")
    if has_line_breaker(subject) or SURROGATE_RE.search(subject):
        raise ProtocolError("malformed", "a line breaker in the subject")
    if SURROGATE_RE.search(body):
        raise ProtocolError("malformed", "an unpaired surrogate in the body")
    if len(body.encode("utf-8")) > MAX_BODY:
        raise ProtocolError("too_large", f"the body is over {MAX_BODY} bytes")
    parts = list(parts or ())
    if len(parts) > MAX_PARTS:
        raise ProtocolError("too_large", f"more than {MAX_PARTS} parts")
    parts = [check_part(part) for part in parts]
    if in_reply_to is not None and not is_hex_id(in_reply_to):
        raise ProtocolError("malformed", "in_reply_to is not a mail id")
    plain = {"from": sender, "to": recipient, "subject": subject, "body": body}
    if parts:
        plain["parts"] = parts                  # only if there is at least one part
    if in_reply_to is not None:
        plain["in_reply_to"] = in_reply_to
    plain["pad"] = ""
    n = len(canonical_json(plain))
    if n > MAX_PLAINTEXT:                       # escapes can make a body up to 6 times longer
        raise ProtocolError("too_large", f"the plaintext is {n} bytes, over {MAX_PLAINTEXT}")
    bucket = min(b for b in BUCKETS if b >= n)
    plain["pad"] = "0" * (bucket - n)           # each "0" is one byte of canonical JSON
    plaintext = canonical_json(plain)
    assert len(plaintext) == bucket
    return plaintext


# -- 6.1 Sealing --------------------------------------------------------------------

def seal_mail(private_key, sender, recipient, recipient_record, subject, body, now, ttl,
              parts=(), in_reply_to=None, rng=None):
    """6.1: seal and sign a mail from our local user `sender` to the address
    `recipient`, given the recipient node's record (5.3), whose mail key for
    epoch E(now) -- or, if it lists none, its first of a later epoch (5.6)
    -- the AES key is wrapped to.  Never to the record's "key": that is the
    node's identity, which only signs.  Random values are drawn from `rng`
    (os.urandom unless a test vector supplies them) in exactly the order of
    6.1: id, AES key, GCM nonce, OAEP seed, PSS salt.  Returns (mail, padded
    plaintext)."""
    rng = rng or os.urandom
    der = public_key_der(private_key)
    own_domain = domain_of_der(der)
    # The local checks of 6.1 (refusals to our own user, not wire errors).
    # The padded plaintext of step 5 depends on no random value, so we build
    # it here, with its checks, and use it at step 5.
    if parse_address(sender, "from")[1] != own_domain:
        raise ProtocolError("bad_address", f"{sender} is not a user of this node")
    plaintext = make_plaintext(sender, recipient, subject, body, parts, in_reply_to)
    if not is_int(ttl) or not 0 < ttl <= MAX_MAIL_LIFETIME:
        raise ProtocolError("bad_ttl", "a mail lives 1 s to 7 days")
    # 6.1 is given R "verified": we verify it here, at `now`, so that its
    # mail keys are known to be valid and to cover `now` (5.3 step 11).
    verify_record(recipient_record, now, "recipient record")
    recipient_domain = parse_address(recipient, "to")[1]
    if recipient_record["domain"] != recipient_domain:
        raise ProtocolError("bad_domain", f"that record is not the record of {recipient_domain}")
    mail_key_text, _ = record_mail_key(recipient_record, now)           # K (5.6 "Choice")
    key = parse_public_key(mail_key_text, "recipient mail key")

    mail_id = rng(MAIL_ID).hex()                                        # 1. id
    aes_key = rng(AES_KEY)                                              # 2. AES key
    nonce = rng(GCM_NONCE)                                              # 3. GCM nonce
    mail = {"kind": "mail", "id": mail_id, "from": own_domain,         # 4. envelope:
            "to": recipient_domain, "from_key": b64e(der),             #    domains only,
            "created": now, "expires": now + ttl,                      #    and the id of K
            "key_id": mail_key_id(mail_key_text)}
    # 5. the plaintext, built above: both addresses, subject, body, parts,
    #    in_reply_to, and "pad" bringing it to exactly a bucket's length.
    mail["ct"] = b64e(gcm_seal(aes_key, nonce, plaintext, associated_data(mail)))   # 6.
    mail["nonce"] = b64e(nonce)                                         # 7.
    mail["key"] = b64e(wrap_key(key, aes_key, rng))                     # 8. OAEP seed, for K
    return sign(private_key, mail, rng), plaintext                      # 9. PSS salt


# -- 6.2 Verification by relays --------------------------------------------------------

def verify_mail(mail, now, what="mail"):
    """6.2: what every node checks, without any private key, in the spec's
    order.  Returns the sender's public key."""
    if not isinstance(mail, dict):                                      # 1
        raise ProtocolError("malformed", f"{what}: not an object")
    members = [("kind", is_str, "malformed"), ("id", is_hex_id, "malformed"),   # 2
               ("from", is_str, "malformed"), ("from", is_domain, "bad_domain"),
               ("to", is_str, "malformed"), ("to", is_domain, "bad_domain"),
               ("from_key", is_str, "malformed"), ("created", is_time, "malformed"),
               ("expires", is_time, "malformed"), ("key_id", is_hex_id, "malformed"),
               ("key", is_str, "malformed"),
               ("nonce", is_str, "malformed"), ("ct", is_str, "malformed"),
               ("sig", is_str, "malformed")]
    check_members(mail, members, what)
    if mail["kind"] != "mail":                                          # 3
        raise ProtocolError("malformed", f'{what}.kind is not "mail"')
    key = parse_public_key(mail["from_key"], f"{what}.from_key")        # 4
    if domain_of_der(b64d(mail["from_key"])) != mail["from"]:           # 5
        raise ProtocolError("bad_domain", f"{what}: from does not derive from from_key")
    if mail["created"] > now + CLOCK_TOLERANCE:                         # 6
        raise ProtocolError("future", f"{what}: created too far in the future")
    if not mail["created"] < mail["expires"] <= mail["created"] + MAX_MAIL_LIFETIME:   # 7
        raise ProtocolError("bad_ttl", f"{what}: lives longer than 7 days, or not at all")
    if mail["expires"] <= now:                                          # 8
        raise ProtocolError("expired", f"{what}: expired")
    b64d(mail["key"], f"{what}.key", RSA_BYTES)                         # 9
    b64d(mail["nonce"], f"{what}.nonce", GCM_NONCE)                     # 10
    ct = b64d(mail["ct"], f"{what}.ct")                                 # 11
    if len(ct) < GCM_TAG:
        raise ProtocolError("malformed", f"{what}.ct: shorter than its tag")
    if len(ct) > MAX_CT:                                                # 12
        raise ProtocolError("too_large", f"{what}.ct: over {MAX_CT} bytes")
    if len(ct) - GCM_TAG not in BUCKETS:                                # 13
        raise ProtocolError("malformed", f"{what}.ct: not a bucket size, the mail is unpadded")
    verify_signature(mail, key, what)                                   # 14
    return key


# -- 6.3 Opening by the recipient -------------------------------------------------------

def open_mail(private_key, mail_keys, mail, now):
    """6.2 then 6.3, as the recipient whose node key is `private_key` and
    whose mail keys (5.6) are `mail_keys`: returns the sealed content as
    {from, to, subject, body, parts, in_reply_to} (parts [] and in_reply_to
    None when absent, the pad dropped: the form of open_mail's vectors).
    Its codes are the reasons of a rejected ack (7.4)."""
    verify_mail(mail, now)
    own_domain = domain_of_der(public_key_der(private_key))
    if mail["to"] != own_domain:                                        # 1
        raise ProtocolError("wrong_recipient", "the mail is not addressed to us")
    mail_private_key = mail_keys.private_key(mail["key_id"])            # 2
    aes_key = unwrap_key(mail_private_key, b64d(mail["key"]))           # 3
    plaintext = gcm_open(aes_key, b64d(mail["nonce"]), b64d(mail["ct"]),    # 4
                         associated_data(mail))
    try:                                                                # 5
        plain = parse_json(plaintext)
        if not isinstance(plain, dict):
            raise ProtocolError("malformed", "the plaintext is not an object")
        for name in ("from", "to", "subject", "body", "pad"):
            if not isinstance(plain.get(name), str):
                raise ProtocolError("malformed", f"the plaintext has no string {name!r}")
        sender_user, sender_domain = parse_address(plain["from"], "sealed from")
        _, recipient_domain = parse_address(plain["to"], "sealed to")
    except ProtocolError as exc:
        raise ProtocolError("malformed", f"not a Secral plaintext: {exc.message}")
    if sender_domain != mail["from"] or recipient_domain != mail["to"]:     # 6
        raise ProtocolError("mismatch", "the sealed addresses are not at the envelope's domains")
    if sender_user.lower() == "core":                                   # 7
        raise ProtocolError("bad_address", "sealed from Core, which never sends mail")
    if plain["pad"].strip("0"):                                         # 8
        raise ProtocolError("malformed", 'the pad holds more than "0"s')
    subject, body = plain["subject"], plain["body"]
    if len(subject) > MAX_SUBJECT:                                      # 9
        raise ProtocolError("too_large", f"the subject is over {MAX_SUBJECT} characters")
    if has_line_breaker(subject):
        raise ProtocolError("malformed", "a line breaker in the subject")
    if len(body.encode("utf-8")) > MAX_BODY:                            # 10
        raise ProtocolError("too_large", f"the body is over {MAX_BODY} bytes")
    parts = plain.get("parts", [])                                      # 11
    if not isinstance(parts, list):
        raise ProtocolError("malformed", "parts is not an array")
    if len(parts) > MAX_PARTS:
        raise ProtocolError("too_large", f"more than {MAX_PARTS} parts")
    parts = [check_part(part) for part in parts]
    in_reply_to = plain.get("in_reply_to")                              # 12
    if "in_reply_to" in plain and not is_hex_id(in_reply_to):
        raise ProtocolError("malformed", "in_reply_to is not a mail id")
    return {"from": plain["from"], "to": plain["to"], "subject": subject, "body": body,
            "parts": parts, "in_reply_to": in_reply_to}


# =============================================================================
# 7 Delivery
# =============================================================================

def mail_key(mail):
    """7.1: a mail is identified by (the domain of its from, its id)."""
    return f"mail/{mail['from']}/{mail['id']}"


# -- 7.3 Acks -----------------------------------------------------------------------

def make_ack(private_key, mail, status, reason, created, rng=None):
    """7.3: the recipient node's Core acknowledges `mail` (a mail addressed
    to this node), signed with one PSS salt from `rng`."""
    der = public_key_der(private_key)
    return sign(private_key, {
        "kind": "ack", "id": mail["id"], "from": f"Core@{domain_of_der(der)}",
        "to": f"Core@{mail['from']}", "from_key": b64e(der), "created": created,
        "status": status, "reason": reason,
    }, rng)


def verify_ack(ack, now, what="ack"):
    """7.3 "Checks", in the spec's order.  Returns the ack."""
    if not isinstance(ack, dict):                                       # 1
        raise ProtocolError("malformed", f"{what}: not an object")
    for name, check in [("kind", is_str), ("id", is_hex_id), ("from", is_str),    # 2
                        ("to", is_str), ("from_key", is_str), ("created", is_time),
                        ("status", is_str), ("reason", is_str), ("sig", is_str)]:
        if name not in ack or not check(ack[name]):
            raise ProtocolError("malformed", f"{what}.{name}: missing or of the wrong type")
        if name == "reason" and len(ack["reason"]) > MAX_ACK_REASON:
            raise ProtocolError("too_large", f"{what}.reason: over {MAX_ACK_REASON} characters")
    if ack["kind"] != "ack":                                            # 3
        raise ProtocolError("malformed", f'{what}.kind is not "ack"')
    signer_user, signer_domain = parse_address(ack["from"], f"{what}.from")     # 4
    target_user, _ = parse_address(ack["to"], f"{what}.to")             # 5
    if signer_user.lower() != "core" or target_user.lower() != "core":  # 6
        raise ProtocolError("bad_address", f"{what}: acks go from Core to Core")
    if ack["status"] not in ("delivered", "rejected"):                  # 7
        raise ProtocolError("malformed", f"{what}.status: {ack['status']!r}")
    if has_line_breaker(ack["reason"]):                                 # 8
        raise ProtocolError("malformed", f"{what}.reason: a line breaker")
    if ack["status"] == "delivered" and ack["reason"] != "":
        raise ProtocolError("malformed", f"{what}.reason: a delivered ack explains nothing")
    key = parse_public_key(ack["from_key"], f"{what}.from_key")         # 9
    if domain_of_der(b64d(ack["from_key"])) != signer_domain:           # 10
        raise ProtocolError("bad_domain", f"{what}: from_key is not the key of {signer_domain}")
    if ack["created"] > now + CLOCK_TOLERANCE:                          # 11
        raise ProtocolError("future", f"{what}: created too far in the future")
    if ack["created"] + ACK_LIFETIME <= now:                            # 12
        raise ProtocolError("expired", f"{what}: expired")
    verify_signature(ack, key, what)                                    # 13
    return ack


# -- 7.4 The recipient (a leaf's share of it, 8.4) ------------------------------------

class Inbox:
    """7.4 and 8.4: a leaf MUST answer every mail for its own domain with an
    ack: store first, then ack, and give a duplicate the same ack.  With
    --key FILE the inbox is FILE.inbox, one JSON object per line, synced to
    disk before the ack is sent (Appendix B); without it, mail is printed
    and kept in memory for the run, like the key itself."""

    def __init__(self, private_key, mail_keys, key_file):
        self.private_key = private_key
        self.mail_keys = mail_keys      # opened with the key each mail's key_id names (6.3)
        self.path = f"{key_file}.inbox" if key_file else None
        self.acks = {}                  # mail key (7.1) -> our ack, the same for every repeat
        if self.path and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for line in f:
                    entry = json.loads(line)
                    self.acks[entry["key"]] = entry["ack"]

    def _store(self, entry):
        if self.path:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(canonical_json(entry) + b"\n")
                f.flush()
                os.fsync(f.fileno())

    def receive(self, mail, now):
        """A mail that passed 6.2 and is addressed to us: the ack to send."""
        key = mail_key(mail)
        if key in self.acks:                                            # 7.4 steps 1-2
            info(f"   a repeat of {key}: answered with the same ack")
            return self.acks[key]
        try:                                                            # 7.4 step 3
            self.mail_keys.delete_expired(now)                          # 5.6, before we open
            plain = open_mail(self.private_key, self.mail_keys, mail, now)
            user = parse_address(plain["to"])[0]
            # A leaf has the two users every node has (5.2): Core, which
            # receives no user mail, and Default.
            status, reason = ("delivered", "") if user.lower() == "default" else \
                             ("rejected", "no_such_user")
        except ProtocolError as exc:
            plain, status, reason = None, "rejected", exc.code
        ack = make_ack(self.private_key, mail, status, reason, now)     # 7.4 step 4
        entry = {"key": key, "ack": ack}
        if status == "delivered":       # a rejected mail is not stored; only its ack is kept
            entry.update(user="Default", **{k: plain[k] for k in ("from", "subject", "body")})
            info(f"   mail for us from {plain['from']}: {plain['subject']!r}")
            for line in plain["body"].splitlines() or [""]:
                info(f"   | {line}")
        self._store(entry)              # stored before anything is sent (7.4, Appendix B)
        self.acks[key] = ack
        return ack


# =============================================================================
# 8 Connections
# =============================================================================

# -- 8.1 The link certificate ------------------------------------------------------------
#
# A node's certificate is a deterministic function of its key (so it is a
# test vector).  A dialler never makes one, but a porter's listener must, and
# the self-test checks the bytes.  DER (X.690) is tag, length, content; the
# few encodings needed are spelt out here.

def der_tlv(tag, content):
    """X.690 DER: one tag byte, the definite length (short form below 128,
    else 0x80 | the number of length bytes, then the length big-endian)."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        digits = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(digits)]) + digits
    return bytes([tag]) + length + content


SHA256_WITH_RSA = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("2a864886f70d01010b"))  # 1.2.840.113549.1.1.11
                          + der_tlv(0x05, b""))                                      # parameters NULL
COMMON_NAME = bytes.fromhex("550403")                                                # 2.5.4.3


def make_certificate(private_key):
    """8.1 "The link certificate": X.509 v3, serial 1, sha256WithRSAEncryption,
    issuer = subject = CN=<domain> (UTF8String), validity 700101000000Z
    (UTCTime) to 99991231235959Z (GeneralizedTime), the 422-byte key, no
    extensions; signed with RSASSA-PKCS1-v1_5 SHA-256, which is
    deterministic.  Returns the DER."""
    spki = public_key_der(private_key)
    name = der_tlv(0x30, der_tlv(0x31, der_tlv(0x30, der_tlv(0x06, COMMON_NAME)
                                               + der_tlv(0x0C, domain_of_der(spki).encode()))))
    validity = der_tlv(0x30, der_tlv(0x17, b"700101000000Z") + der_tlv(0x18, b"99991231235959Z"))
    tbs = der_tlv(0x30, der_tlv(0xA0, der_tlv(0x02, b"\x02"))          # version v3, [0] EXPLICIT
                  + der_tlv(0x02, b"\x01")                              # serialNumber 1
                  + SHA256_WITH_RSA + name + validity + name + spki)
    signature = pkcs1_15.new(private_key).sign(SHA256.new(tbs))
    return der_tlv(0x30, tbs + SHA256_WITH_RSA + der_tlv(0x03, b"\x00" + signature))


def _der_read(data, pos):
    """One DER element at `pos`: (tag, start of its content, end)."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, length, pos = data[pos], data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise ValueError("bad length")
        length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, pos, pos + length


def certificate_key(certificate):
    """8.1: the dialler reads the key from the certificate's
    SubjectPublicKeyInfo (the 6th field of the TBSCertificate after the
    optional version) and checks it exactly as a record key (4.1).  Nothing
    else in the certificate is checked: TLS proved possession of the key.
    Returns (the key, its base64 DER, the domain it derives, 5.1).  A
    certificate we cannot read is `bad_key` too (spec/vectors)."""
    try:
        tag, start, end = _der_read(certificate, 0)                     # Certificate
        if tag != 0x30:
            raise ValueError("not a SEQUENCE")
        tag, pos, tbs_end = _der_read(certificate, start)               # TBSCertificate
        if tag != 0x30:
            raise ValueError("no TBSCertificate")
        if certificate[pos] == 0xA0:                                    # [0] version
            pos = _der_read(certificate, pos)[2]
        for _ in range(5):          # serialNumber, signature, issuer, validity, subject
            pos = _der_read(certificate, pos)[2]
        _, _, spki_end = _der_read(certificate, pos)                    # subjectPublicKeyInfo
        if spki_end > tbs_end:
            raise ValueError("the key runs past the TBSCertificate")
        spki = certificate[pos:spki_end]
    except (ValueError, IndexError) as exc:
        raise ProtocolError("bad_key", f"the certificate holds no readable key ({exc})")
    key = public_key_from_der(spki, "certificate key")
    return key, b64e(spki), domain_of_der(spki)


# -- 8.1 The auth frame ----------------------------------------------------------------
#
# Only the dialler sends auth (Appendix A 18).  Its "sig" is the PSS
# signature (4.2) of the *auth statement*, a signed object that never
# travels whole:
#
#   {"domain":<dialler's domain>,"kind":"auth",
#    "nonce":<the listener's hello nonce, exactly as received>,
#    "peer":<domain_B, the listener's domain as TLS proved it>}
#
# The nonce ties it to one connection, "peer" to one listener: a node we
# dialled cannot pass our auth on to a third node (12.2).

def auth_statement(dialler_domain, listener_nonce, listener_domain):
    """8.1: the auth statement, without "sig"."""
    return {"domain": dialler_domain, "kind": "auth", "nonce": listener_nonce,
            "peer": listener_domain}


def make_auth(private_key, own_domain, peer_nonce, peer_domain, rng=None):
    """8.1: our auth frame, drawing one 32-byte PSS salt."""
    statement = auth_statement(own_domain, peer_nonce, peer_domain)
    return {"type": "auth", "sig": sign(private_key, statement, rng)["sig"]}


def verify_auth(frame, record, own_nonce, own_domain):
    """8.1 "Checking an auth" (the listener's side; a leaf never listens,
    but a porter's node does): rebuild the statement with domain = the
    dialler's record's domain, nonce = our own hello nonce, peer = our own
    domain, and verify "sig" with the record's key: `malformed` (the sig is
    not canonical base64 of 384 bytes) or `bad_signature`."""
    statement = {**auth_statement(record["domain"], own_nonce, own_domain), "sig": frame["sig"]}
    verify_signature(statement, parse_public_key(record["key"], "record.key"), "auth")


# -- 8.2 Frame catalogue ----------------------------------------------------------------

# The members each frame type must carry, in the order they are checked, as
# (name, check, error code).  Members not listed are ignored (3.1).
FRAME_MEMBERS = {
    "hello": [("v", is_int, "malformed"), ("record", lambda v: isinstance(v, dict), "malformed"),
              ("nonce", is_str, "malformed"), ("agent", is_str, "malformed"),
              ("agent", lambda v: len(v) <= 128, "too_large")],
    "auth": [("sig", is_str, "malformed")],
    "mail": [("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 8, "bad_hops"),
             ("mail", lambda v: isinstance(v, dict), "malformed")],
    "ack": [("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 8, "bad_hops"),
            ("ack", lambda v: isinstance(v, dict), "malformed")],
    "nis_query": [("qid", is_hex_id, "malformed"), ("domain", is_str, "malformed"),
                  ("domain", is_domain, "bad_domain"),
                  ("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 3, "bad_hops")],
    "nis_answer": [("qid", is_hex_id, "malformed"),
                   ("record", lambda v: isinstance(v, dict), "malformed")],
    "getpeers": [], "ping": [], "pong": [],
    "peers": [("records", lambda v: isinstance(v, list), "malformed")],
    "error": [("code", is_str, "malformed"), ("code", lambda v: len(v) <= 64, "too_large"),
              ("message", is_str, "malformed"), ("message", lambda v: len(v) <= 1024, "too_large")],
}


def check_frame(frame):
    """8.2: the type is known and the listed members are there and valid
    (not the objects inside them, nor an error frame's ref)."""
    table = FRAME_MEMBERS.get(frame["type"])
    if table is None:
        raise ProtocolError("unknown_type", f"frame type {frame['type'][:40]!r}")
    for name, check, code in table:
        if name not in frame:
            raise ProtocolError("malformed", f"{frame['type']}: no {name!r}")
        if not check(frame[name]):
            raise ProtocolError(code, f"{frame['type']}.{name}: wrong type or out of range")
    return frame


# -- 8.1 The link: TLS 1.3, then JSON lines -------------------------------------------------

def dialler_tls_context():
    """8.1 "TLS", the dialler's side: TLS 1.3 only; accept any certificate
    (no CA, no host name, no dates: the certificate is a container for the
    node key); no session is offered (this context keeps none), and Python
    never sends 0-RTT data.

    Porters: "accept any certificate" must switch off only the chain, name
    and date checks.  The library must still verify the listener's
    CertificateVerify signature with the certificate's key -- that is the
    whole proof of whom we reached (8.1, 12.2).  OpenSSL does so whatever
    the verify mode; with a library that asks you for a certificate
    verifier callback, do not stub out its TLS 1.3 signature check."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Link:
    """One connection: TCP, TLS 1.3 as the dialler (8.1), then frames out and
    frames in as lines (3.1)."""

    def __init__(self, host, port):
        self.started = time.monotonic()
        raw = socket.create_connection((host, port), timeout=HANDSHAKE_SECONDS)
        try:
            # server_hostname=None: no SNI, which would name the node we dial
            # to every observer (8.1, 12.1).
            self.sock = dialler_tls_context().wrap_socket(raw, server_hostname=None)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise ProtocolError("bad_tls", f"no TLS 1.3 handshake with {host}:{port}: {exc}")
        self.certificate = self.sock.getpeercert(binary_form=True)
        self.tls_version = self.sock.version()
        self.cipher = self.sock.cipher()[0]
        self.buffer = bytearray()
        self.last_sent = time.monotonic()

    def send(self, frame):
        """Send one frame as one line (3.1).  Returns the line's size."""
        line = encode_frame(frame)
        try:
            self.sock.sendall(line)
        except OSError:
            self.raise_parting_error()          # the node hung up: say why, if it said
            raise
        self.last_sent = time.monotonic()
        return len(line)

    def raise_parting_error(self):
        """A node writes an error frame before it closes (9.4).  If the
        connection broke under a write, read what is left and report that
        frame instead of a bare broken pipe."""
        try:
            while True:
                frame = self.receive(1)
                if frame is None:
                    return
                if frame["type"] == "error" and "ref" not in frame:
                    refuse(frame, "and closed the connection")
        except (ProtocolError, OSError) as exc:
            if getattr(exc, "from_node", False):
                raise

    def receive_line(self, timeout):
        """The next line, line feed included, or None if nothing came within
        `timeout` seconds.  Never buffer more than MAX_LINE bytes of one
        line: a longer one cannot be resynchronised (3.1)."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\n")
            if 0 <= end < MAX_LINE:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            if end >= MAX_LINE or len(self.buffer) > MAX_LINE:
                # 262,145 bytes without a line feed: the event oversize_line,
                # answered with error too_large, and the end (3.1).
                raise ProtocolError("oversize_line", "the node sent an oversize line")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                # The buffer now holds one partial line: read no more than
                # it takes to see that it is oversize.
                data = self.sock.recv(min(65536, MAX_LINE + 1 - len(self.buffer)))
            except (socket.timeout, ssl.SSLWantReadError):
                return None
            except (ssl.SSLEOFError, ConnectionResetError):     # TCP ended without TLS's end
                data = b""
            if not data:        # end of TLS or TCP; a partial line is discarded (3.1)
                raise ProtocolError("closed", "the node closed the connection")
            self.buffer += data

    def receive(self, timeout):
        """The next frame, decoded (3.1) and checked against the catalogue
        (8.2), or None after `timeout` seconds of silence."""
        line = self.receive_line(timeout)
        return None if line is None else check_frame(decode_frame(line))

    def close(self, code=None, message=""):
        """An error frame without ref announces a deliberate disconnect (9.4):
        write it, end TLS with close_notify, close TCP (8.1 "Who closes")."""
        try:
            if code:
                self.send({"type": "error", "code": code, "message": message[:1024]})
            # unwrap() sends close_notify.  (Python's then also waits, here
            # at most 1 s, for the node's; the spec's closer reads nothing
            # more, and a port that can send close_notify alone should.)
            self.sock.settimeout(1)
            self.sock.unwrap()
        except (OSError, ValueError, ProtocolError):
            pass                                # already closed: nothing more to say
        self.sock.close()


def refuse(frame, during):
    """An error frame without ref from the node: it refused us or is
    hanging up (9.4).  We close at once and answer nothing."""
    exc = ProtocolError(frame["code"], f"the node sent error {frame['code']!r} {during}: "
                                       f"{frame['message']}")
    exc.from_node = True
    raise exc


def handshake(link, private_key, own_domain, own_record, expect_domain=None):
    """8.1 as the dialler, from the completed TLS handshake to "open".
    Returns (domain_B, the node's record, its key as base64 DER)."""
    # After TLS: the listener's domain is the one its certificate's key
    # derives; TLS's CertificateVerify proved the node holds that key.
    try:
        _, node_key_text, domain_b = certificate_key(link.certificate)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, f"the node's certificate: {exc.message}")
    step(6, f"TLS: {link.tls_version}, {link.cipher}, no SNI; the certificate's key is a "
            f"canonical RSA-3072 key (4.1): domain_B = {domain_b}")
    if expect_domain is not None and domain_b != expect_domain:        # a dial expecting a domain
        raise ProtocolError("wrong_peer", f"dialled {expect_domain}, reached {domain_b}")

    # Connection start: each side, without waiting, draws a fresh 16-byte
    # nonce and sends hello.  Ours is signed by nobody in this version.
    own_nonce = b64e(os.urandom(HELLO_NONCE))
    link.send({"type": "hello", "v": PROTOCOL_VERSION, "record": own_record,
               "nonce": own_nonce, "agent": AGENT})
    step(7, f"sent hello (8.1): v {PROTOCOL_VERSION}, our record, nonce {own_nonce}")

    # Receiving hello (state "hello": only hello and error are accepted).  A
    # node that refuses us (busy, banned: 9.2, 9.3) sends an error frame
    # before any hello.
    deadline = link.started + HANDSHAKE_SECONDS
    hello = link.receive(max(0.1, deadline - time.monotonic()))
    if hello is None:
        raise ProtocolError("timeout", f"no hello within {HANDSHAKE_SECONDS} s")
    if hello["type"] == "error":
        refuse(hello, "instead of hello")
    if hello["type"] != "hello":
        raise ProtocolError("not_ready", f"expected hello, got {hello['type']}")
    if hello["v"] != PROTOCOL_VERSION:                                  # 1
        raise ProtocolError("version", f"the node speaks v{hello['v']}; "
                                       f"we speak v{PROTOCOL_VERSION}")
    b64d(hello["nonce"], "hello.nonce", HELLO_NONCE)                    # 2
    record = hello["record"]
    verify_record(record, int(time.time()), "hello.record")            # 3 (5.3, 5.6)
    if record["domain"] == own_domain:                                  # 4
        raise ProtocolError("self_connection", "the node has our own domain")
    if record["domain"] != domain_b:                                    # 5
        raise ProtocolError("wrong_peer", f"the hello's record is {record['domain']}'s, "
                                          f"TLS proved {domain_b}")
    # 6 (banned): a leaf keeps no reputation, so it bans nobody.
    step(8, f"received hello from {domain_b}: agent {hello['agent']!r}")
    info(f"record (5.3) valid and domain_B's: host {record['host']} port {record['port']} "
         f"seq {record['seq']}, mail keys for epochs "
         f"{record['mail_keys'][0]['epoch']}-{record['mail_keys'][-1]['epoch']} (5.6)")

    # 7: the state becomes "auth"; the listener is proven (TLS and step 5).
    # As the dialler we send our auth and open at once.
    auth = make_auth(private_key, own_domain, hello["nonce"], domain_b)
    link.send(auth)
    step(9, "sent auth (8.1): a PSS signature (4.2) over the statement")
    info(canonical_json(auth_statement(own_domain, hello["nonce"], domain_b)).decode())
    return domain_b, record, node_key_text


def serve_until(link, inbox, own_domain, want, what):
    """The open connection of a leaf (8.4): handle every frame until
    `want(frame)` is true; return that frame."""
    deadline = time.monotonic() + WAIT_SECONDS
    received = set()                    # object keys received on this connection (7.1)
    problem = ""                        # why the last candidate frame was dropped
    while time.monotonic() < deadline:
        if time.monotonic() - link.last_sent >= PING_AFTER:            # 8.3, 8.4
            link.send({"type": "ping"})
        try:
            frame = link.receive(min(1.0, deadline - time.monotonic()))
        except ProtocolError as exc:
            if exc.code in DISCONNECT_CODES or exc.code == "closed":
                raise
            # After the handshake a failing frame is dropped, the connection
            # stays open (8.2); a node would score the event (9.1).
            info(f"<- a frame we drop: {exc}")
            problem = f" (last frame dropped: {exc})"
            continue
        if frame is None:
            continue
        kind = frame["type"]
        info(f"<- {kind}")
        try:
            if want(frame):
                return frame
        except ProtocolError as exc:
            info(f"   dropped: {exc}")
            problem = f" (a candidate was dropped: {exc})"
            continue
        if kind == "getpeers":
            # 5.5: our own record only if it has a host (ours has none), then
            # our other open peers (we have none): an empty list.
            link.send({"type": "peers", "records": []})
            info("   answered with peers [] (we have no host and no other peers)")
        elif kind == "ping":
            link.send({"type": "pong"})                                 # 8.3: MUST answer
            info("   answered with pong")
        elif kind == "mail" and frame["mail"].get("to") == own_domain:
            # 8.4: a mail for our own domain is acked, after 6.2 (a mail that
            # fails it is dropped, 6.2) and once per connection (7.1, 7.2).
            mail = frame["mail"]
            try:
                verify_mail(mail, int(time.time()))
            except ProtocolError as exc:
                info(f"   dropped: {exc}")
                continue
            if mail_key(mail) in received:
                info("   the same mail twice on this connection: dropped (duplicate, 7.1)")
                continue
            received.add(mail_key(mail))
            ack = inbox.receive(mail, int(time.time()))
            link.send({"type": "ack", "hops": MAX_HOPS, "ack": ack})   # 7.4 step 5
            info(f"   answered with an ack, status {ack['status']!r} {ack['reason']!r}")
        elif kind == "error":
            if "ref" not in frame:
                refuse(frame, f"while we waited for {what}")
            if not is_hex_id(frame["ref"]):                            # 9.4
                info("   dropped: error.ref is not 32 lowercase hex digits (malformed)")
            else:
                info(f"   the node refused object {frame['ref']}: {frame['code']} {frame['message']}")
        elif kind in ("hello", "auth"):
            raise ProtocolError("not_ready", f"{kind} on an open connection")
        else:
            # mail and acks for others, nis_query, nis_answer, peers, pong:
            # a leaf MAY ignore them (8.4).
            info(f"   a leaf ignores {kind} (8.4)")
    raise ProtocolError("no_answer", f"no {what} within {WAIT_SECONDS} s{problem}")


# =============================================================================
# Self-test against spec/vectors/ (section 11)
# =============================================================================

def fixed_random(*hex_values):
    """11 "Randomness": a generator that hands out these bytes, in order, to
    whatever draws them -- the order of the draws is specified (6.1, 8.1)."""
    stream = bytearray(b"".join(bytes.fromhex(h) for h in hex_values))

    def draw(n):
        if n > len(stream):
            raise AssertionError(f"drew {n} bytes, only {len(stream)} were given")
        out = bytes(stream[:n])
        del stream[:n]
        return out
    draw.left = lambda: len(stream)
    return draw


def _vector_line(v):
    if "line" in v:
        return v["line"].encode("utf-8")
    if "line_hex" in v:
        return bytes.fromhex(v["line_hex"])
    line = (v["line_prefix"] + v["repeat"] * v["count"] + v["line_suffix"]).encode("utf-8")
    assert len(line) == v["length"], "the vector's length"
    return line


def _expect(condition, what):
    if not condition:
        raise AssertionError(what)


def _t_decode_frame(v, fx):
    frame = decode_frame(_vector_line(v))
    canonical = canonical_json(frame)         # "expect" covers canonical encoding too (11)
    if "canonical" in v:
        _expect(canonical == v["canonical"].encode("utf-8"), f"canonical {canonical[:80]!r}")


def _t_base64_decode(v, fx):
    _expect(b64d(v["text"]).hex() == v["bytes_hex"], "bytes")


def _t_domain_of_key(v, fx):
    parse_public_key(v["key"])
    _expect(domain_of_der(b64d(v["key"])) == v["domain"], "domain")


def _t_parse_address(v, fx):
    user, domain = parse_address(v["address"])
    _expect((user, domain, fold_address(v["address"])) == (v["user"], v["domain"], v["folded"]),
            "user, domain, folded")


def _t_seal_mail(v, fx):
    r = v["random"]
    rng = fixed_random(r["id_hex"], r["aes_key_hex"], r["nonce_hex"], r["oaep_seed_hex"],
                       r["pss_salt_hex"])
    mail, plaintext = seal_mail(fx.keys[v["sender_key"]], v["from"], v["to"], v["recipient_record"],
                                v["subject"], v["body"], v["created"], v["ttl"],
                                v.get("parts", ()), v.get("in_reply_to"), rng)
    _expect(rng.left() == 0, "every random byte drawn")
    _expect(len(plaintext) == v["plaintext_length"], f"plaintext length {len(plaintext)}")
    _expect(hashlib.sha256(plaintext).hexdigest() == v["plaintext_sha256_hex"], "plaintext SHA-256")
    _expect(canonical_json(mail) == canonical_json(v["mail"]), "the sealed mail, byte for byte")


def _t_make_plaintext(v, fx):
    make_plaintext(v["from"], v["to"], v["subject"], v["body"], v["parts"], v["in_reply_to"])


def _t_open_mail(v, fx):
    plain = open_mail(fx.keys[v["recipient"]], fx.mail_keys[v["recipient"]], v["mail"], v["now"])
    _expect(plain == v["plaintext"], f"plaintext {plain}")


def _t_make_ack(v, fx):
    ack = make_ack(fx.keys[v["signer"]], v["mail"], v["status"], v["reason"], v["created"],
                   fixed_random(v["pss_salt_hex"]))
    _expect(canonical_json(ack) == canonical_json(v["ack"]), "the ack, byte for byte")


def _t_make_certificate(v, fx):
    certificate = make_certificate(fx.keys[v["key"]])
    _expect(b64e(certificate) == v["certificate"], "the certificate, byte for byte")
    _expect(hashlib.sha256(certificate).hexdigest() == v["certificate_sha256_hex"], "SHA-256")
    _expect(certificate_key(certificate)[2] == v["domain"], "domain")


def _t_certificate_key(v, fx):
    _, key_text, domain = certificate_key(b64d(v["certificate"]))
    _expect((key_text, domain) == (v["key"], v["domain"]), "key and domain")


def _t_make_auth(v, fx):
    signer = fx.keys[v["signer"]]
    own_domain = domain_of_der(public_key_der(signer))
    statement = canonical_json(auth_statement(own_domain, v["peer_nonce"], v["peer_domain"]))
    _expect(statement == v["statement"].encode("utf-8"), f"statement {statement!r}")
    auth = make_auth(signer, own_domain, v["peer_nonce"], v["peer_domain"],
                     fixed_random(v["pss_salt_hex"]))
    _expect(canonical_json(auth) == canonical_json(v["auth"]), "the auth frame, byte for byte")
    if "hello" in v:        # the signer's hello, as a listener would check it (8.1, 8.2)
        hello = check_frame(v["hello"])
        _expect(hello["v"] == PROTOCOL_VERSION and hello["record"]["domain"] == own_domain, "hello")
        b64d(hello["nonce"], "hello.nonce", HELLO_NONCE)
        verify_record(hello["record"], 1_800_000_000, "hello.record")


def _t_mail_key_id(v, fx):
    _expect(mail_key_id(v["key"]) == v["id_hex"], "the key id")


def _t_verify_auth(v, fx):
    verify_auth(check_frame(v["auth"]), v["record"], v["own_nonce"], v["own_domain"])


SELF_TEST_OPS = {
    "decode_frame": _t_decode_frame,
    "base64_decode": _t_base64_decode,
    "domain_of_key": _t_domain_of_key,
    "parse_address": _t_parse_address,
    "verify_record": lambda v, fx: verify_record(v["record"], v["now"]),
    "check_host": lambda v, fx: check_host(v["host"]),
    "mail_key_id": _t_mail_key_id,
    "seal_mail": _t_seal_mail,
    "make_plaintext": _t_make_plaintext,
    "verify_mail": lambda v, fx: verify_mail(v["mail"], v["now"]),
    "open_mail": _t_open_mail,
    "make_ack": _t_make_ack,
    "verify_ack": lambda v, fx: verify_ack(v["ack"], v["now"]),
    "make_certificate": _t_make_certificate,
    "certificate_key": _t_certificate_key,
    "make_auth": _t_make_auth,
    "verify_auth": _t_verify_auth,
    "verify_frame": lambda v, fx: check_frame(v["frame"]),
}
# Operations of a NIS map, which a leaf does not keep (8.4).
NOT_A_LEAFS_OPS = {"record_supersedes", "nis_map", "verify_nis_answer"}


def tls_loopback(private_key):
    """8.1 with two real TLS stacks: a listener presenting make_certificate's
    certificate, and our dialler's context.  Checks that the link is TLS
    1.3, that the dialler sent no SNI, and that certificate_key reads the
    listener's domain from what the dialler received."""
    seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_file, "w") as f:
            f.write(ssl.DER_cert_to_PEM_cert(make_certificate(private_key)))
        with open(key_file, "wb") as f:
            f.write(private_key.export_key(format="PEM", pkcs=8))
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_3
        server.load_cert_chain(cert_file, key_file)
        server.sni_callback = lambda sock, name, ctx: seen.__setitem__("sni", name)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b'{"type":"ping"}\n')
                tls.recv(1)
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            link = Link("127.0.0.1", port)
            frame = link.receive(5)
            link.close()
        finally:
            thread.join(5)
            listener.close()
    _expect(link.tls_version == "TLSv1.3", f"TLS version {link.tls_version}")
    _expect("sni" in seen and seen["sni"] is None, f"the dialler sent SNI {seen.get('sni')!r}")
    _expect(certificate_key(link.certificate)[2] == domain_of_der(public_key_der(private_key)),
            "domain_B")
    _expect(frame == {"type": "ping"}, "a frame through the link")


class TestNodes:
    """The fixed inputs of keys.json (11 "Test keys"): each test node's node
    key, and its mail keys (5.6) -- all but the one marked deleted, whose id
    it remembers (6.3 step 2)."""

    def __init__(self, key_file):
        self.keys = {k["name"]: RSA.import_key(k["private_pem"]) for k in key_file["keys"]}
        for k in key_file["keys"]:
            _expect(b64e(public_key_der(self.keys[k["name"]])) == k["public"],
                    f"{k['name']}'s public key")
        self.mail_keys = {name: MailKeys() for name in self.keys}
        for k in key_file["mail_keys"]:
            key = RSA.import_key(k["private_pem"])
            _expect(b64e(public_key_der(key)) == k["public"], f"{k['name']}'s public key")
            _expect(mail_key_id(k["public"]) == k["id_hex"], f"{k['name']}'s id")
            if k.get("deleted"):
                self.mail_keys[k["owner"]].deleted.add(k["id_hex"])
            else:
                self.mail_keys[k["owner"]].add(k["epoch"], key)


def own_record_check(fx):
    """5.3 "A node's own record" with our one-hour lifetime, made from the
    test keys: inside an epoch it lists one mail key; across the end of an
    epoch, two; it passes our own verify_record; and a mail sealed to it by
    the rules of 6.1 opens with the key its key_id names (6.3)."""
    key, mail_keys = fx.keys["alice"], fx.mail_keys["alice"]
    der = public_key_der(key)
    domain = domain_of_der(der)
    for now, epochs in [(1_800_000_000, [2976]), (2977 * EPOCH - 600, [2976, 2977])]:
        record = make_record(key, der, domain, now, mail_keys)
        verify_record(record, now)
        _expect([e["epoch"] for e in record["mail_keys"]] == epochs, f"epochs at {now}")
        _expect(record["expires"] == now + OWN_RECORD_LIFETIME, "expires")
        sender = f"Default@{domain_of_der(public_key_der(fx.keys['bob']))}"
        mail, _ = seal_mail(fx.keys["bob"], sender, f"Default@{domain}", record, "s", "b", now, 60)
        _expect(mail["key_id"] == mail_key_id(record["mail_keys"][0]["key"]), "key_id")
        _expect(open_mail(key, mail_keys, mail, now)["body"] == "b", "opened")


def self_test(vector_dir):
    """Run every vector whose operation this file implements (11); returns
    the number of failures."""
    with open(os.path.join(vector_dir, "keys.json")) as f:
        fx = TestNodes(json.load(f))
    failures, passed, skipped = 0, {}, {}
    for name in sorted(os.listdir(vector_dir)):
        if not name.endswith(".json") or name == "keys.json":
            continue
        with open(os.path.join(vector_dir, name)) as f:
            vectors = json.load(f)["vectors"]
        for i, v in enumerate(vectors):
            run = SELF_TEST_OPS.get(v["op"])
            if run is None:
                skipped[v["op"]] = skipped.get(v["op"], 0) + 1
                continue
            try:
                run(v, fx)
                got, detail = "ok", ""
            except ProtocolError as exc:
                got, detail = exc.code, exc.message
            except AssertionError as exc:
                got, detail = "wrong output", str(exc)
            if got == v["expect"]:
                passed[v["op"]] = passed.get(v["op"], 0) + 1
            else:
                failures += 1
                print(f"FAIL {name}[{i}] {v['op']} ({v['comment']}): expected {v['expect']}, "
                      f"got {got} {detail[:300]}")
    for op in sorted(passed):
        print(f"  ok   {op:18} {passed[op]:3} vectors")
    for op in sorted(skipped):
        why = "a leaf keeps no NIS map (8.4)" if op in NOT_A_LEAFS_OPS else "not implemented here"
        print(f"  skip {op:18} {skipped[op]:3} vectors: {why}")
    try:
        own_record_check(fx)
        print("  ok   own record: one hour, one or two mail keys, mail sealed to it opens")
    except (AssertionError, ProtocolError) as exc:
        failures += 1
        print(f"FAIL own record: {exc}")
    try:
        tls_loopback(fx.keys["bob"])
        print("  ok   TLS 1.3 loopback: no SNI, certificate_key finds the listener's domain")
    except (AssertionError, ProtocolError, OSError) as exc:
        failures += 1
        print(f"FAIL TLS 1.3 loopback: {exc}")
    print(f"{sum(passed.values())} vectors passed, {failures} failed, "
          f"{sum(skipped.values())} skipped")
    return failures


# =============================================================================
# The run
# =============================================================================

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="raw_peer.py",
        description="A Secral leaf peer (protocol v3) written from spec/PROTOCOL.md alone: "
                    "dial a node over TLS 1.3, mail Default@<its domain>, check the ack.")
    parser.add_argument("target", metavar="HOST:PORT", nargs="?",
                        help="the node to dial, e.g. 127.0.0.1:7700")
    parser.add_argument("--key", metavar="FILE",
                        help="PEM PKCS#8 key file: loaded if it exists, else generated and "
                             "saved; the mail keys are kept in FILE.mailkeys/")
    parser.add_argument("--self-test", action="store_true",
                        help="check this file against spec/vectors/ and exit")
    parser.add_argument("--vectors", metavar="DIR",
                        default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             os.pardir, "spec", "vectors"),
                        help="the test vectors for --self-test (default: ../spec/vectors)")
    args = parser.parse_args(argv)
    if args.self_test:
        return parser, args, None, None
    if args.target is None:
        parser.error("HOST:PORT is required (or --self-test)")
    host, sep, port = args.target.rpartition(":")
    host = host.strip("[]")                             # [::1]:7700
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"bad HOST:PORT {args.target!r}")
    return parser, args, host, int(port)


def run(host, port, key_file):
    # -- 1. our key and domain (4.1, 5.1) --------------------------------------
    started = time.monotonic()
    private_key, how = load_or_generate_key(key_file)
    der = public_key_der(private_key)
    own_domain = domain_of_der(der)
    step(1, f"RSA-3072 node key {how} ({time.monotonic() - started:.1f} s)")
    step(2, f"our domain (5.1): {own_domain}")

    # -- 2. our mail keys (5.6) ---------------------------------------------------
    now = int(time.time())
    started = time.monotonic()
    mail_keys = MailKeys(f"{key_file}.mailkeys" if key_file else None)
    deleted = mail_keys.delete_expired(now)
    made = mail_keys.ensure(epoch_of(now), epoch_of(now + OWN_RECORD_LIFETIME - 1))
    step(3, f"mail keys (5.6): epoch now {epoch_of(now)}; made {made or 'none'} "
            f"({time.monotonic() - started:.1f} s), deleted {deleted or 'none'}, "
            f"holding {sorted(mail_keys.by_epoch)}"
            + (f", kept in {mail_keys.directory}/" if mail_keys.directory else " (not saved)"))
    inbox = Inbox(private_key, mail_keys, key_file)

    # -- 3. our NIS record (5.3) ----------------------------------------------
    own_record = make_record(private_key, der, own_domain, now, mail_keys)
    verify_record(own_record, now)          # our own checks must accept it too
    step(4, f"signed our NIS record (5.3): host null, port 0 (a leaf, 8.4), seq "
            f"{own_record['seq']}, expires in {own_record['expires'] - now} s")
    for entry in own_record["mail_keys"]:
        info(f"mail key for epoch {entry['epoch']}: key_id {mail_key_id(entry['key'])}")

    # -- 4. TCP and TLS 1.3 (8.1) ------------------------------------------------
    link = Link(host, port)
    step(5, f"connected to {host}:{port} over TCP and TLS")
    is_open = False
    try:
        # -- 5-7. hello, hello, auth (8.1) ----------------------------------------
        node_domain, node_record, node_key = handshake(link, private_key, own_domain, own_record)
        is_open = True
        # 8.1 "Opening", step 3: send getpeers (5.5), then hand over what we
        # hold for the peer -- our mail, sealed now.
        link.send({"type": "getpeers"})
        step(10, "the connection is open at our end (8.1); sent getpeers (5.5)")

        # -- 8. seal and send a mail (6.1, 7.2) -----------------------------------
        sender, recipient = f"Default@{own_domain}", f"Default@{node_domain}"
        subject = "Hello from a raw peer"
        body = ("This mail was sealed by examples/raw_peer.py, which implements\n"
                "spec/PROTOCOL.md (version 3) without importing secral.py.")
        now = int(time.time())
        mail, plaintext = seal_mail(private_key, sender, recipient, node_record,
                                    subject, body, now, MAIL_TTL)
        step(11, f"sealed mail {mail['id']} (6.1)")
        info(f"envelope: from {mail['from']} to {mail['to']} (domains only)")
        info(f"sealed:   from {sender} to {recipient}, padded to {len(plaintext)} bytes")
        info(f"AES-256-GCM, associated data {associated_data(mail).decode()}")
        info(f"AES key wrapped with RSA-OAEP-SHA256 for the node's mail key of epoch "
             f"{record_mail_key(node_record, now)[1]} (5.6; epoch now {epoch_of(now)}), "
             f"key_id {mail['key_id']}; mail signed with RSA-PSS by our node key")
        size = link.send({"type": "mail", "hops": MAX_HOPS, "mail": mail})
        step(12, f"sent mail frame, hops {MAX_HOPS} ({size} bytes)")

        # -- 9, 10. serve, then the ack (7.3, 7.5) ------------------------------------
        def our_ack(frame):
            # 7.5: an ack settles our mail only if it answers its id and comes
            # from the recipient's domain; any other ack is not ours to check.
            ack = frame.get("ack") if frame["type"] == "ack" else None
            if not (isinstance(ack, dict) and ack.get("id") == mail["id"]):
                return False
            verify_ack(ack, int(time.time()))                            # 7.3
            if ack["from"] != f"Core@{node_domain}" or ack["from_key"] != node_key:
                raise ProtocolError("bad_domain", f"an ack signed by {ack['from']}, not by "
                                                  f"Core@{node_domain}")
            if ack["to"] != f"Core@{own_domain}":
                raise ProtocolError("bad_address", f"an ack for {ack['to']}, not for us")
            return True
        frame = serve_until(link, inbox, own_domain, our_ack, "the ack")
        ack = frame["ack"]
        step(13, f"received the ack (hops {frame['hops']}): checks of 7.3 passed, signed by "
                 f"domain_B's key")
        info(f"from {ack['from']} to {ack['to']}, created {ack['created']}, "
             f"status {ack['status']!r}, reason {ack['reason']!r}")
        if ack["status"] != "delivered":
            # A valid "rejected" ack is the node's honest answer (7.4), not a
            # fault: report it, and close as a node that is done.
            exc = ProtocolError("rejected", f"the node rejected the mail: {ack['reason']}")
            exc.from_node = True
            raise exc
        step(14, f"delivered: {recipient} has the mail; closing with error shutdown (9.4)")
        link.close("shutdown", "raw_peer.py is done")
    except ProtocolError as exc:
        # What the node sent broke a rule: before the handshake completed we
        # say which with an error frame and hang up (8.1 "Handshake
        # failures"); the node's own error frames get no answer (9.4); any
        # other end is ours, so we close as a stopping node does.
        if exc.from_node and exc.code != "rejected":
            link.close()
        elif exc.code in WIRE_CODES and not exc.from_node:
            link.close(exc.code, exc.message)
        elif exc.code == "oversize_line":
            link.close("too_large", exc.message)
        elif is_open and exc.code != "closed":
            link.close("shutdown", exc.message)
        else:
            link.close()
        raise
    except BaseException:
        link.close()
        raise


def main(argv=None):
    parser, args, host, port = parse_args(argv)
    if args.self_test:
        return 1 if self_test(args.vectors) else 0
    started = time.monotonic()
    try:
        run(host, port, args.key)
    except ProtocolError as exc:
        parser.exit(1, f"FAILED: {exc}\n")              # argparse writes to stderr
    except OSError as exc:
        parser.exit(1, f"FAILED: network error talking to {host}:{port}: {exc}\n")
    print(f"OK ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
