#!/usr/bin/env python3
"""A third-party Secral peer written from spec/PROTOCOL.md alone.

This is the model for porters.  It does not import secral.py: everything a
compatible peer needs is here, in the order the specification gives it,
with the section numbers of spec/PROTOCOL.md in the comments.  The only
dependencies are the Python standard library (socket, json, base64, hashlib,
hmac, os, time; argparse for the command line) and pycryptodome's primitives:

    Crypto.PublicKey.RSA      keys (RFC 8017)
    Crypto.Signature.pss      RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt (4.2)
    Crypto.Cipher.PKCS1_OAEP  RSAES-OAEP, SHA-256, MGF1-SHA-256, empty label (4.3)
    Crypto.Cipher.AES         AES-256-GCM, 12-byte nonce, 16-byte tag (4.4)
    Crypto.Protocol.KDF.HKDF  HKDF-SHA256, RFC 5869 (link keys, 8.4)
    Crypto.Hash.SHA256
    (and the standard library's hmac for HMAC-SHA256, 8.4)

What it does, printing each step:

 1. loads its RSA-3072 key from --key FILE, or generates one (4.1), and
    derives its domain from the public key (5.1);
 2. builds and signs its NIS record (5.3), with "host": null: it does not
    listen, so nobody can dial it;
 3. connects to a node at HOST:PORT and runs the handshake as the dialler
    (8.1): both sides send hello; it checks the node's hello and record
    (signature and domain derivation); it draws a 32-byte link secret,
    wraps it for the node's key and signs it into its auth; it checks the
    node's auth and unwraps the node's link secret;
 4. derives the two link keys from both secrets and both nonces (8.4),
    and from then on puts an HMAC on every frame it sends and checks the
    HMAC of every frame it receives; its first MAC'd frame, a ping,
    completes the handshake at the node (8.1);
 5. seals a mail to Default@<the node's domain> (6.1) and sends it in a
    mail frame with hops 8 (7.2);
 6. waits for the node's ack, checks it (7.3) and that it answers this
    mail, makes sure the node answered the ping, and disconnects.

It is a minimal peer: it does not relay other nodes' mail, answer NIS
questions or keep reputation scores.  It answers getpeers and ping, as
every open peer must (5.5, 8.3).

Usage:
    python3 examples/raw_peer.py HOST:PORT [--key FILE]

With --key FILE, the key is read from FILE (PEM, PKCS#8) if it exists, and
generated and written there (mode 0600) if it does not; without --key, a
fresh key is generated and forgotten.  Try it against a local node:

    python3 secral.py node --data-dir /tmp/ex-node --host 127.0.0.1 --port 0
    python3 examples/raw_peer.py 127.0.0.1:<the port it prints>

Exit status: 0 when the node acknowledged the mail as delivered; 1 on any
failure, with the reason on stderr; 2 for a bad command line.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import time

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import RSA
from Crypto.Signature import pss

# -----------------------------------------------------------------------------
# Numbers from the specification (section 10, "Limits")
# -----------------------------------------------------------------------------

PROTOCOL_VERSION = 1            # hello.v (8.1)
AGENT = "raw_peer.py/1 (examples/, written from PROTOCOL.md)"   # at most 128 characters
MAX_LINE = 262_144              # bytes in one line, line feed included (3.1)
MAX_INT = 2**53 - 1             # JSON integers (3.2)
MAX_DEPTH = 16                  # levels of arrays and objects; the outermost is 1 (3.2)
MAX_SUBJECT = 256               # characters (6)
MAX_BODY = 131_072              # bytes of UTF-8 (6)
MAX_PLAINTEXT = 192_000         # bytes of canonical JSON, so every mail fits a line (6.1)
RSA_BITS = 3072                 # the only modulus size (4.1)
RSA_BYTES = 384                 # a signature and a wrapped key (4.2, 4.3)
PSS_SALT = 32                   # (4.2)
AES_KEY, GCM_NONCE, GCM_TAG = 32, 12, 16      # (4.4)
HELLO_NONCE = 16                # (8.1)
LINK_SECRET = 32                # bytes of link secret each side contributes (8.1, 8.4)
LINK_KEY = 32                   # bytes of each HKDF-SHA256 link key (8.4)
MAC_SEQ_BYTES = 8               # the sequence number in a frame MAC: 8 bytes, big-endian (8.4)
MAIL_ID = 16                    # random bytes, written as 32 hex digits (3.3)
RECORD_LIFETIME = 2_592_000     # own record: now + 30 days (5.3)
MAX_RECORD_AHEAD = 2_593_200    # accepted: at most now + 30 days + 2 x 10 minutes of clock
                                # skew, else `future` (5.3 step 10; spec/vectors/records.json)
MAX_FUTURE = 600                # clock skew allowed (7.7)
ACK_LIFETIME = 605_400          # created + 7 days + 10 minutes (7.3)
MAIL_TTL = 3_600                # our mail lives an hour (at most 604,800 s, 6.1)
MAX_HOPS = 8                    # the origin sends 8 (7.2)
WAIT_SECONDS = 15               # how long we wait for each answer

# The canonical DER of an RSA-3072 public key with e = 65537 is always 422
# bytes: this prefix, the 384-byte modulus, this suffix (4.1).
SPKI_PREFIX = bytes.fromhex("308201a2300d06092a864886f70d01010105000382018f003082018a0282018100")
SPKI_SUFFIX = bytes.fromhex("0203010001")

# The error codes that may travel in error frames (9.4).
WIRE_CODES = {"not_json", "too_large", "malformed", "unknown_type", "bad_key", "bad_domain",
              "bad_address", "bad_signature", "expired", "future", "bad_ttl", "bad_hops",
              "decrypt_failed", "not_ready", "bad_mac", "wrong_peer", "self_connection",
              "version"}

B32_LOWER = "abcdefghijklmnopqrstuvwxyz234567"     # RFC 4648 base32 alphabet, lowercase (5.1)
USER_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")   # (5.2)
HOST_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.:-")   # (5.3)
HEX_LOWER = set("0123456789abcdef")


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

def canonical_json(value):
    """3.2: sorted member names, no white space, UTF-8, integers only.

    Python's json.dumps with these options produces exactly the spec's form:
    names sorted by code point; `"` and `\\` escaped; \\b \\t \\n \\f \\r for
    those five controls and \\u00xx (lowercase hex) for the other controls
    U+0000-U+001F; every other character, / and U+007F and U+2028 included,
    written as itself in UTF-8 (ensure_ascii=False).  Secral values contain
    no floats, so allow_nan=False only guards against a bug.  A string with
    an unpaired surrogate has no UTF-8 form: .encode() raises, which the
    spec calls `malformed`.  A port in another language MAY use an RFC 8785
    (JCS) library instead: for Secral values the output is identical.
    """
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ProtocolError("malformed", f"no canonical JSON: {exc}")


# The example of 3.2, as a self-test of the encoder above.
assert canonical_json({"to": "…", "id": 'a"b', "n": -5, "list": [True, None, "é\n"]}) == \
    '{"id":"a\\"b","list":[true,null,"é\\n"],"n":-5,"to":"…"}'.encode("utf-8")


def _strict_int(text):
    value = int(text)                   # "-0" reads as 0 (3.2)
    if abs(value) > MAX_INT:
        raise ValueError("malformed: integer outside +-(2^53 - 1)")
    return value


def _no_float(text):
    raise ValueError(f"malformed: {text} is not an integer")


def _no_constant(text):
    raise SyntaxError(f"not_json: {text}")      # NaN, Infinity, -Infinity


def _strict_object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("malformed: duplicate member name")
    if not all(name.isascii() for name in obj):
        raise ValueError("malformed: non-ASCII member name")
    return obj


def nesting_depth(value):
    """3.2 "Nesting": the outermost value is level 1; each array or object
    inside a level-n value is level n + 1; scalars add no level."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data):
    """Strict Secral JSON (3.2): bytes -> value, or ProtocolError.

    Python's json module already refuses raw control characters inside
    strings, a byte order mark in text and trailing data; the hooks refuse
    floats, big integers, NaN/Infinity, duplicate and non-ASCII names; the
    depth check refuses more than 16 levels of nesting.
    """
    try:
        text = data.decode("utf-8")     # refuses overlong forms and encoded surrogates
    except UnicodeDecodeError:
        raise ProtocolError("not_json", "not UTF-8")
    try:
        value = json.loads(text, parse_int=_strict_int, parse_float=_no_float,
                           parse_constant=_no_constant, object_pairs_hook=_strict_object)
    except SyntaxError as exc:
        raise ProtocolError("not_json", str(exc))
    except RecursionError:
        raise ProtocolError("malformed", "nested too deeply")
    except json.JSONDecodeError as exc:     # a subclass of ValueError: test it first
        raise ProtocolError("not_json", exc.msg)
    except ValueError as exc:
        raise ProtocolError("malformed", str(exc))
    if nesting_depth(value) > MAX_DEPTH:
        raise ProtocolError("malformed", f"nested more than {MAX_DEPTH} levels deep")
    return value


def decode_frame(line):
    """3.1: one received line (line feed included) to a frame."""
    if len(line) > MAX_LINE:
        raise ProtocolError("too_large", f"a line of {len(line)} bytes")
    frame = parse_json(line)
    if not isinstance(frame, dict):
        raise ProtocolError("malformed", "a frame is a JSON object")
    if not isinstance(frame.get("type"), str):
        raise ProtocolError("malformed", 'a frame needs a string "type"')
    return frame


def encode_frame(frame):
    """3.1: a frame is one line: canonical JSON (SHOULD) and a line feed."""
    line = canonical_json(frame) + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError("too_large", "we must never send a line this long")
    return line


def b64e(data):
    """3.3: standard alphabet, with padding."""
    return base64.b64encode(data).decode("ascii")


def b64d(text, what, size=None):
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
    return type(value) is int           # JSON true/false are never integers (3.3)


def is_time(value):
    return is_int(value) and value >= 0     # (3.3)


def has_control(text):
    """U+0000 to U+001F and U+007F: never allowed in a subject (6) or an
    ack's reason (7.3)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def is_hex_id(value):
    """3.3: ids are 32 lowercase hexadecimal digits."""
    return isinstance(value, str) and len(value) == 32 and set(value) <= HEX_LOWER


# =============================================================================
# 4 Cryptography
# =============================================================================

def public_key_der(key):
    """4.1: the canonical DER SubjectPublicKeyInfo, 422 bytes.
    pycryptodome's export_key(format="DER") of a public key is exactly that."""
    der = key.public_key().export_key(format="DER")
    assert len(der) == 422 and der.startswith(SPKI_PREFIX) and der.endswith(SPKI_SUFFIX)
    return der


def parse_public_key(text, what="key"):
    """4.1: check a public key field, in the order of the spec, and return
    the key.  Because the canonical encoding is fixed (prefix, modulus,
    suffix), no DER parser is needed: compare bytes, read the modulus."""
    der = b64d(text, what)                                      # 1. canonical base64
    if (len(der) != 422 or not der.startswith(SPKI_PREFIX)     # 2. canonical DER of
            or not der.endswith(SPKI_SUFFIX)):                  #    RSA-3072, e = 65537
        raise ProtocolError("bad_key", f"{what}: not the canonical RSA-3072 e=65537 encoding")
    modulus = der[len(SPKI_PREFIX):-len(SPKI_SUFFIX)]
    n = int.from_bytes(modulus, "big")
    if n.bit_length() != RSA_BITS:                              #    top bit set
        raise ProtocolError("bad_key", f"{what}: the modulus is not 3072 bits long")
    if n % 2 == 0 or n % 65537 == 0:                            # 3. odd, not divisible by e
        raise ProtocolError("bad_key", f"{what}: impossible modulus")
    return RSA.construct((n, 65537))


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
        pss.new(public_key, salt_bytes=PSS_SALT).verify(SHA256.new(canonical_json(unsigned)), signature)
    except (ValueError, TypeError):
        raise ProtocolError("bad_signature", f"{what}: the signature does not verify")


def wrap_key(public_key, secret, rng=None):
    """4.3: RSAES-OAEP, SHA-256, MGF1-SHA-256 (the default with hashAlgo),
    empty label, the 32-byte seed from `rng` (os.urandom unless a test
    vector supplies it).  The result is 384 bytes.  It wraps a mail's AES
    key (6.1) and, the same way, a link secret in auth (8.1)."""
    wrapped = PKCS1_OAEP.new(public_key, hashAlgo=SHA256, randfunc=rng or os.urandom).encrypt(secret)
    assert len(wrapped) == RSA_BYTES
    return wrapped


def unwrap_key(private_key, wrapped):
    """4.3, the other way: RSAES-OAEP decryption with our private key.  Any
    failure -- a block that does not decrypt, or a result that is not
    exactly 32 bytes long -- is `decrypt_failed`, with one message for both
    (4.3: do not reveal which step failed).  The raw peer only ever unwraps
    the node's link secret (8.1); 32 bytes is what 8.4 needs."""
    try:
        secret = PKCS1_OAEP.new(private_key, hashAlgo=SHA256).decrypt(wrapped)
    except (ValueError, TypeError):
        secret = b""
    if len(secret) != LINK_SECRET:
        raise ProtocolError("decrypt_failed", "the wrapped secret does not open with our key")
    return secret


def hkdf_sha256(ikm, salt, info):
    """8.4: HKDF (RFC 5869) with SHA-256: extract with `salt`, expand with
    `info` to 32 bytes.  pycryptodome's HKDF(master, key_len, salt, hashmod,
    num_keys, context) is exactly that with num_keys = 1."""
    return HKDF(ikm, LINK_KEY, salt, SHA256, 1, info)


def hmac_sha256(key, data):
    """8.4: HMAC (RFC 2104) with SHA-256, the full 32-byte tag."""
    return hmac.new(key, data, hashlib.sha256).digest()


def gcm_seal(aes_key, nonce, plaintext, associated_data):
    """4.4: AES-256-GCM, 12-byte nonce, 16-byte tag appended to the ciphertext."""
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG)
    cipher.update(associated_data)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext + tag


def load_or_generate_key(path):
    """4.1: a node's key is RSA-3072 with e = 65537, kept as unencrypted PEM
    PKCS#8, mode 0600, written atomically (temporary file, flush, rename)."""
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            key = RSA.import_key(f.read())
        if not key.has_private() or key.size_in_bits() != RSA_BITS or key.e != 65537:
            raise ProtocolError("bad_key", f"{path} is not a private RSA-3072 key with e = 65537")
        return key, f"loaded from {path}"
    key = RSA.generate(RSA_BITS, e=65537)
    if not path:
        return key, "generated (not saved; use --key FILE to keep it)"
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_key(format="PEM", pkcs=8))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key, f"generated and saved to {path} (mode 0600)"


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


def parse_address(value, what):
    """5.2: user@domain; the user is 1-64 of A-Z a-z 0-9 . _ -, starting with
    a letter or a digit.  Returns (user, domain); anything else is bad_address."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise ProtocolError("bad_address", f"{what}: not user@domain")
    user, domain = value.split("@")
    if not (1 <= len(user) <= 64 and set(user) <= USER_CHARS and user[0].isalnum()
            and user[0].isascii()):
        raise ProtocolError("bad_address", f"{what}: bad user name {user!r}")
    if not is_domain(domain):
        raise ProtocolError("bad_address", f"{what}: bad domain {domain!r}")
    return user, domain


def make_record(private_key, der, domain, now):
    """5.3: our own record.  We do not listen, so "host" is null and "port"
    is exactly 0.  seq is normally the Unix time of signing; expires is
    now + 30 days."""
    return sign(private_key, {
        "kind": "nis", "domain": domain, "host": None, "port": 0, "key": b64e(der),
        "seq": now, "expires": now + RECORD_LIFETIME,
    })


def verify_record(record, now, what="record"):
    """5.3 "Validity": the checks in the spec's order; the first failure
    decides the error.  Returns the record's public key."""
    if not isinstance(record, dict):                                    # 1
        raise ProtocolError("malformed", f"{what}: not an object")
    types = [                                                           # 2
        ("kind", lambda v: isinstance(v, str), "malformed"),
        ("domain", is_domain, "bad_domain"),
        ("host", lambda v: v is None or (isinstance(v, str) and 1 <= len(v) <= 253
                                         and set(v) <= HOST_CHARS), "malformed"),
        ("port", is_int, "malformed"),
        ("key", lambda v: isinstance(v, str), "malformed"),
        ("seq", is_int, "malformed"),
        ("expires", is_time, "malformed"),
        ("sig", lambda v: isinstance(v, str), "malformed"),
    ]
    for name, check, code in types:
        if name not in record:
            raise ProtocolError("malformed", f"{what}: no {name!r}")
        if not check(record[name]):
            raise ProtocolError(code, f"{what}.{name}: wrong type or form")
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
    if domain_of_der(b64d(record["key"], f"{what}.key")) != record["domain"]:   # 8
        raise ProtocolError("bad_domain", f"{what}: the domain does not derive from the key")
    if record["expires"] <= now:                                        # 9
        raise ProtocolError("expired", f"{what}: expired")
    if record["expires"] > now + MAX_RECORD_AHEAD:                      # 10: the signer's
        raise ProtocolError("future", f"{what}: expires too far ahead")  # clock and ours may
                                                                        # each be 10 min off
    verify_signature(record, key, what)                                 # 11
    return key


# =============================================================================
# 6 Mail
# =============================================================================

def seal_mail(private_key, der, sender, recipient, recipient_key, subject, body, now, ttl):
    """6.1: encrypt and sign a mail.  Random values are drawn in the order
    the spec gives (id, AES key, GCM nonce, OAEP seed, PSS salt), so that
    with fixed random bytes the output matches spec/vectors/mail.json."""
    # First the local checks of 6.1 (refusals to our own user, not wire
    # errors): a valid recipient address, the limits of section 6, the ttl.
    # The sender is never Core: every node refuses mail from Core (6.2).
    parse_address(recipient, "to")
    if sender.split("@")[0].lower() == "core":
        raise ProtocolError("bad_address", "Core sends acks, never mail")
    try:
        body_size = len(body.encode("utf-8"))       # no unpaired surrogates
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("malformed", "the subject or body is not valid Unicode")
    if len(subject) > MAX_SUBJECT:
        raise ProtocolError("too_large", f"the subject is over {MAX_SUBJECT} characters")
    if has_control(subject):
        raise ProtocolError("malformed", "control characters in the subject")
    if body_size > MAX_BODY:
        raise ProtocolError("too_large", f"the body is over {MAX_BODY} bytes")
    if not 0 < ttl <= 604_800:
        raise ProtocolError("bad_ttl", "a mail lives 1 s to 7 days")
    mail_id = os.urandom(MAIL_ID).hex()                                 # 1. id
    aes_key = os.urandom(AES_KEY)                                       # 2. AES key
    nonce = os.urandom(GCM_NONCE)                                       # 3. GCM nonce
    mail = {"kind": "mail", "id": mail_id, "from": sender, "to": recipient,     # 4. envelope
            "from_key": b64e(der), "created": now, "expires": now + ttl}
    plaintext = canonical_json({"body": body, "from": sender,          # 5. plaintext
                                "subject": subject, "to": recipient})
    if len(plaintext) > MAX_PLAINTEXT:      # escapes can make a body up to 6 times longer
        raise ProtocolError("too_large", f"the plaintext is over {MAX_PLAINTEXT} bytes")
    # 4.4: the associated data is the canonical JSON of exactly these five
    # members of the envelope, so a relay cannot readdress the ciphertext,
    # move it to another mail or change its times.
    associated_data = canonical_json({k: mail[k] for k in ("created", "expires", "from", "id", "to")})
    mail["ct"] = b64e(gcm_seal(aes_key, nonce, plaintext, associated_data))    # 6.
    mail["nonce"] = b64e(nonce)                                         # 7.
    mail["key"] = b64e(wrap_key(recipient_key, aes_key))                # 8. OAEP seed
    return sign(private_key, mail), associated_data                     # 9. PSS salt


# =============================================================================
# 7.3 Acks
# =============================================================================

def verify_ack(ack, now, what="ack"):
    """7.3 "Checks", in the spec's order.  Returns the ack."""
    if not isinstance(ack, dict):                                       # 1
        raise ProtocolError("malformed", f"{what}: not an object")
    is_str = lambda v: isinstance(v, str)  # noqa: E731
    for name, check in [("kind", is_str), ("id", is_hex_id), ("from", is_str),    # 2
                        ("to", is_str), ("from_key", is_str), ("created", is_time),
                        ("status", is_str), ("reason", is_str), ("sig", is_str)]:
        if name not in ack or not check(ack[name]):
            raise ProtocolError("malformed", f"{what}.{name}: missing or of the wrong type")
        if name == "reason" and len(ack["reason"]) > 256:
            raise ProtocolError("too_large", f"{what}.reason: over 256 characters")
    if ack["kind"] != "ack":                                            # 3
        raise ProtocolError("malformed", f'{what}.kind is not "ack"')
    signer_user, signer_domain = parse_address(ack["from"], f"{what}.from")     # 4
    target_user, _ = parse_address(ack["to"], f"{what}.to")             # 5
    if signer_user.lower() != "core" or target_user.lower() != "core":  # 6
        raise ProtocolError("bad_address", f"{what}: acks go from Core to Core")
    if ack["status"] not in ("delivered", "rejected"):                  # 7
        raise ProtocolError("malformed", f"{what}.status: {ack['status']!r}")
    if has_control(ack["reason"]):                                      # 8
        raise ProtocolError("malformed", f"{what}.reason: control characters")
    if ack["status"] == "delivered" and ack["reason"] != "":            # 8
        raise ProtocolError("malformed", f"{what}.reason: a delivered ack explains nothing")
    key = parse_public_key(ack["from_key"], f"{what}.from_key")         # 9
    if domain_of_der(b64d(ack["from_key"], f"{what}.from_key")) != signer_domain:   # 10
        raise ProtocolError("bad_domain", f"{what}: from_key is not the key of {signer_domain}")
    if ack["created"] > now + MAX_FUTURE:                               # 11
        raise ProtocolError("future", f"{what}: created in the future")
    if ack["created"] + ACK_LIFETIME <= now:                            # 12
        raise ProtocolError("expired", f"{what}: expired")
    verify_signature(ack, key, what)                                    # 13
    return ack


# =============================================================================
# 8 Connections
# =============================================================================

# -----------------------------------------------------------------------------
# 8.1 The auth frame: a signed statement and a wrapped link secret
# -----------------------------------------------------------------------------
#
# Each side's auth frame carries two members:
#
#   "secret": base64 of a fresh 32-byte *link secret*, wrapped (4.3:
#             RSA-OAEP, SHA-256, MGF1-SHA-256, empty label) to the PEER's
#             public key -- the key in the record of the peer's hello;
#   "sig":    the PSS signature (4.2) of the *auth statement*
#
#     {"domain":<signer's domain>,"kind":"auth","nonce":<the other side's
#      hello nonce>,"peer":<the other side's domain>,"secret":<the same
#      base64 string as the frame's "secret">}
#
# The statement is a signed object that never travels whole: only "secret"
# and "sig" are sent, and the receiver rebuilds the rest.  Signing the
# wrapped secret ties this auth to this connection (the nonce), to these
# two nodes (both domains) and to one set of link keys (the secret): a node
# that relays someone's auth to a third party cannot use the link, because
# it cannot unwrap the secret inside and so cannot compute the MACs (8.4).

def auth_statement(nonce, signer, peer, secret):
    """8.1: the auth statement (without "sig").  `nonce` is the other side's
    hello nonce exactly as received (the base64 string), `secret` the
    base64 string of the wrapped link secret exactly as sent."""
    return {"kind": "auth", "nonce": nonce, "domain": signer, "peer": peer, "secret": secret}


def make_auth(private_key, own_domain, peer_record, peer_nonce, link_secret, rng=None):
    """8.1: our auth frame for a peer whose (already verified) record is
    `peer_record` and whose hello nonce is `peer_nonce`.  Random bytes are
    drawn in this order: the OAEP seed (32 bytes), then the PSS salt (32),
    so that with the bytes of spec/vectors/handshake.json the frame is
    reproduced byte for byte."""
    peer_key = parse_public_key(peer_record["key"], "record.key")
    secret = b64e(wrap_key(peer_key, link_secret, rng))                # 1. OAEP seed
    statement = auth_statement(peer_nonce, own_domain, peer_record["domain"], secret)
    return {"type": "auth", "secret": secret,
            "sig": sign(private_key, statement, rng)["sig"]}            # 2. PSS salt


def verify_auth(frame, record, own_nonce, own_domain):
    """8.1 "Checking an auth", steps 1 and 2: `frame` is the peer's auth,
    `record` the record of its hello.  Checks, in this order (the first
    failure decides the code): "secret" is canonical base64 of exactly 384
    bytes (`malformed`); then the statement rebuilt with domain = the record's domain, nonce =
    OUR hello nonce, peer = OUR domain and secret = the frame's "secret"
    verifies with the record's key (`malformed` for a bad "sig" encoding,
    else `bad_signature`)."""
    b64d(frame["secret"], "auth.secret", RSA_BYTES)
    statement = {**auth_statement(own_nonce, record["domain"], own_domain, frame["secret"]),
                 "sig": frame["sig"]}
    verify_signature(statement, parse_public_key(record["key"], "record.key"), "auth")


def open_auth(private_key, frame):
    """8.1 "Checking an auth", step 3: the peer's link secret, unwrapped with
    our private key (4.3) after verify_auth passed.  `decrypt_failed` if it does not open or is
    not 32 bytes."""
    return unwrap_key(private_key, b64d(frame["secret"], "auth.secret", RSA_BYTES))


# -----------------------------------------------------------------------------
# 8.4 Link keys and frame MACs
# -----------------------------------------------------------------------------
#
# Both link secrets and both hello nonces go into HKDF-SHA256 (RFC 5869):
#
#   IKM  = dialler's secret (32 bytes) || listener's secret (32 bytes)
#   salt = dialler's hello nonce (16 raw bytes, not the base64 text)
#          || listener's hello nonce (16 raw bytes)
#   info = "secral/1 dialler to listener"  -> the key the dialler MACs with
#          "secral/1 listener to dialler"  -> the key the listener MACs with
#   L    = 32 bytes each
#
# "Dialler" and "listener" are roles on this TCP connection, not names: the
# raw peer always dials, so it sends with the first key and checks with the
# second.  Every frame a side sends after its own auth carries
#
#   "mac": base64( HMAC-SHA256(its send key,
#                  seq as 8 bytes big-endian || canonical JSON (3.2) of the
#                  frame without "mac") )
#
# where seq counts that side's MAC'd frames on this connection from 0.  The
# auth frames themselves carry no MAC.  The receiver recomputes the MAC from
# the frame as decoded (canonical JSON, so the sender's spelling of the line
# does not matter) with its own counter for the other direction; a frame
# without a valid MAC -- missing, wrong, replayed at another position, sent
# with the other direction's key, or a line that does not decode -- is
# `bad_mac`, and the node that receives one disconnects (9.1).

def link_keys(dialler_secret, listener_secret, dialler_nonce, listener_nonce):
    """8.4: (dialler-to-listener key, listener-to-dialler key).  The nonces
    are the base64 strings of the two hellos."""
    ikm = dialler_secret + listener_secret
    salt = (b64d(dialler_nonce, "dialler nonce", HELLO_NONCE)
            + b64d(listener_nonce, "listener nonce", HELLO_NONCE))
    return (hkdf_sha256(ikm, salt, b"secral/1 dialler to listener"),
            hkdf_sha256(ikm, salt, b"secral/1 listener to dialler"))


def frame_mac(key, seq, frame):
    """8.4: the base64 MAC of `frame` (any "mac" member left out) as the
    seq-th MAC'd frame in its direction."""
    unmacd = {k: v for k, v in frame.items() if k != "mac"}
    return b64e(hmac_sha256(key, seq.to_bytes(MAC_SEQ_BYTES, "big") + canonical_json(unmacd)))


def add_mac(key, seq, frame):
    """8.4: the frame with its "mac" member added."""
    return {**frame, "mac": frame_mac(key, seq, frame)}


def check_mac(key, seq, frame):
    """8.4: raise `bad_mac` unless `frame` carries the right MAC for `key`
    and `seq`.  The comparison is constant-time (hmac.compare_digest, which
    wants ASCII strings); a frame with no canonical JSON form (3.2, e.g. an
    unpaired surrogate) has no valid MAC either."""
    mac = frame.get("mac")
    try:
        good = (isinstance(mac, str) and mac.isascii()
                and hmac.compare_digest(mac, frame_mac(key, seq, frame)))
    except ProtocolError:
        good = False
    if not good:
        raise ProtocolError("bad_mac", f"frame {seq} on this link has no valid MAC")


# 8.2: the members each frame type must carry, as (name, check, error code).
FRAME_MEMBERS = {
    "hello": [("v", is_int, "malformed"), ("record", lambda v: isinstance(v, dict), "malformed"),
              ("nonce", lambda v: isinstance(v, str), "malformed"),
              ("agent", lambda v: isinstance(v, str), "malformed"),
              ("agent", lambda v: len(v) <= 128, "too_large")],
    "auth": [("secret", lambda v: isinstance(v, str), "malformed"),      # 8.1
             ("sig", lambda v: isinstance(v, str), "malformed")],
    "mail": [("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 8, "bad_hops"),
             ("mail", lambda v: isinstance(v, dict), "malformed")],
    "ack": [("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 8, "bad_hops"),
            ("ack", lambda v: isinstance(v, dict), "malformed")],
    "nis_query": [("qid", is_hex_id, "malformed"), ("domain", is_domain, "bad_domain"),
                  ("hops", is_int, "malformed"), ("hops", lambda v: 0 <= v <= 3, "bad_hops")],
    "nis_answer": [("qid", is_hex_id, "malformed"),
                   ("record", lambda v: isinstance(v, dict), "malformed")],
    "getpeers": [], "ping": [], "pong": [],
    "peers": [("records", lambda v: isinstance(v, list), "malformed")],
    "error": [("code", lambda v: isinstance(v, str), "malformed"),
              ("code", lambda v: len(v) <= 64, "too_large"),
              ("message", lambda v: isinstance(v, str), "malformed"),
              ("message", lambda v: len(v) <= 1024, "too_large")],
}


def check_frame(frame):
    """8.2: the type is known and the listed members are there and valid.
    Members not listed are ignored (3.1)."""
    table = FRAME_MEMBERS.get(frame["type"])
    if table is None:
        raise ProtocolError("unknown_type", f"frame type {frame['type'][:40]!r}")
    for name, check, code in table:
        if name not in frame:
            raise ProtocolError("malformed", f"{frame['type']}: no {name!r}")
        if not check(frame[name]):
            raise ProtocolError(code, f"{frame['type']}.{name}: wrong type or out of range")
    return frame


class Link:
    """One TCP connection: frames out, frames in (3.1), and once the link
    keys are set (8.4), a MAC on every frame each way."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=WAIT_SECONDS)
        self.rfile = self.sock.makefile("rb")
        self.tx_key = None              # 8.4: the key we MAC with (dialler to listener) ...
        self.rx_key = None              # ... and the key the node MACs with (listener to dialler)
        self.tx_seq = 0                 # our MAC'd frames so far on this connection
        self.rx_seq = 0                 # the node's MAC'd frames so far
        self.pongs = 0                  # answers to our ping (8.3)

    def set_keys(self, tx_key, rx_key):
        """8.4: from now on every frame we send carries a MAC, and every frame
        the node sends must.  Both counters start at 0."""
        self.tx_key, self.rx_key = tx_key, rx_key
        self.tx_seq = self.rx_seq = 0

    def send(self, frame):
        """Send one frame; with the link keys set, add its MAC (8.4) using
        the next sequence number of our direction.  Returns the line's size."""
        if self.tx_key is not None:
            frame = add_mac(self.tx_key, self.tx_seq, frame)
            self.tx_seq += 1
        line = encode_frame(frame)
        try:
            self.sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            self.raise_parting_error()          # the node hung up: say why, if it said
            raise
        return len(line)

    def raise_parting_error(self):
        """A node sends an error frame before it closes (9.4).  If the
        connection broke under us, read what is left and report that frame
        (it is MAC'd like any other, 8.4) instead of a bare broken pipe."""
        try:
            self.sock.settimeout(1)
            while True:
                frame = self.receive()
                if frame["type"] == "error" and "ref" not in frame:
                    refuse(frame, "and closed the connection")
        except (ProtocolError, OSError) as exc:
            if getattr(exc, "from_node", False):
                raise

    def receive(self):
        """The next frame, checked by 3.1, 8.4 and 8.2, in the order a node
        processes a line (8.2 "Processing a line").  Never buffer more than
        MAX_LINE bytes of one line: a longer one cannot be resynchronised."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise ProtocolError("closed", "the node closed the connection")
        if len(line) > MAX_LINE:
            raise ProtocolError("too_large", "the node sent an oversize line")
        if not line.endswith(b"\n"):
            raise ProtocolError("closed", "the connection ended in the middle of a line")
        if self.rx_key is None:                 # before the node's auth: no MACs yet
            return check_frame(decode_frame(line))
        # 8.4 "Checking" (and 8.2 "Processing a line", step 3): on a keyed
        # link only a frame with a valid MAC counts.  A line that does not
        # even decode cannot carry one, so it too is bad_mac, whatever the
        # decoding error (not not_json / malformed).  The MAC is checked
        # before the frame's type and members (8.2), and every line uses up
        # its receive sequence number, whatever becomes of it (8.4
        # "Sequence numbers"); a failure ends the connection anyway.  (An
        # oversize line, above, stays too_large: 3.1 handles it before any
        # decoding, keyed link or not.)
        seq, self.rx_seq = self.rx_seq, self.rx_seq + 1
        try:
            frame = decode_frame(line)
            check_mac(self.rx_key, seq, frame)
        except ProtocolError as exc:
            raise ProtocolError("bad_mac", f"frame {seq} from the node: {exc.message}")
        return check_frame(frame)     # "mac" is not listed in 8.2, so it is ignored there

    def close(self, code=None, message=""):
        """An error frame without ref announces a deliberate disconnect (9.4).
        After the handshake it carries a MAC like every other frame (8.4)."""
        try:
            if code:
                self.send({"type": "error", "code": code, "message": message})
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ProtocolError):        # already closed: nothing more to say
            pass
        self.sock.close()


def refuse(frame, during):
    """An error frame from the node: it refused us or is hanging up (9.4)."""
    exc = ProtocolError(frame["code"], f"the node sent error {frame['code']!r} {during}: "
                                       f"{frame['message']}")
    exc.from_node = True
    raise exc


def handshake(link, private_key, own_domain, own_record):
    """8.1 as the dialler, then the link keys of 8.4.  Returns (the node's
    domain, record, public key).  On return the link is keyed and our first
    MAC'd frame (a ping) is sent, which opens the connection at the node."""
    # Connection start: each side sends hello at once, without waiting.  The
    # nonce is a fresh 16-byte challenge; the other side signs it in its auth,
    # and both nonces salt the link keys (8.4).
    own_nonce = b64e(os.urandom(HELLO_NONCE))
    link.send({"type": "hello", "v": PROTOCOL_VERSION, "record": own_record,
               "nonce": own_nonce, "agent": AGENT})
    step(5, f"sent hello (8.1): v 1, our record, nonce {own_nonce}")

    # Receiving hello, checked in the order of 8.1.  A node that refuses us
    # (busy, banned: 9.2, 9.3) sends an error frame before any hello.
    hello = link.receive()
    if hello["type"] == "error":
        refuse(hello, "instead of hello")
    if hello["type"] != "hello":
        raise ProtocolError("not_ready", f"expected hello, got {hello['type']}")
    if hello["v"] != PROTOCOL_VERSION:                                  # 1
        raise ProtocolError("version", f"the node speaks v{hello['v']}; we speak v1")
    b64d(hello["nonce"], "hello.nonce", HELLO_NONCE)                    # 2
    now = int(time.time())
    node_key = verify_record(hello["record"], now, "hello.record")     # 3: 5.3, incl. the
    node_domain = hello["record"]["domain"]                             #    signature and the
    if node_domain == own_domain:                                       #    domain derivation
        raise ProtocolError("self_connection", "the node has our own domain")   # 4
    # 5 (wrong_peer) applies only to a dial that expects a domain; like a
    # bootstrap dial (5.5), we accept whichever node answers.  6 (banned): we
    # keep no scores.
    record = hello["record"]
    node_nonce = hello["nonce"]
    step(6, f"received hello from {node_domain}")
    info(f"agent {hello['agent']!r}; record: host {record['host']} port {record['port']} "
         f"seq {record['seq']}")
    info("record verified (5.3): key canonical RSA-3072, domain = base32(SHA-256(key)[:15]), "
         "PSS signature good")

    # 7: the state becomes "auth".  We are the dialler, so we sign first
    # (8.1): a listener MUST NOT send its auth before the dialler's has
    # verified, so replaying a public record earns nobody a signature.
    # Our auth carries a fresh 32-byte link secret wrapped to the NODE's key
    # (the key of the record it just proved in its hello), and the signature
    # of the statement {domain: ours, kind: "auth", nonce: the node's nonce
    # as received, peer: the node's domain, secret: that same base64 text}.
    own_secret = os.urandom(LINK_SECRET)
    auth = make_auth(private_key, own_domain, record, node_nonce, own_secret)
    link.send(auth)
    statement = auth_statement(node_nonce, own_domain, node_domain, auth["secret"])
    step(7, "sent auth (8.1): our 32-byte link secret wrapped to the node's key (RSA-OAEP, 4.3), "
            "and a PSS signature over")
    info(canonical_json({**statement, "secret": auth["secret"][:16] + "..."}).decode())

    # 8.1 "Receiving auth as the listener" happens at the node: it checks
    # ours ("Checking an auth": secret, signature, unwrap), then answers
    # with its own auth: its own fresh link secret wrapped to OUR key, signed
    # into the statement {domain: the node's, kind: "auth", nonce: OUR hello
    # nonce, peer: our domain, secret: its "secret"}.  We run the same three
    # checks: rebuild that statement and verify it with the key of the record
    # in its hello (the node has now proven its domain -- and, since the
    # statement covers the wrapped secret, that this secret is the one it
    # chose for us), then unwrap the secret with our private key.
    auth = link.receive()
    if auth["type"] == "error":
        refuse(auth, "instead of auth")
    if auth["type"] != "auth":
        raise ProtocolError("not_ready", f"expected auth, got {auth['type']}")
    verify_auth(auth, record, own_nonce, own_domain)
    node_secret = open_auth(private_key, auth)
    step(8, "received auth: the node signed our nonce and its wrapped link secret with the key "
            "of its record; the secret opened with our key")

    # 8.1 "Receiving auth as the dialler", step 1, and 8.4 "Deriving the
    # keys": the link keys.  We dialled, so our secret and nonce come first in
    # IKM and salt, and we send with "dialler to listener".  From here on
    # every frame either way carries a MAC; the auth frames did not.
    tx_key, rx_key = link_keys(own_secret, node_secret, own_nonce, node_nonce)
    link.set_keys(tx_key, rx_key)
    # 8.1 "Confirmation": the listener waits in state `confirm` for the
    # dialler's first frame with a valid MAC -- the proof that whoever sits
    # at this end holds the link keys, not a relay of someone else's auth.
    # Until that frame arrives it sends nothing more, and 10 s after the TCP
    # connection was made it gives up (timeout).  A dialler MUST send at
    # least one frame as soon as it opens; one with nothing to say sends a
    # ping, and the node MUST answer it with a pong (8.3), whose MAC we then
    # check like any other.  (Our getpeers follows right after.)
    link.send({"type": "ping"})
    step(9, "derived the link keys (8.4, HKDF-SHA256) and sent ping, our first MAC'd frame "
            "(seq 0); the connection is open")
    return node_domain, record, node_key


def serve_until(link, want, what):
    """Handle what an open peer must handle until `want(frame)` is true;
    return that frame.  Everything else is answered or ignored.  Every frame
    arriving here has already passed its MAC check in Link.receive (8.4)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        link.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            frame = link.receive()
        except socket.timeout:
            break
        kind = frame["type"]
        info(f"<- {kind} (MAC good, node's frame {link.rx_seq - 1})")
        if want(frame):
            return frame
        if kind == "getpeers":
            # 5.5: our own record only if it has a host (ours has none), then
            # our other open peers (we have none): an empty list is the answer.
            link.send({"type": "peers", "records": []})
            info("   node asked getpeers; answered with peers [] (we have no host and no other peers)")
        elif kind == "peers":
            if len(frame["records"]) > 32:
                raise ProtocolError("too_large", "more than 32 records in peers")
            good = 0
            for record in frame["records"]:     # each record on its own (5.5)
                try:
                    verify_record(record, int(time.time()), "peers.record")
                    good += 1
                except ProtocolError as exc:
                    info(f"   ignoring an invalid record ({exc})")
            info(f"   node sent peers: {len(frame['records'])} records, {good} valid")
        elif kind == "ping":
            link.send({"type": "pong"})                                 # 8.3: MUST answer
        elif kind == "pong":
            link.pongs += 1
            info("   the node answered our ping: it accepted our MACs")
        elif kind == "error":
            if "ref" in frame and not is_hex_id(frame["ref"]):         # 8.2, 9.4
                raise ProtocolError("malformed", "error.ref is not 32 lowercase hex digits")
            if "ref" not in frame:
                refuse(frame, f"while waiting for {what}")
            info(f"   node refused object {frame['ref']}: {frame['code']} {frame['message']}")
        elif kind in ("hello", "auth"):
            raise ProtocolError("not_ready", f"{kind} on an open connection")
        else:
            # mail and acks for others, nis_query, nis_answer: a full node
            # would relay or answer them (5.4, 7.2); this one does not.
            info(f"   a minimal peer ignores {kind}")
    raise ProtocolError("timeout", f"no {what} within {WAIT_SECONDS} s")


# =============================================================================
# The run
# =============================================================================

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="raw_peer.py",
        description="A Secral peer written from spec/PROTOCOL.md alone: dial a node, "
                    "mail Default@<its domain>, check the ack.")
    parser.add_argument("target", metavar="HOST:PORT", help="the node to dial, e.g. 127.0.0.1:7700")
    parser.add_argument("--key", metavar="FILE",
                        help="PEM PKCS#8 key file: loaded if it exists, else generated and saved")
    args = parser.parse_args(argv)
    host, sep, port = args.target.rpartition(":")
    host = host.strip("[]")                             # [::1]:7700
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"bad HOST:PORT {args.target!r}")
    return parser, host, int(port), args.key


def run(host, port, key_file):
    # -- 1. our key and domain (4.1, 5.1) --------------------------------------
    started = time.monotonic()
    private_key, how = load_or_generate_key(key_file)
    der = public_key_der(private_key)
    own_domain = domain_of_der(der)
    step(1, f"RSA-3072 key {how} ({time.monotonic() - started:.1f} s)")
    step(2, f"our domain (5.1): {own_domain}")

    # -- 2. our NIS record (5.3) ----------------------------------------------
    now = int(time.time())
    own_record = make_record(private_key, der, own_domain, now)
    verify_record(own_record, now)          # our own checks must accept it too
    step(3, f"signed our NIS record (5.3): host null, port 0, seq {own_record['seq']}, "
            f"{len(canonical_json(own_record))} bytes of canonical JSON")

    # -- 3. connect, handshake (8.1) and link keys (8.4) ------------------------
    link = Link(host, port)
    step(4, f"connected to {host}:{port}")
    try:
        node_domain, node_record, node_key = handshake(link, private_key, own_domain, own_record)
        # 5.5: right after the handshake each side sends getpeers (MAC'd, seq 1).
        link.send({"type": "getpeers"})

        # -- 4. seal and send a mail (6.1, 7.2) -----------------------------------
        sender, recipient = f"Default@{own_domain}", f"Default@{node_domain}"
        subject = "Hello from a raw peer"
        body = ("This mail was sealed by examples/raw_peer.py, which implements\n"
                "spec/PROTOCOL.md without importing secral.py.")
        now = int(time.time())
        mail, associated_data = seal_mail(private_key, der, sender, recipient, node_key,
                                          subject, body, now, MAIL_TTL)
        step(10, f"sealed mail {mail['id']} (6.1)")
        info(f"from {sender}")
        info(f"to   {recipient}")
        info(f"AES-256-GCM, associated data {associated_data.decode()}")
        info("AES key wrapped with RSA-OAEP-SHA256 for the node's key; mail signed with RSA-PSS")
        size = link.send({"type": "mail", "hops": MAX_HOPS, "mail": mail})
        step(11, f"sent mail frame, hops {MAX_HOPS}, MAC'd as our frame {link.tx_seq - 1} "
                 f"({size} bytes)")

        # -- 5. the ack (7.3, 7.4) -------------------------------------------------
        frame = serve_until(link,
                            lambda f: f["type"] == "ack" and f["ack"].get("id") == mail["id"],
                            "ack")
        ack = verify_ack(frame["ack"], int(time.time()), "ack")
        step(12, f"received ack (hops {frame['hops']}); checks of 7.3 passed, signature good")
        # It must answer *our* mail and come from the node we mailed: the
        # ack's signer is Core@<recipient domain>, its target Core@<our domain>,
        # and its key must be the one the recipient's record named.
        if ack["from"].split("@")[1] != node_domain or ack["from_key"] != node_record["key"]:
            raise ProtocolError("bad_domain", f"the ack was signed by {ack['from']}, not {node_domain}")
        if ack["to"].split("@")[1] != own_domain:
            raise ProtocolError("bad_address", f"the ack is for {ack['to']}, not for us")
        info(f"from {ack['from']} to {ack['to']}, created {ack['created']}, "
             f"status {ack['status']!r}, reason {ack['reason']!r}")
        if ack["status"] != "delivered":
            # A valid "rejected" ack is the node's honest answer (7.4), not a
            # fault: report it, send no error frame.
            exc = ProtocolError("rejected", f"the node rejected the mail: {ack['reason']}")
            exc.from_node = True
            raise exc
        # The node answers our ping in order, so its pong normally came
        # before the ack; if not, wait for it (8.3: a node MUST answer).
        if not link.pongs:
            serve_until(link, lambda f: f["type"] == "pong", "pong")
            link.pongs += 1
        step(13, f"delivered: {recipient} has the mail; pong received; "
                 f"{link.rx_seq} frames from the node and {link.tx_seq} of ours carried valid MACs; "
                 f"disconnecting")
        link.close("shutdown", "raw_peer.py is done")
    except ProtocolError as exc:
        # What the node sent broke a rule: say which with an error frame,
        # then hang up (8.1 "Handshake failures", 9.4).  Local conditions
        # (the connection closed, our own wait timed out) and the node's own error
        # frames get no answer.
        wire = exc.code in WIRE_CODES and not exc.from_node
        link.close(exc.code if wire else None, exc.message[:1024])
        raise
    except BaseException:
        link.close()
        raise


def main(argv=None):
    parser, host, port, key_file = parse_args(argv)
    started = time.monotonic()
    try:
        run(host, port, key_file)
    except ProtocolError as exc:
        parser.exit(1, f"FAILED: {exc}\n")              # argparse writes to stderr
    except OSError as exc:
        parser.exit(1, f"FAILED: network error talking to {host}:{port}: {exc}\n")
    print(f"OK ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
