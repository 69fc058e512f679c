#!/usr/bin/env python3
"""Secral: end-to-end encrypted mail over a peer-to-peer network.

What it is
----------
Secral carries email-like messages -- a subject, one recipient, a body --
between people with no server in the middle.  Everyone runs a node, and
every node is both client and server.  A node that is not connected to a
mail's recipient hands the mail to its peers, which relay it; a node that
cannot reach the recipient keeps the mail and delivers it when the
recipient comes online, a day later or more.  Only the recipient can read
a mail: it is sealed with AES-256-GCM under a fresh key wrapped with the
recipient's RSA mail key of the week, and signed by the sender's node.  A
node's long-lived key only signs; each week's mail key is deleted once no
valid mail can still be sealed to it, so a key stolen at time T opens mail
sealed at most 14 days and 40 minutes before T (section 5.6).

Nodes are named by NIS, a DNS-like system in which a name is a hash of a
public key: `node-` and 24 base32 letters.  An address is `user@node-...`.
Every node has the system user `Core`, which signs receipts (acks) and asks
the network for NIS records, and the user `Default`.

This file is the protocol's reference implementation, written to be read.
spec/PROTOCOL.md is the normative text and spec/vectors/ its test vectors;
the section numbers cited in docstrings below are PROTOCOL.md's.

Threat model
------------
Relays and eavesdroppers are assumed hostile.  Every link is TLS 1.3, so
an eavesdropper sees IP addresses, timing and byte counts, nothing more.  A
relay reads a mail's envelope: the two nodes' domains, times and a size
bucket, never the users, the subject or the body, which are sealed.  Nobody
can alter or forge a mail, an ack or a NIS record: each is signed, and
names are checked against keys.  The listener's TLS certificate holds its
node key; the dialler signs an auth that names the listener TLS proved, so
a node cannot borrow the identity of a node that dialled it.  Peers that send
garbage, forgeries or floods lose reputation and are disconnected and
banned (section 9).  A node trusts its own disk and clock; a clock may be
wrong by 10 minutes, so two nodes may disagree by 20.

How a mail travels
------------------
    sender node                    relay                      recipient node
    seal + sign, store in outbox
    mail ------------------------> verify (no key needed)
                                   store, then forward ------> verify, decrypt
                                                               store in inbox
                                   ack <---------------------- Core signs ack
    outbox: delivered <----------- drop stored copy, forward

If the recipient is offline, relays keep the mail (and flood it to their
peers within a hop limit) until the recipient connects to one of them; the
ack follows the mail back, and every copy is dropped as it passes.

Reading order (sections of this file)
-------------------------------------
    Constants            every limit, with its reason
    Errors               RemoteError (their fault) and LocalError (ours), codes
    Encoding             canonical JSON, base64, frames, field checks
    Cryptography         RSA-PSS, RSA-OAEP, AES-GCM, the link certificate;
                         the only pycryptodome use
    Names and NIS        domains, addresses, NIS records
    Protocol objects     mail (padded, with parts), acks, hello/auth
    Reputation           the score table, decay and bans
    Routing core         Node and its engines: the whole protocol, sans-IO
                         (no sockets, no clock, no logs), the frame table
    ---- the protocol ends here; the program that runs it begins ----
    Stores               shelve over SQLite, durable and thread-safe
    Network shell        sockets, TLS 1.3 (stdlib ssl) and threads around the core
    Control interface    the local port the CLI talks to
    Mail clients         SMTP submission, IMAP and POP3 on 127.0.0.1: whole
                         MIME messages in and out, bounces
    Command line         python3 secral.py node | send | inbox | ...
    Tools                python3 secral.py demo | bench, and WirePeer

Everything above the line is what a port must reproduce, byte for byte on
the wire; the TLS under it (8.1) comes from any TLS 1.3 library, the shell
here using the stdlib's, and the core decides what the certificate means.
Everything below the line is one way to run a node (a port may store,
thread and present things differently, as long as it keeps the rules of
Appendix B that make acked mail durable).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import os
import platform
import random
import re
import secrets
import select
import shelve
import shutil
import signal
import socket
import socketserver
import ssl
import sqlite3
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

__version__ = "1.0.0"

log = logging.getLogger("secral")


# =============================================================================
# Constants
# =============================================================================
# The limits of the protocol, each with the reason for its value.  Timing and
# resource bounds head the routing core, reputation weights the reputation
# section; spec/PROTOCOL.md section 10 ("Limits") lists them all.

PROTOCOL_VERSION = 3            # the "v" of hello; a peer with another v is refused
AGENT = f"secral.py/{__version__}"
DEFAULT_PORT = 7700             # TCP port a node listens on unless told otherwise

# -- Wire limits (PROTOCOL.md section 3) --
MAX_LINE = 262_144              # bytes in one frame, newline included: room for the
                                # largest mail (see MAX_PLAINTEXT) with ~4 KB to spare
MAX_INT = 2**53 - 1             # JSON integers stay exact in every language's double
MAX_SUBJECT = 256               # characters (code points) in a subject
MAX_BODY = 131_072              # bytes of UTF-8 in a body (128 KiB)
MAX_PLAINTEXT = 192_000         # bytes of sealed canonical JSON: escapes can make a
                                # 128 KiB body longer, and every mail must fit a frame
PAD_BUCKETS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, MAX_PLAINTEXT)
                                # the sizes a sealed plaintext may have (6.1): a relay
                                # or an observer learns the bucket, never the length;
                                # each bucket at most doubles what it pads
MAX_PARTS = 32                  # parts of a mail beside its text body (attachments ...)
MAX_MEDIA_TYPE = 127            # characters in a part's media type (RFC 6838's limit)
MAX_FILE_NAME = 255             # characters in a part's file name (most file systems')
MAX_DEPTH = 16                  # nesting of arrays/objects in a frame (Secral needs 5)
MAX_HOPS = 8                    # relay steps a mail or ack may still take
MAX_TTL = 7 * 86_400            # a mail lives at most 7 days after it was created
MAX_FUTURE = 600                # a node's clock may be off by 10 minutes ...
CLOCK_TOLERANCE = 2 * MAX_FUTURE  # ... so two honest clocks may differ by 20: every
                                # check of another node's timestamp allows that much
MAX_REASON = 256                # characters in an ack's reason
MAX_AGENT = 128                 # characters in hello's agent string
MAX_HOST = 253                  # characters in a record's host (a DNS name's limit)
MAX_PEER_RECORDS = 32           # records in one peers frame
MAX_ERROR_CODE = 64             # characters in an error frame's code ...
MAX_ERROR_MESSAGE = 1024        # ... and in its message
QUERY_ID = 16                   # random bytes in a nis_query id (32 hex characters)

# -- Cryptography (PROTOCOL.md section 4) --
RSA_BITS = 3072                 # ~128-bit security; the only size a node accepts
RSA_EXPONENT = 65537            # the only public exponent a node accepts
RSA_BYTES = RSA_BITS // 8       # length of a signature and of a wrapped key
PSS_SALT = 32                   # bytes of salt in each signature (= SHA-256 size)
SHA256_BYTES = 32               # a SHA-256 digest
AES_KEY = 32                    # AES-256
GCM_NONCE = 12                  # bytes; the size GCM is designed for
GCM_TAG = 16                    # bytes, appended to the ciphertext
HELLO_NONCE = 16                # bytes of challenge in hello
MAIL_ID = 16                    # random bytes in a mail id (32 hex characters)

# -- Names (PROTOCOL.md section 5) --
DOMAIN_PREFIX = "node-"
DOMAIN_HASH_BYTES = 15          # 120 bits of SHA-256: 24 base32 characters
CORE_USER = "Core"              # system user: signs acks, asks NIS questions
DEFAULT_USER = "Default"        # the user every node has from the start
RECORD_LIFETIME = 30 * 86_400   # a node's own NIS record is valid for 30 days ...
RECORD_REFRESH = 15 * 86_400    # ... and is re-signed when less than 15 remain
MAX_RECORD_LIFETIME = RECORD_LIFETIME + CLOCK_TOLERANCE   # longer-lived records are refused

# -- Mail keys (PROTOCOL.md 5.3, 6.1, 6.3, 12.4): forward secrecy for mail --
MAIL_KEY_EPOCH = 7 * 86_400     # an epoch, from Unix time 0: the mail sealed to a node in
                                # one epoch is wrapped to that epoch's mail key
MAIL_KEY_RETENTION = MAX_TTL + CLOCK_TOLERANCE  # an epoch's private key outlives the epoch
                                # by the longest a mail sealed in it can still arrive, then
                                # it is deleted: a key stolen at T opens mail sealed since
                                # T - MAIL_KEY_EPOCH - MAIL_KEY_RETENTION - CLOCK_TOLERANCE
                                # at the earliest (14 days 40 minutes)
MAX_MAIL_KEYS = MAX_RECORD_LIFETIME // MAIL_KEY_EPOCH + 2   # a record lists a key for every
                                # epoch its lifetime touches (at most 6), so a node offline
                                # for all of it can still be written to
MAIL_KEY_ID = 16                # bytes of SHA-256 of a mail key's DER: the envelope's key_id
MAIL_KEYS_AHEAD = RECORD_LIFETIME + MAIL_KEY_EPOCH   # how far ahead a node makes its keys,
                                # in the background, so a record refresh never waits ...
MAIL_KEY_REST = 20              # ... resting 20 times as long as each key took: a node
                                # spends at most a twentieth of a core on them
NIS_HOPS = 3                    # how far a nis_query travels
MAX_NIS_RECORDS = 10_000        # records kept in the NIS map (soonest to expire go first)
MAX_KNOWN_PEERS = 1_000         # addresses kept for reconnecting
KNOWN_PEER_FAILURES = 10        # an address that failed this often, unseen for a week, goes
NIS_TIMEOUT = 6                 # seconds an asker waits for a nis_answer


# =============================================================================
# Errors
# =============================================================================
# Like h11, Secral separates whose fault an error is.  A RemoteError means the
# bytes came from outside and broke a rule: the peer is scored and, where the
# spec says, disconnected.  A LocalError means the local user or program asked
# for something impossible (an unknown user, no node running).  Both carry a
# short `code` from the closed list below; the same codes appear in `error`
# frames, in rejected acks and as the `expect` value of spec/vectors.

ERROR_CODES = {
    # code               meaning
    "not_json":          "a line is not UTF-8 JSON",
    "too_large":         "a line, subject or body is over its limit",
    "malformed":         "a frame or object lacks a field, has a wrong type or value",
    "unknown_type":      "a frame type this node does not know",
    "bad_key":           "not a canonical RSA-3072, e=65537 public key",
    "bad_domain":        "a domain is misspelt or does not derive from the key",
    "bad_address":       "an address is not user@node-..., or a mail is sealed from Core",
    "bad_signature":     "a signature does not verify",
    "expired":           "an object is past its expiry",
    "future":            "an object was created too far in the future",
    "bad_ttl":           "an object's lifetime is longer than allowed",
    "bad_hops":          "a hop count outside 0..8 (or 0..3 for NIS)",
    "decrypt_failed":    "the wrapped key or the ciphertext does not open",
    "mismatch":          "the sealed addresses are not at the envelope's domains",
    "wrong_recipient":   "the mail is not addressed to this node",
    "no_such_user":      "the recipient user does not exist on its node",
    "unknown_key":       "a mail is sealed to a mail key its recipient never had",
    "retired_key":       "a mail is sealed to a mail key its recipient has deleted",
    "not_ready":         "a frame other than hello/auth before the handshake",
    "bad_tls":           "the bytes where a TLS 1.3 handshake belongs are not one",
    "wrong_peer":        "the peer is not the node that was dialled",
    "self_connection":   "a node connected to itself",
    "duplicate_connection": "a second connection between the same two nodes",
    "version":           "a protocol version this node does not speak",
    "timeout":           "a handshake or an idle connection took too long",
    "rate_exceeded":     "frames faster than the rate limit",
    "duplicate":         "the same object twice on one connection",
    "quota_exceeded":    "the relay store is full for this origin or in total",
    "banned":            "reputation reached -100: disconnected and banned",
    "busy":              "too many connections",
    "shutdown":          "the node is stopping",
    # local errors (never on the wire)
    "not_running":       "no node is running for this data directory",
    "not_found":         "no such mail, record, user or contact",
    "exists":            "the name is already taken",
    "refused":           "the operation is not allowed",
    "unauthorized":      "the control token is missing or wrong",
}


class SecralError(Exception):
    """An error with a short machine-readable code from ERROR_CODES."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(SecralError):
    """Input from outside (a peer, a frame, an object) broke a protocol rule."""


class LocalError(SecralError):
    """The local user or caller asked for something that cannot be done."""


def local_error(exc: RemoteError) -> LocalError:
    """A rule of the protocol broken by the local user's own input is the
    user's error, not a peer's (the same code, a local class)."""
    return LocalError(exc.code, exc.message)


# =============================================================================
# Encoding
# =============================================================================
# PROTOCOL.md section 3.  One frame is one JSON object on one line.  Signatures
# cover the *canonical* JSON of an object: keys sorted, no whitespace, UTF-8,
# integers only.  For the values Secral allows (ASCII member names, integers
# below 2**53, no floats) this is byte-identical to RFC 8785 (JCS).

def canonical_json(obj: Any) -> bytes:
    """The canonical encoding of `obj` (PROTOCOL.md 3.2)."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        # A lone surrogate escape ("\ud800") parses but cannot be UTF-8.
        raise RemoteError("malformed", f"not encodable as canonical JSON: {exc}")


def b64e(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 section 4)."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str, size: int | None = None) -> bytes:
    """Decode strict, canonical base64; `size`, if given, is the exact length."""
    if not isinstance(text, str) or not text.isascii():
        raise RemoteError("malformed", f"{what}: expected a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteError("malformed", f"{what}: invalid base64")
    if b64e(data) != text:      # stray padding bits: two spellings of one value
        raise RemoteError("malformed", f"{what}: non-canonical base64")
    if size is not None and len(data) != size:
        raise RemoteError("malformed", f"{what}: expected {size} bytes, got {len(data)}")
    return data


# A line is judged in one fixed order (3.2), so that every port gives the
# same code for a line that breaks several rules: first the JSON grammar of
# RFC 8259 (not_json), then Secral's own rules on what the JSON holds
# (malformed).  Python's json module calls its hooks while it parses; ours
# only note what they saw, and the notes count once the whole line parsed.

_JSON_TOKEN = re.compile(r'[ \t\n\r]*(?:("(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
                         r'|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)'
                         r'|([\[\]{}:,]))')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def is_json_text(text: str) -> bool:
    """RFC 8259's grammar alone, without recursion: for a line nested too
    deeply for the parser, which is still JSON or not (3.2)."""
    stack, expect, pos = [], "value", 0      # expect: value, key, colon, next or end
    while (m := _JSON_TOKEN.match(text, pos)) is not None:
        pos = m.end()
        string, scalar, mark = m.groups()
        if expect in ("value", "value or ]") and (string or scalar):
            expect = "next" if stack else "end"
        elif expect in ("value", "value or ]") and mark is not None and mark in "[{":
            stack.append(mark)
            expect = "value or ]" if mark == "[" else "key or }"
        elif expect in ("key", "key or }") and string:
            expect = "colon"
        elif expect == "colon" and mark == ":":
            expect = "value"
        elif expect == "next" and mark == ",":
            expect = "value" if stack[-1] == "[" else "key"
        elif (expect in ("next", "value or ]", "key or }") and mark is not None and mark in "]}"
              and stack and "[{"["]}".index(mark)] == stack[-1]
              and (expect == "next" or expect[-1] == mark)):
            stack.pop()
            expect = "next" if stack else "end"
        else:
            return False
    return expect == "end" and not text[pos:].strip(" \t\n\r")


def parse_json(data: bytes | str) -> Any:
    """Parse strict Secral JSON (3.2): UTF-8 and RFC 8259 first (not_json),
    then Secral's rules (malformed): integers only, within +-(2**53-1); no
    duplicate or non-ASCII member names; no unpaired surrogate escapes; at
    most MAX_DEPTH levels of nesting."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteError("not_json", "invalid UTF-8")
    broken: list[str] = []                    # Secral's rules a parsed value broke

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_INT:
            broken.append(f"integer {text[:20]} is outside +-(2**53-1)")
            return 0
        return int(text)

    def fraction(text: str) -> int:
        broken.append(f"number {text[:20]} is not an integer")
        return 0

    def members(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):          # parsers disagree on which duplicate wins
            broken.append("duplicate member name")
        if not all(name.isascii() for name in obj):
            broken.append("non-ASCII member name")
        return obj

    try:
        value = json.loads(data, parse_int=integer, parse_float=fraction,
                           parse_constant=_json_constant, object_pairs_hook=members)
    except RecursionError:
        if not is_json_text(data):
            raise RemoteError("not_json", "not JSON")
        raise RemoteError("malformed", f"JSON nested deeper than {MAX_DEPTH} levels")
    except (json.JSONDecodeError, _NotJson) as exc:
        raise RemoteError("not_json", f"not JSON: {getattr(exc, 'msg', exc)}")
    if broken:
        raise RemoteError("malformed", broken[0])
    check_json_value(value, _SURROGATE_ESCAPE.search(data) is not None)
    return value


class _NotJson(ValueError):
    pass


def _json_constant(text: str) -> None:
    raise _NotJson(f"{text} is not JSON")      # Python accepts NaN/Infinity; JSON does not


def check_json_value(value: Any, surrogates: bool) -> None:
    """Secral's rules on a parsed value's shape (3.2): the nesting depth, and
    (only if the text had a surrogate escape) that every string is Unicode."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise RemoteError("malformed", f"JSON nested deeper than {MAX_DEPTH} levels")
            # (member names are ASCII, checked above: no surrogate hides in one)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
        elif surrogates and isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RemoteError("malformed", "a string holds an unpaired surrogate escape")


def decode_frame(line: bytes) -> dict:
    """One received line to a frame (PROTOCOL.md 3.1, 3.2).  `line` is as read:
    with its line feed, which counts toward MAX_LINE.

    Only the envelope is checked here: size, JSON, an object, a string "type".
    The fields of each type are checked by verify_frame.
    """
    if len(line) > MAX_LINE:
        raise RemoteError("too_large", f"line of {len(line)} bytes; the limit is {MAX_LINE}")
    if not line.endswith(b"\n"):
        raise RemoteError("malformed", "a line ends with a line feed")
    frame = parse_json(line)
    if not isinstance(frame, dict):
        raise RemoteError("malformed", "a frame must be a JSON object")
    if not isinstance(frame.get("type"), str):
        raise RemoteError("malformed", 'a frame needs a string "type"')
    return frame


def encode_frame(frame: dict) -> bytes:
    """A frame as one line, ready for the socket."""
    line = canonical_json(frame) + b"\n"
    if len(line) > MAX_LINE:
        raise LocalError("too_large", f"frame of {len(line)} bytes exceeds {MAX_LINE}")
    return line


# -- Field checks -------------------------------------------------------------
# Objects are described by tables of (field, check); `check_fields` applies one.
# A check is a function(value, what) that returns the value or raises.

def check_int(value: Any, what: str) -> int:
    if type(value) is not int:          # bool is an int in Python, not on the wire
        raise RemoteError("malformed", f"{what}: expected an integer")
    return value


def check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteError("malformed", f"{what}: expected a string")
    return value


def check_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise RemoteError("malformed", f"{what}: expected an object")
    return value


def check_list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise RemoteError("malformed", f"{what}: expected an array")
    return value


def check_time(value: Any, what: str) -> int:
    if check_int(value, what) < 0:
        raise RemoteError("malformed", f"{what}: a time cannot be negative")
    return value


def check_hops(limit: int) -> Callable[[Any, str], int]:
    def check(value: Any, what: str) -> int:
        if not 0 <= check_int(value, what) <= limit:
            raise RemoteError("bad_hops", f"{what}: {value} is outside 0..{limit}")
        return value
    return check


def check_hex_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise RemoteError("malformed", f"{what}: expected 32 lowercase hex digits")
    return value


def check_short_text(limit: int) -> Callable[[Any, str], str]:
    def check(value: Any, what: str) -> str:
        if len(check_str(value, what)) > limit:
            raise RemoteError("too_large", f"{what}: longer than {limit} characters")
        return value
    return check


def check_fields(obj: Any, table: dict[str, Callable], what: str) -> dict:
    """Check that `obj` is an object whose fields pass `table`; extra fields are kept."""
    check_dict(obj, what)
    for name, check in table.items():
        if name not in obj:
            raise RemoteError("malformed", f"{what}: missing field {name!r}")
        check(obj[name], f"{what}.{name}")
    return obj


# =============================================================================
# Cryptography
# =============================================================================
# PROTOCOL.md section 4.  The only place pycryptodome is used.  Every random
# value is drawn from an injectable `rng(n) -> bytes` so that spec/vectors can
# be reproduced exactly; real nodes pass os.urandom.

from Crypto.Cipher import AES, PKCS1_OAEP          # noqa: E402
from Crypto.Hash import SHA256                      # noqa: E402
from Crypto.PublicKey import RSA                    # noqa: E402
from Crypto.Signature import pkcs1_15, pss          # noqa: E402
from Crypto.Util.asn1 import (DerBitString, DerInteger, DerNull, DerObject,  # noqa: E402
                              DerObjectId, DerSequence, DerSetOf)

Rng = Callable[[int], bytes]


@functools.lru_cache(maxsize=4096)
def parse_public_key(text: str) -> RSA.RsaKey:
    """Base64 DER SubjectPublicKeyInfo to a key; only RSA-3072 with e=65537.

    The DER must be canonical: re-encoding the key gives the same bytes.
    Parsed keys are cached because every relayed mail carries its sender's key.
    """
    der = b64d(text, "key")
    try:
        key = RSA.import_key(der)
    except (ValueError, IndexError, TypeError):
        raise RemoteError("bad_key", "not an RSA public key")
    if key.has_private():
        raise RemoteError("bad_key", "a private key where a public key belongs")
    if key.size_in_bits() != RSA_BITS or key.e != RSA_EXPONENT:
        raise RemoteError("bad_key", f"RSA-{key.size_in_bits()} e={key.e}; "
                          f"only RSA-{RSA_BITS} e={RSA_EXPONENT} is accepted")
    if key.export_key(format="DER") != der:
        raise RemoteError("bad_key", "not canonical DER SubjectPublicKeyInfo")
    return key


class CryptoMemo:
    """The results of pure RSA operations, by their exact inputs, so that the
    network shell can do them on its work-ahead pool, on every core and off
    the core's lock, and the core, asking the same question a moment later,
    finds the answer (work done ahead: it changes no result, only where the
    time is spent).  Bounded; thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = compute()                       # outside the lock: this is the slow part
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value

    def put(self, key: tuple, value: Any) -> None:
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def take(self, key: tuple) -> Any:
        """An entry put there ahead, used once; None if there is none."""
        with self.lock:
            return self.entries.pop(key, None)


RSA_MEMO = CryptoMemo(4096)     # verifications and unwraps of the last few thousand objects
SIGNED_AHEAD = CryptoMemo(256)  # signatures the shell made ahead for the core to use (issue 17)


def sign(key: RSA.RsaKey, message: bytes, rng: Rng = os.urandom) -> bytes:
    """RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt (RFC 8017 section 8.1).
    A signature of this very message made ahead (SIGNED_AHEAD, by the
    network shell) is used instead: PSS is randomised, and any valid
    signature is as good as another.  Nothing fills SIGNED_AHEAD but the
    shell, so the core, the tests and the vectors sign with their own rng."""
    ahead = SIGNED_AHEAD.take((key.n, hashlib.sha256(message).digest()))
    if ahead is not None:
        return ahead
    return pss.new(key, salt_bytes=PSS_SALT, rand_func=rng).sign(SHA256.new(message))


def sign_ahead(key: RSA.RsaKey, message: bytes) -> None:
    """Sign now, for a sign() of the same message a moment later."""
    digest = hashlib.sha256(message).digest()
    SIGNED_AHEAD.put((key.n, digest), pss.new(key, salt_bytes=PSS_SALT).sign(SHA256.new(message)))


def verify_signature(key: RSA.RsaKey, message: bytes, signature: bytes) -> bool:
    digest = hashlib.sha256(message).digest()
    return RSA_MEMO.get(("verify", key.n, signature, digest), lambda: verify_pss(key, digest, signature))


def verify_pss(key: RSA.RsaKey, digest: bytes, signature: bytes) -> bool:
    """RSASSA-PSS-VERIFY (RFC 8017 8.1.2 and EMSA-PSS-VERIFY, 9.1.2) with
    SHA-256, MGF1-SHA-256 and a 32-byte salt, for a key of RSA_BITS:
    `digest` is SHA-256 of the message.  Written out rather than taken from
    pycryptodome's pss module, which makes some thirty calls into C per
    verification (a hash object for each MGF1 block), each giving up and
    taking back the interpreter lock: a relay verifies every frame, and
    here only the RSA operation leaves Python.  Everything verified is
    public, so nothing needs constant time.  The vectors and an OpenSSL
    cross-check hold it to the standard."""
    em_bits = RSA_BITS - 1                      # emBits = modBits - 1; emLen = 384
    em_len = (em_bits + 7) // 8
    spare = 8 * em_len - em_bits                # leftmost bits of EM that must be zero (1)
    masked_len = em_len - SHA256_BYTES - 1      # maskedDB
    if len(signature) != RSA_BYTES:
        return False
    s = int.from_bytes(signature, "big")
    if s >= key.n:
        return False
    m = key._encrypt(s)                         # RSAVP1: s^e mod n (pycryptodome's raw public operation)
    em = m.to_bytes(em_len, "big")              # (m < n < 2^3072 fits emLen = 384 bytes)
    masked, h = em[:masked_len], em[masked_len:-1]
    if em[-1] != 0xBC or masked[0] >> (8 - spare):
        return False                            # no trailer byte, or a leftmost bit set
    mask = b"".join(hashlib.sha256(h + counter.to_bytes(4, "big")).digest()
                    for counter in range(-(-masked_len // SHA256_BYTES)))       # MGF1(H, maskedDB length)
    db = int.from_bytes(masked, "big") ^ int.from_bytes(mask[:masked_len], "big")
    db &= (1 << 8 * masked_len - spare) - 1     # clear those leftmost bits
    db_bytes = db.to_bytes(masked_len, "big")
    zeros = masked_len - PSS_SALT - 1           # DB = PS (zeros) || 0x01 || salt
    if db_bytes[:zeros] != bytes(zeros) or db_bytes[zeros] != 0x01:
        return False
    salt = db_bytes[zeros + 1:]
    return hmac.compare_digest(hashlib.sha256(bytes(8) + digest + salt).digest(), h)


def wrap_key(key: RSA.RsaKey, secret: bytes, rng: Rng = os.urandom) -> bytes:
    """RSAES-OAEP, SHA-256, MGF1-SHA-256, empty label (RFC 8017 section 7.1)."""
    return PKCS1_OAEP.new(key, hashAlgo=SHA256, randfunc=rng).encrypt(secret)


def unwrap_key(key: RSA.RsaKey, wrapped: bytes) -> bytes:
    def unwrap() -> bytes | None:
        try:
            return PKCS1_OAEP.new(key, hashAlgo=SHA256).decrypt(wrapped)
        except (ValueError, TypeError):
            return None
    secret = RSA_MEMO.get(("unwrap", key.n, wrapped), unwrap)
    if secret is None or len(secret) != AES_KEY:   # the same words: do not say which step failed
        raise RemoteError("decrypt_failed", "the wrapped key does not open with this node's key")
    return secret


def seal_gcm(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; returns ciphertext || 16-byte tag."""
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext + tag


def open_gcm(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < GCM_TAG:
        raise RemoteError("decrypt_failed", "ciphertext shorter than its tag")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG)
    cipher.update(aad)
    try:
        return cipher.decrypt_and_verify(sealed[:-GCM_TAG], sealed[-GCM_TAG:])
    except ValueError:
        raise RemoteError("decrypt_failed", "the ciphertext or its associated data was altered")


# -- The link certificate (PROTOCOL.md 8.1) ---------------------------------
# TLS needs a certificate; Secral needs only the key in it.  Every field but
# the key is fixed, and the signature is PKCS#1 v1.5 (deterministic), so a
# key has exactly one certificate and spec/vectors can show its bytes.

SHA256_WITH_RSA = "1.2.840.113549.1.1.11"   # the certificate's signature algorithm
COMMON_NAME = "2.5.4.3"                     # issuer and subject: CN=<domain>
CERT_NOT_BEFORE = b"700101000000Z"          # UTCTime 1970-01-01 00:00:00
CERT_NOT_AFTER = b"99991231235959Z"         # GeneralizedTime: "no expiry" (RFC 5280 4.1.2.5)


def make_certificate(identity: "Identity") -> bytes:
    """The node's self-signed X.509 v3 certificate, DER (8.1): serial 1,
    issuer = subject = CN=<domain>, the fixed validity above, no extensions,
    sha256WithRSAEncryption.  Peers read only its SubjectPublicKeyInfo."""
    algorithm = DerSequence([DerObjectId(SHA256_WITH_RSA), DerNull()]).encode()
    name = DerSequence([DerSetOf([DerSequence([
        DerObjectId(COMMON_NAME), DerObject(0x0C, identity.domain.encode("ascii"))])])]).encode()
    validity = DerSequence([DerObject(0x17, CERT_NOT_BEFORE), DerObject(0x18, CERT_NOT_AFTER)]).encode()
    tbs = DerSequence([DerInteger(2, explicit=0), DerInteger(1), algorithm, name, validity, name,
                       identity.public_der]).encode()
    signature = pkcs1_15.new(identity.key).sign(SHA256.new(tbs))
    return DerSequence([tbs, algorithm, DerBitString(signature)]).encode()


def certificate_key(der: bytes) -> str:
    """The key in a peer's certificate, as base64 DER SubjectPublicKeyInfo:
    the same text a NIS record's "key" holds, checked by parse_public_key.
    Nothing else in the certificate is read (8.1)."""
    try:
        tbs = DerSequence().decode(DerSequence().decode(der)[0])
        versioned = tbs[0][0] == 0xA0 if isinstance(tbs[0], bytes) else False
        spki = tbs[6 if versioned else 5]
    except (ValueError, IndexError, TypeError):
        raise RemoteError("bad_key", "the TLS certificate is not X.509")
    if not isinstance(spki, bytes):
        raise RemoteError("bad_key", "the TLS certificate has no SubjectPublicKeyInfo")
    text = b64e(spki)
    parse_public_key(text)
    return text


class Identity:
    """A node's RSA-3072 key pair and the names derived from it."""

    def __init__(self, key: RSA.RsaKey):
        if not key.has_private() or key.size_in_bits() != RSA_BITS or key.e != RSA_EXPONENT:
            raise LocalError("bad_key", f"a node key must be a private RSA-{RSA_BITS} key, e={RSA_EXPONENT}")
        self.key = key
        self.public_der = key.public_key().export_key(format="DER")
        self.public_b64 = b64e(self.public_der)
        self.domain = domain_of_der(self.public_der)

    @functools.cached_property
    def certificate(self) -> bytes:
        """The TLS certificate of this key (8.1), made once."""
        return make_certificate(self)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(RSA.generate(RSA_BITS, e=RSA_EXPONENT))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> "Identity":
        try:
            key = RSA.import_key(pem)
        except (ValueError, IndexError, TypeError) as exc:
            raise LocalError("bad_key", f"cannot read the node key: {exc}")
        return cls(key)

    def to_pem(self) -> bytes:
        """PEM PKCS#8 ("BEGIN PRIVATE KEY"), unencrypted."""
        return self.key.export_key(format="PEM", pkcs=8)

    def sign(self, obj: dict, rng: Rng = os.urandom) -> dict:
        """Return a copy of `obj` with "sig" over its canonical JSON (PROTOCOL.md 4.2)."""
        unsigned = {k: v for k, v in obj.items() if k != "sig"}
        return {**unsigned, "sig": b64e(sign(self.key, canonical_json(unsigned), rng))}

    def __repr__(self) -> str:
        return f"<Identity {self.domain}>"


def load_identity(path: str, create: bool = True,
                  announce: Callable[[str], None] | None = None) -> Identity:
    """Read DATA_DIR/node.key, creating it (mode 0600) on first use; `announce`
    is told before a key is generated (it takes a second or two)."""
    try:
        with open(path, "rb") as f:
            return Identity.from_pem(f.read())
    except FileNotFoundError:
        if not create:
            raise LocalError("not_found", f"no node key at {path}")
    except IsADirectoryError:
        raise LocalError("refused", f"{path} is a directory, not a node key")
    if announce is not None:
        announce(f"generating the node key (RSA-{RSA_BITS}) in {path} ...")
    identity = Identity.generate()
    save_identity(identity, path)
    return identity


def save_identity(identity: Identity, path: str) -> None:
    """Write the key with mode 0600 from the first byte, atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)                          # left by a write that failed before
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_pem())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def verify_signed(obj: dict, key: RSA.RsaKey, what: str) -> None:
    """Check obj["sig"] against the canonical JSON of obj without "sig"."""
    signature = b64d(obj.get("sig"), f"{what}.sig", RSA_BYTES)
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    if not verify_signature(key, canonical_json(unsigned), signature):
        raise RemoteError("bad_signature", f"{what}: the signature does not verify")


# =============================================================================
# Names and NIS records
# =============================================================================
# PROTOCOL.md section 5.  A domain is a hash of a public key, so it certifies
# itself: anyone holding a key can check it against the domain, and a NIS
# record learned from a stranger is as good as one learned from its owner.

DOMAIN_RE = re.compile(r"node-[a-z2-7]{24}")
USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def domain_of_der(der: bytes) -> str:
    digest = hashlib.sha256(der).digest()[:DOMAIN_HASH_BYTES]
    return DOMAIN_PREFIX + base64.b32encode(digest).decode("ascii").lower()


@functools.lru_cache(maxsize=4096)
def domain_of_key(text: str) -> str:
    """The domain of a base64 DER public key (checked by parse_public_key)."""
    parse_public_key(text)
    return domain_of_der(base64.b64decode(text))


def check_domain(value: Any, what: str = "domain") -> str:
    """A domain (5.1).  Like every field, a wrong JSON type is malformed (3.4)."""
    if not DOMAIN_RE.fullmatch(check_str(value, what)):
        raise RemoteError("bad_domain", f"{what}: {str(value)[:40]!r} is not node- and 24 base32 letters")
    return value


def check_user(value: Any, what: str = "user") -> str:
    if not USER_RE.fullmatch(check_str(value, what)):
        raise RemoteError("bad_address", f"{what}: {str(value)[:70]!r} is not 1-64 of A-Z a-z 0-9 . _ - "
                          "starting with a letter or digit")
    return value


@dataclasses.dataclass(frozen=True)
class Address:
    """user@domain.  Users compare case-insensitively; `key` is the folded form."""

    user: str
    domain: str

    def __str__(self) -> str:
        return f"{self.user}@{self.domain}"

    @property
    def key(self) -> str:
        return f"{self.user.lower()}@{self.domain}"

    @property
    def is_core(self) -> bool:
        return self.user.lower() == CORE_USER.lower()


def parse_address(value: Any, what: str = "address") -> Address:
    """Parse `user@node-...` (PROTOCOL.md 5.2).  Domains are lowercase on the wire."""
    if check_str(value, what).count("@") != 1:
        raise RemoteError("bad_address", f"{what}: {str(value)[:100]!r} is not user@node-...")
    user, domain = value.split("@")
    check_user(user, what)
    if not DOMAIN_RE.fullmatch(domain):
        raise RemoteError("bad_address", f"{what}: {domain[:40]!r} is not a node- domain")
    return Address(user, domain)


HOSTNAME_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def check_host(value: Any, what: str) -> str | None:
    """A record's host (5.3): null; an IPv4 address in dotted decimal without
    leading zeros; an IPv6 address without a zone id; or a DNS name of RFC 1123
    labels whose last label is neither all digits nor 0x and hex digits (any
    case), which resolvers would read as a number.  An unspecified, multicast
    or broadcast address is refused, in IPv4-mapped IPv6 form too.  A bad
    host is malformed."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and len(value) <= MAX_HOST and "%" not in value:
        if ":" in value or value.replace(".", "").isdigit():
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(value)
                plain = getattr(ip, "ipv4_mapped", None) or ip
                if not (plain.is_unspecified or plain.is_multicast or str(plain) == "255.255.255.255"):
                    return value
        elif HOSTNAME_RE.fullmatch(value) and not re.fullmatch(r"[0-9]+|0x[0-9a-f]*",
                                                                 value.rsplit(".", 1)[-1].lower()):
            return value
    raise RemoteError("malformed", f"{what}: not a host name or IP address")


RECORD_FIELDS = {
    "kind": check_str, "domain": check_domain, "host": check_host, "port": check_int,
    "key": check_str, "mail_keys": check_list, "seq": check_int, "expires": check_time, "sig": check_str,
}
MAIL_KEY_FIELDS = {"epoch": check_time, "key": check_str}


def make_record(identity: Identity, host: str | None, port: int, seq: int, expires: int,
                mail_keys: Sequence[dict], rng: Rng = os.urandom) -> dict:
    """A node's NIS record, signed by itself (PROTOCOL.md 5.3).  `mail_keys`
    are the public mail keys of every epoch the record's lifetime touches."""
    return identity.sign({
        "kind": "nis", "domain": identity.domain, "host": host,
        "port": port if host is not None else 0, "key": identity.public_b64,
        "mail_keys": [{"epoch": k["epoch"], "key": k["key"]} for k in mail_keys],
        "seq": seq, "expires": expires,
    }, rng)


def epoch_of(t: float) -> int:
    """The mail-key epoch a time falls in (5.3)."""
    return int(t) // MAIL_KEY_EPOCH


def mail_key_id(key: str) -> str:
    """A mail key's id, as the envelope names it (5.3): the first 16 bytes of
    SHA-256 of the key's DER, in lowercase hex."""
    return hashlib.sha256(base64.b64decode(key)).digest()[:MAIL_KEY_ID].hex()


def mail_key_deletion(epoch: int) -> int:
    """When the private half of an epoch's mail key is deleted (6.3): no mail
    that can still be valid anywhere was sealed to it after that."""
    return (epoch + 1) * MAIL_KEY_EPOCH + MAIL_KEY_RETENTION


def verify_mail_keys(record: dict, now: int, what: str) -> list[dict]:
    """A record's mail keys (5.3): 1..6 entries of consecutive epochs, each
    key a valid key listed once and not the node key, covering every epoch
    from now (give or take the clock tolerance) to the record's expiry."""
    keys = record["mail_keys"]
    if not 1 <= len(keys) <= MAX_MAIL_KEYS:
        raise RemoteError("malformed", f"{what}.mail_keys: 1..{MAX_MAIL_KEYS} keys")
    listed = {record["key"]}
    for n, entry in enumerate(keys):
        check_fields(entry, MAIL_KEY_FIELDS, f"{what}.mail_keys[{n}]")
        if n and entry["epoch"] != keys[n - 1]["epoch"] + 1:
            raise RemoteError("malformed", f"{what}.mail_keys: epochs must follow each other")
        parse_public_key(entry["key"])
        if entry["key"] in listed:
            raise RemoteError("malformed", f"{what}.mail_keys[{n}]: a key listed twice, or the node key")
        listed.add(entry["key"])
    first, last = keys[0]["epoch"], keys[-1]["epoch"]
    if first > epoch_of(min(now + CLOCK_TOLERANCE, record["expires"] - 1)) or last < epoch_of(record["expires"] - 1):
        raise RemoteError("malformed", f"{what}.mail_keys: epochs {first}..{last} do not cover "
                          "the record's lifetime")
    return keys


def mail_key_for(record: dict, now: int) -> dict:
    """The mail key that a mail sealed now is wrapped to (6.1): the one of
    now's epoch, or if the record starts later (our clock is behind), its
    first.  A verified record that is valid now always has one."""
    for entry in record["mail_keys"]:
        if entry["epoch"] >= epoch_of(now):
            return entry
    raise LocalError("expired", f"the record of {record['domain']} lists no mail key for now")


def verify_record(record: Any, now: int, what: str = "record") -> dict:
    """Check a NIS record: shape, key, domain derivation, lifetime, signature."""
    check_fields(record, RECORD_FIELDS, what)
    if record["kind"] != "nis":
        raise RemoteError("malformed", f'{what}.kind: expected "nis"')
    if not (1 <= record["port"] <= 65535 if record["host"] is not None else record["port"] == 0):
        raise RemoteError("malformed", f"{what}.port: 1-65535 with a host, 0 without")
    if not 0 <= record["seq"] <= MAX_INT:
        raise RemoteError("malformed", f"{what}.seq: must be 0 or more")
    key = parse_public_key(record["key"])
    if domain_of_key(record["key"]) != record["domain"]:
        raise RemoteError("bad_domain", f"{what}: the domain does not derive from the key")
    if record["expires"] <= now:
        raise RemoteError("expired", f"{what}: expired at {record['expires']}")
    if record["expires"] > now + MAX_RECORD_LIFETIME:
        raise RemoteError("future", f"{what}: expires more than {MAX_RECORD_LIFETIME} s ahead")
    verify_mail_keys(record, now, what)
    verify_signed(record, key, what)
    return record


def record_supersedes(new: dict, old: dict | None) -> bool:
    """Whether `new` replaces `old` for the same domain: strictly higher seq."""
    return old is None or new["seq"] > old["seq"]


def verify_nis_answer(frame: dict, domain: str, now: int) -> dict:
    """The record in a nis_answer to a query for `domain` (5.4): it must verify
    and be that domain's.  Anything else is a forgery, whoever made it."""
    record = verify_record(frame["record"], now, "nis_answer.record")
    if record["domain"] != domain:
        raise RemoteError("bad_domain", f"asked for {domain}, answered with {record['domain']}")
    return record


# =============================================================================
# Protocol objects: mail, acks, handshake
# =============================================================================
# PROTOCOL.md sections 6 and 7.  Constructors are make_<kind>/seal_mail; checks
# are verify_<kind>.  A verify_ function returns the object it was given or
# raises RemoteError; it never needs a private key.

MAIL_FIELDS = {
    "kind": check_str, "id": check_hex_id, "from": check_domain, "to": check_domain, "from_key": check_str,
    "created": check_time, "expires": check_time, "key_id": check_hex_id, "key": check_str,
    "nonce": check_str, "ct": check_str, "sig": check_str,
}
ENVELOPE_FIELDS = ("created", "expires", "from", "id", "key_id", "to")    # the AAD of the ciphertext
PLAIN_FIELDS = {"from": check_str, "to": check_str, "subject": check_str, "body": check_str,
                "pad": check_str}
ACK_FIELDS = {
    "kind": check_str, "id": check_hex_id, "from": check_str, "to": check_str, "from_key": check_str,
    "created": check_time, "status": check_str, "reason": check_short_text(MAX_REASON), "sig": check_str,
}
ACK_STATUSES = ("delivered", "rejected")

# Reasons a recipient gives in a rejected ack (PROTOCOL.md 7.4).
REJECT_REASONS = ("no_such_user", "unknown_key", "retired_key", "decrypt_failed", "mismatch", "malformed",
                  "too_large", "bad_address")

# Characters a one-line text (a subject, an ack's reason, a display name) may
# not hold (6.1): the control characters of Unicode category Cc (C0, DEL, C1)
# and the line and paragraph separators.  Each of them ends or breaks a line
# somewhere -- an e-mail header, a terminal, a log -- so a sender could use it
# to forge a header or break a mail client's view of a mailbox.
LINE_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_subject(subject: Any, what: str = "subject") -> str:
    check_str(subject, what)
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        raise RemoteError("malformed", f"{what}: not valid Unicode text")
    if len(subject) > MAX_SUBJECT:
        raise RemoteError("too_large", f"{what}: {len(subject)} characters; the limit is {MAX_SUBJECT}")
    if LINE_BREAKERS.search(subject):
        raise RemoteError("malformed", f"{what}: control characters and line separators are not allowed")
    return subject


def check_body(body: Any, what: str = "body") -> str:
    check_str(body, what)
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise RemoteError("malformed", f"{what}: not valid Unicode text")
    if size > MAX_BODY:
        raise RemoteError("too_large", f"{what}: {size} bytes of UTF-8; the limit is {MAX_BODY}")
    return body


MEDIA_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")


def check_media_type(value: Any, what: str) -> str:
    """type/subtype, lowercase, no parameters (6.1; RFC 6838's characters)."""
    if not isinstance(value, str) or len(value) > MAX_MEDIA_TYPE or not MEDIA_TYPE_RE.fullmatch(value):
        raise RemoteError("malformed", f"{what}: {str(value)[:40]!r} is not a lowercase type/subtype")
    return value


def check_file_name(value: Any, what: str) -> str:
    """A name to save a part under: one line, no directories (6.1)."""
    check_subject(value, what)
    if len(value) > MAX_FILE_NAME or value in ("", ".", "..") or "/" in value or "\\" in value:
        raise RemoteError("malformed", f"{what}: not a file name (1..{MAX_FILE_NAME} characters, no / or \\)")
    return value


PART_FIELDS = {"type": check_media_type, "data": check_str}


def check_parts(parts: Any, what: str = "parts") -> list[dict]:
    """A mail's parts beside its text body (6.1): each a media type, the bytes
    in base64 and, if it is to be saved, a file name."""
    check_list(parts, what)
    if len(parts) > MAX_PARTS:
        raise RemoteError("too_large", f"{what}: {len(parts)} parts; the limit is {MAX_PARTS}")
    for n, part in enumerate(parts):
        check_fields(part, PART_FIELDS, f"{what}[{n}]")
        b64d(part["data"], f"{what}[{n}].data")
        if "name" in part:
            check_file_name(part["name"], f"{what}[{n}].name")
    return [{name: part[name] for name in ("type", "name", "data") if name in part} for part in parts]


def make_plaintext(sender: Address, recipient: Address, subject: str, body: str,
                   parts: Sequence[dict] = (), in_reply_to: str | None = None) -> bytes:
    """What is sealed (6.1): canonical JSON of the addresses, subject, body,
    parts and in_reply_to (the last two only when there are any), padded with
    "0"s to the smallest of PAD_BUCKETS that holds it."""
    check_subject(subject)
    check_body(body)
    plain = {"from": str(sender), "to": str(recipient), "subject": subject, "body": body, "pad": ""}
    if parts:
        plain["parts"] = check_parts(list(parts))
    if in_reply_to is not None:
        plain["in_reply_to"] = check_hex_id(in_reply_to, "in_reply_to")
    size = len(canonical_json(plain))
    if size > MAX_PLAINTEXT:
        raise RemoteError("too_large", f"the mail is {size} bytes once encoded (attachments grow by a "
                          f"third in base64, quotes and control characters take more room); "
                          f"the limit is {MAX_PLAINTEXT}")
    plain["pad"] = "0" * (min(b for b in PAD_BUCKETS if b >= size) - size)
    return canonical_json(plain)


def envelope_of(mail: dict) -> bytes:
    """The associated data of a mail's ciphertext (PROTOCOL.md 4.4)."""
    return canonical_json({name: mail[name] for name in ENVELOPE_FIELDS})


def seal_mail(identity: Identity, sender: Address, recipient: Address, record: dict,
              subject: str, body: str, now: int, ttl: int = MAX_TTL,
              rng: Rng = os.urandom, parts: Sequence[dict] = (),
              in_reply_to: str | None = None) -> dict:
    """Encrypt and sign a mail (PROTOCOL.md 6.1) to the mail key of now's
    epoch in the recipient's `record`, which the caller has verified.  The
    envelope names the two nodes and that key; the users are inside the
    sealed plaintext.

    Randomness is drawn in this order: mail id (16 bytes), AES key (32),
    GCM nonce (12), OAEP seed (32), PSS salt (32).
    """
    if sender.domain != identity.domain:
        raise LocalError("bad_address", f"{sender} is not an address of this node")
    if not 0 < ttl <= MAX_TTL:
        raise LocalError("bad_ttl", f"time to live must be 1..{MAX_TTL} seconds")
    plaintext = make_plaintext(sender, recipient, subject, body, parts, in_reply_to)
    if record["domain"] != recipient.domain or domain_of_key(record["key"]) != recipient.domain:
        raise LocalError("bad_domain", f"the record given for {recipient} is not {recipient.domain}'s")
    mail_key = mail_key_for(record, now)
    key = parse_public_key(mail_key["key"])
    mail_id = rng(MAIL_ID).hex()
    aes_key, nonce = rng(AES_KEY), rng(GCM_NONCE)
    mail = {"kind": "mail", "id": mail_id, "from": sender.domain, "to": recipient.domain,
            "from_key": identity.public_b64, "created": now, "expires": now + ttl,
            "key_id": mail_key_id(mail_key["key"])}
    mail["ct"] = b64e(seal_gcm(aes_key, nonce, plaintext, envelope_of(mail)))
    mail["nonce"] = b64e(nonce)
    mail["key"] = b64e(wrap_key(key, aes_key, rng))
    return identity.sign(mail, rng)


def verify_mail(mail: Any, now: int, what: str = "mail") -> dict:
    """Everything a relay can check without the recipient's key (PROTOCOL.md 6.2)."""
    check_fields(mail, MAIL_FIELDS, what)
    if mail["kind"] != "mail":
        raise RemoteError("malformed", f'{what}.kind: expected "mail"')
    sender = mail["from"]
    key = parse_public_key(mail["from_key"])
    if domain_of_key(mail["from_key"]) != sender:
        raise RemoteError("bad_domain", f"{what}: from_key is not the key of {sender}")
    check_lifetime(mail["created"], mail["expires"], now, what)
    b64d(mail["key"], f"{what}.key", RSA_BYTES)
    b64d(mail["nonce"], f"{what}.nonce", GCM_NONCE)
    sealed_size = len(b64d(mail["ct"], f"{what}.ct"))
    if sealed_size < GCM_TAG:
        raise RemoteError("malformed", f"{what}.ct: shorter than the GCM tag")
    if sealed_size > MAX_PLAINTEXT + GCM_TAG:
        raise RemoteError("too_large", f"{what}.ct: more than {MAX_PLAINTEXT} bytes of plaintext")
    if sealed_size - GCM_TAG not in PAD_BUCKETS:
        raise RemoteError("malformed", f"{what}.ct: {sealed_size - GCM_TAG} bytes of plaintext is not "
                          "a padded size (6.1)")
    verify_signed(mail, key, what)
    return mail


def check_lifetime(created: int, expires: int, now: int, what: str) -> int:
    """The expiry, if a lifetime is well formed and current (6.2, 7.7)."""
    if created > now + CLOCK_TOLERANCE:
        raise RemoteError("future", f"{what}: created {created - now} s in the future")
    if not created < expires <= created + MAX_TTL:
        raise RemoteError("bad_ttl", f"{what}: expires must be 1..{MAX_TTL} s after created")
    if expires <= now:
        raise RemoteError("expired", f"{what}: expired {now - expires} s ago")
    return expires


def open_mail(identity: Identity, mail_keys: "MailKeys", mail: dict) -> dict:
    """Decrypt a verified mail addressed to this node (PROTOCOL.md 6.3) with
    the mail key its key_id names, and no other.

    Returns {"from", "to", "subject", "body", "parts", "in_reply_to"} (parts
    [] and in_reply_to None when the mail has none).  The caller has already
    run verify_mail; this adds the checks only the recipient can make.
    """
    if mail["to"] != identity.domain:
        raise RemoteError("wrong_recipient", f"mail to {mail['to']} is not for {identity.domain}")
    private = mail_keys.private_key(mail["key_id"])
    aes_key = unwrap_key(private, b64d(mail["key"], "mail.key", RSA_BYTES))
    plaintext = open_gcm(aes_key, b64d(mail["nonce"], "mail.nonce", GCM_NONCE),
                         b64d(mail["ct"], "mail.ct"), envelope_of(mail))
    try:
        plain = check_fields(parse_json(plaintext), PLAIN_FIELDS, "plaintext")
        sender = parse_address(plain["from"], "plaintext.from")
        recipient = parse_address(plain["to"], "plaintext.to")
    except RemoteError as exc:
        raise RemoteError("malformed", f"the sealed content is not a Secral plaintext: {exc.message}")
    if sender.domain != mail["from"] or recipient.domain != mail["to"]:
        raise RemoteError("mismatch", "the sealed addresses are not at the envelope's domains")
    if sender.is_core:
        raise RemoteError("bad_address", f"{CORE_USER} sends acks, never mail")
    if plain["pad"].strip("0"):
        raise RemoteError("malformed", 'plaintext.pad: only "0" characters')
    check_subject(plain["subject"], "plaintext.subject")
    check_body(plain["body"], "plaintext.body")
    parts = check_parts(plain["parts"], "plaintext.parts") if "parts" in plain else []
    in_reply_to = plain.get("in_reply_to")
    if in_reply_to is not None:
        check_hex_id(in_reply_to, "plaintext.in_reply_to")
    return {"from": plain["from"], "to": plain["to"], "subject": plain["subject"],
            "body": plain["body"], "parts": parts, "in_reply_to": in_reply_to}


def recipient_verdict(identity: Identity, mail_keys: "MailKeys", mail: dict,
                      users: Any) -> tuple[str, str, dict | None]:
    """What the recipient answers a new verified mail (7.4 step 3): status,
    reason and, when it opens, the plaintext.  `users` holds the local user
    names, lowercase."""
    try:
        plain = open_mail(identity, mail_keys, mail)
    except RemoteError as exc:
        return "rejected", exc.code, None
    user = parse_address(plain["to"])
    if user.is_core or user.user.lower() not in users:
        return "rejected", "no_such_user", plain
    return "delivered", "", plain


def ack_statement(identity: Identity, mail: dict, status: str, reason: str, now: int) -> dict:
    """An ack before its signature (7.3)."""
    assert status in ACK_STATUSES
    return {"kind": "ack", "id": mail["id"], "from": f"{CORE_USER}@{identity.domain}",
            "to": f"{CORE_USER}@{mail['from']}", "from_key": identity.public_b64, "created": now,
            "status": status, "reason": reason}


def make_ack(identity: Identity, mail: dict, status: str, reason: str, now: int,
             rng: Rng = os.urandom) -> dict:
    """Core's signed receipt for `mail` (PROTOCOL.md 7.3)."""
    return identity.sign(ack_statement(identity, mail, status, reason, now), rng)


def verify_ack(ack: Any, now: int, what: str = "ack") -> dict:
    """Check an ack without any private key (PROTOCOL.md 7.3)."""
    check_fields(ack, ACK_FIELDS, what)
    if ack["kind"] != "ack":
        raise RemoteError("malformed", f'{what}.kind: expected "ack"')
    signer = parse_address(ack["from"], f"{what}.from")
    target = parse_address(ack["to"], f"{what}.to")
    if not signer.is_core or not target.is_core:
        raise RemoteError("bad_address", f"{what}: acks go from Core to Core")
    if ack["status"] not in ACK_STATUSES:
        raise RemoteError("malformed", f"{what}.status: expected delivered or rejected")
    if LINE_BREAKERS.search(ack["reason"]):
        raise RemoteError("malformed", f"{what}.reason: control characters and line separators are not allowed")
    if ack["status"] == "delivered" and ack["reason"]:
        raise RemoteError("malformed", f'{what}.reason: a delivered ack has the reason ""')
    key = parse_public_key(ack["from_key"])
    if domain_of_key(ack["from_key"]) != signer.domain:
        raise RemoteError("bad_domain", f"{what}: from_key is not the key of {signer.domain}")
    if ack["created"] > now + CLOCK_TOLERANCE:
        raise RemoteError("future", f"{what}: created {ack['created'] - now} s in the future")
    if ack["created"] + ack_lifetime() <= now:
        raise RemoteError("expired", f"{what}: older than any mail it could answer")
    verify_signed(ack, key, what)
    return ack


def ack_lifetime() -> int:
    """How long an ack is worth carrying: as long as the longest-lived mail."""
    return MAX_TTL + CLOCK_TOLERANCE


def make_hello(record: dict, nonce: bytes) -> dict:
    return {"type": "hello", "v": PROTOCOL_VERSION, "record": record,
            "nonce": b64e(nonce), "agent": AGENT}


def auth_statement(nonce: str, signer: str, peer: str) -> dict:
    """What the dialler's auth signs (PROTOCOL.md 8.1): the listener's hello
    nonce, the dialler's domain and the listener's domain as TLS proved it.
    The last names the one node this auth is good for, so a node that is
    dialled cannot replay its dialler's auth to a third node (11.2)."""
    return {"kind": "auth", "nonce": nonce, "domain": signer, "peer": peer}


def make_auth(identity: Identity, peer_nonce: str, peer_domain: str, rng: Rng = os.urandom) -> dict:
    """The dialler's auth frame.  Randomness: the PSS salt (32 bytes)."""
    signed = identity.sign(auth_statement(peer_nonce, identity.domain, peer_domain), rng)
    return {"type": "auth", "sig": signed["sig"]}


def verify_auth(frame: dict, record: dict, own_nonce: str, own_domain: str) -> dict:
    """Check the dialler signed our challenge, naming us, with the key of the
    record it presented.  Returns the frame."""
    statement = {**auth_statement(own_nonce, record["domain"], own_domain), "sig": frame["sig"]}
    verify_signed(statement, parse_public_key(record["key"]), "auth")
    return frame


# -- Frames -------------------------------------------------------------------
# PROTOCOL.md section 8.  The frame types, their fields and the states that
# accept them are one table, FRAME_TYPES, in the routing core, beside the
# handlers it names; verify_frame checks a frame against it.

def make_error(code: str, message: str, ref: str | None = None) -> dict:
    """An error frame.  Without `ref` it precedes a disconnect; with `ref` (a mail
    or ack id) it refuses one object and the connection stays open."""
    frame = {"type": "error", "code": code, "message": message[:MAX_ERROR_MESSAGE]}
    if ref is not None:
        frame["ref"] = ref
    return frame


def mail_key(sender_domain: str, mail_id: str) -> str:
    """How a mail is recognised everywhere: its sending node and its id (7.1)."""
    return f"mail/{sender_domain}/{mail_id}"


def ack_key(sender_domain: str, mail_id: str, recipient_domain: str) -> str:
    """An ack is one recipient's answer to one mail (7.1)."""
    return f"ack/{sender_domain}/{mail_id}/{recipient_domain}"


def object_domains(obj: dict) -> tuple[str, str]:
    """(origin, target) of a verified mail or ack: a mail's envelope names
    the two domains (6.1), an ack the two nodes' Core (7.3)."""
    if obj["kind"] == "mail":
        return obj["from"], obj["to"]
    return parse_address(obj["from"]).domain, parse_address(obj["to"]).domain


# =============================================================================
# Reputation
# =============================================================================
# PROTOCOL.md section 9.  Every peer has a score in [-100, 100], kept per IP
# address until the handshake names the peer, per domain after.  What the
# peer sends moves the score by the table below; time moves it back toward 0
# by one point a minute.  At -100 the peer is told "banned", disconnected, and
# its domain and address are refused for a time that doubles with each ban.

REPUTATION_EVENTS: dict[str, tuple[int, bool]] = {
    # event              change  disconnect   (why)
    "not_json":          (-20,   False),      # random bytes, a broken encoder
    "oversize_line":     (-50,   True),       # the stream cannot be resynchronised
    "malformed":         (-10,   False),      # a field missing or of the wrong type
    "unknown_type":      (-2,    False),      # maybe a newer peer; cheap to ignore
    "too_large":         (-10,   False),      # a field over its limit
    "bad_key":           (-25,   False),
    "bad_domain":        (-25,   False),      # a key that is not the sender's
    "bad_address":       (-10,   False),
    "bad_signature":     (-25,   False),      # forged or tampered
    "forged_record":     (-50,   False),      # a NIS record that does not verify
    "expired":           (0,     False),      # clocks differ: dropped, not blamed
    "future":            (0,     False),      # (honest clocks may differ by 20 minutes)
    "bad_ttl":           (-10,   False),
    "bad_hops":          (-10,   False),
    "not_ready":         (-50,   True),       # a frame before the handshake
    "bad_tls":           (-20,   True),       # not TLS 1.3: scored to the address, since
                                              # no domain was proven (8.1)
    "rate_exceeded":     (-2,    False),      # the frame is dropped, too
    "duplicate":         (-5,    False),      # the same object twice on one connection
    "timeout":           (0,     True),       # slow links exist: closed, not blamed
    "bad_record":        (-10,   False),      # its record named an address that did
                                              # not answer as this node (9.1)
    # rewards: what honest peers do
    "mail_relayed":      (+1,    False),      # a mail it brought us, once its ack proves it real
    "ack_relayed":       (+1,    False),      # a valid ack we had not seen
    "nis_answer":        (+2,    False),      # a valid record we asked for
}
SCORE_MIN, SCORE_MAX = -100, 100
DECAY_SECONDS = 60              # one point back toward 0 per minute
BAN_SECONDS = 3600              # the first ban lasts an hour ...
BAN_MAX_SECONDS = 7 * 86_400    # ... each further one twice as long, up to a week
REPUTATION_FLUSH = 30           # seconds between saves of changed scores
MAX_REPUTATION_SUBJECTS = 20_000    # subjects kept; fresh addresses are free to an
                                # attacker (IPv6 above all), memory is not (9.3)


class Reputation:
    """Scores and bans by subject (9.1): "domain:node-...", "ip:192.0.2.7",
    or an IPv6 site, "ip:2001:db8:1:2::/64"; at most MAX_REPUTATION_SUBJECTS.

    Kept in memory and saved to `store` every REPUTATION_FLUSH seconds (and at
    once on a ban): a score lost in a crash is worth less than a disk write per
    relayed mail.
    """

    def __init__(self, store: MutableMapping):
        self.store = store
        self.entries: dict[str, dict] = {key: dict(value) for key, value in store.items()}
        self.dirty: set[str] = set()

    def _entry(self, subject: str, now: int) -> dict:
        entry = self.entries.setdefault(subject, {"score": 0, "at": now, "bans": 0, "until": 0})
        steps = (now - entry["at"]) // DECAY_SECONDS
        if steps > 0:
            score = entry["score"]
            entry["score"] = max(0, score - steps) if score > 0 else min(0, score + steps)
            entry["at"] += steps * DECAY_SECONDS
        return entry

    def score(self, subject: str, now: int) -> int:
        return self._entry(subject, now)["score"] if subject in self.entries else 0

    def change(self, subject: str, delta: int, now: int) -> int:
        if subject not in self.entries:
            self.make_room(now)
        entry = self._entry(subject, now)
        entry["score"] = max(SCORE_MIN, min(SCORE_MAX, entry["score"] + delta))
        self.dirty.add(subject)
        return entry["score"]

    def ban(self, subject: str, now: int) -> int:
        """Ban `subject`; returns when the ban ends."""
        if subject not in self.entries:
            self.make_room(now)
        entry = self._entry(subject, now)
        length = min(BAN_SECONDS * 2 ** min(entry["bans"], 16), BAN_MAX_SECONDS)
        entry.update(score=SCORE_MIN, at=now, bans=entry["bans"] + 1, until=now + length)
        self.store[subject] = entry             # a ban is saved at once, on its own
        self.dirty.discard(subject)
        return entry["until"]

    def make_room(self, now: int) -> None:
        """Keep at most MAX_REPUTATION_SUBJECTS (9.3).  When full, a tenth is
        forgotten at once, in this order: subjects not banned before banned
        ones; among those, the score nearest 0 first; among bans, the one
        ending soonest (a banned score decays like any other: it says nothing
        of how long the ban runs)."""
        if len(self.entries) < MAX_REPUTATION_SUBJECTS:
            return
        def worth(item: tuple[str, dict]) -> tuple:
            subject, entry = item
            entry = self._entry(subject, now)
            if entry["until"] > now:
                return (1, entry["until"], subject)
            return (0, abs(entry["score"]), subject)
        forget = sorted(self.entries.items(), key=worth)[:max(1, MAX_REPUTATION_SUBJECTS // 10)]
        with Stores.batch_of(self.store):
            for subject, _ in forget:
                del self.entries[subject]
                self.dirty.discard(subject)
                self.store.pop(subject, None)

    def banned(self, subject: str, now: int) -> bool:
        entry = self.entries.get(subject)
        return entry is not None and entry["until"] > now

    def bans(self, now: int) -> list[tuple[str, dict]]:
        return sorted((s, e) for s, e in self.entries.items() if e["until"] > now)

    def flush(self, now: int) -> None:
        """Save what changed, in one transaction; forget subjects that decayed
        back to nothing."""
        with Stores.batch_of(self.store):
            for subject in list(self.entries):
                entry = self._entry(subject, now)
                if entry["score"] == 0 and entry["bans"] == 0:
                    del self.entries[subject]
                    if subject in self.dirty or subject in self.store:
                        self.store.pop(subject, None)
                elif subject in self.dirty:
                    self.store[subject] = entry
        self.dirty.clear()


# =============================================================================
# Routing core
# =============================================================================
# The whole behaviour of a node, without sockets, threads, clocks or logs
# (the h11 idea).  The network shell feeds a Node what happened -- a
# connection made, a line received, a connection lost, a dial that failed,
# time passing, a user's request -- and carries out the actions it returns:
# Send a frame, Close a connection, Dial a host, and Events for logs and
# waiting users.  Stores are MutableMappings: dicts in tests, durable shelves
# in a node.
#
# Node is a thin facade over five engines, one per part of the specification:
#   Links     connections: handshake inside TLS, rate limit, timeouts (8, 9.3)
#   Delivery  mail and acks: routing, the relay store, the seen set, retries (7)
#   Outbox    own mail: submission, sealing, status, withdrawal (7.5)
#   Names     the NIS map, our own record, lookups (5.3, 5.4)
#   PeerSet   dialling, reconnect backoff, known peers, peer exchange (5.5)
# They share the facade's list of actions, its stores and its reputation
# table; the calls between them are listed in Node's docstring.

# -- The outbox (PROTOCOL.md 7.5) --
OUTBOX_TRANSITIONS: dict[str, tuple[str, ...]] = {
    # status      may become (anything else is a bug, refused by Outbox.set_status)
    "queued":    ("sent", "delivered", "rejected", "expired", "cancelled"),
    "sent":      ("delivered", "rejected", "expired", "cancelled"),
    "expired":   ("delivered", "rejected"),     # a late ack is still the truth
    "cancelled": ("delivered", "rejected"),
    "delivered": (),
    "rejected":  (),
}
OUTBOX_WAITING = ("queued", "sent")             # still routed and retried
OUTBOX_FINAL = ("delivered", "rejected", "expired", "cancelled")   # where a waiting user stops
OUTBOX_BOUNCED = ("rejected", "expired")        # reported in the sender's inbox too (a bounce)
OUTBOX_LOCAL = ("message_id", "from_name", "to_name")   # kept by the sender, never sealed

# -- Connection states (PROTOCOL.md 8.1, 8.2) --
CONNECTION_TRANSITIONS: dict[str, tuple[str, ...]] = {
    # state      may become (anything else is a bug, refused by Links.enter)
    "hello":    ("auth", "closed"),             # waiting for the peer's hello
    "auth":     ("open", "closed"),             # hello checked: the listener waits for auth,
                                                # the dialler sends its own and opens (8.1)
    "open":     ("closed",),
    "closed":   (),
}

# -- Timing and resource bounds (PROTOCOL.md sections 8 and 9) --
HANDSHAKE_TIMEOUT = 10          # seconds for TLS from TCP connect, and as many again to open
DIAL_TIMEOUT = 5                # seconds to establish a TCP connection
PING_INTERVAL = 60              # a quiet open connection is pinged ...
IDLE_TIMEOUT = 180              # ... and closed when silent this long
RATE_PER_SECOND = 500           # frames a peer may send per second, sustained ...
RATE_BURST = 1000               # ... after a burst of this many
SEND_RATE = 400                 # frames/s we send on one connection (below a peer's limit)
RECENT_PER_CONNECTION = 4096    # object keys remembered per connection (duplicate check)
RETRY_FIRST = 10                # seconds before an undelivered object is offered again,
RETRY_MAX = 300                 # doubling each time up to five minutes
DIAL_RETRY_FIRST = 5            # seconds before a failed peer is dialled again,
DIAL_RETRY_MAX = 600            # doubling up to ten minutes
MAX_QUERIES = 1024              # NIS queries in flight (ours and forwarded) ...
MAX_QUERIES_PER_PEER = 64       # ... of which the unanswered questions forwarded for one
                                # address may hold this many: a flood fills only its share
SEEN_QUERIES = 8192             # NIS query ids remembered to drop duplicates
SWEEP_SECONDS = 60              # how often expired objects are purged
MAINTAIN_SECONDS = 5            # how often outbound connections are topped up
PROTECTED_PER_KIND = 8          # inbound peers kept from eviction for each kind of
                                # value (9.3): bounded, so value is no squatter's shield


# -- Actions: what the core asks the shell to do --------------------------------

@dataclasses.dataclass(frozen=True)
class Send:
    conn: int
    frame: dict


@dataclasses.dataclass(frozen=True)
class Close:
    conn: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Dial:
    host: str
    port: int
    domain: str | None          # the node we expect there, if we know it

    @property
    def target(self) -> str:
        """What a dial is tracked by (5.5): the domain it expects, else host:port."""
        return self.domain or f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Event:
    name: str                   # see Node.__doc__ for the list
    data: dict


Action = Send | Close | Dial | Event


@dataclasses.dataclass
class Config:
    """What a node operator can set (the CLI maps its options onto this)."""

    host: str | None = None             # host in our NIS record; None: reachable only via relays
    port: int = 0                       # port in our NIS record
    bootstrap: tuple[tuple[str, int], ...] = ()   # --peer HOST:PORT
    target_outbound: int = 8
    max_outbound: int = 32              # including direct dials to recipients
    max_inbound: int = 64
    max_inbound_per_ip: int = 16        # per address subject: an IPv4 address, an IPv6 /64
    max_inbound_per_range: int = 32     # one /24 or IPv6 /48 holds at most half (9.3)
    rate: float = RATE_PER_SECOND       # what we accept from a peer ...
    burst: int = RATE_BURST
    send_rate: float = SEND_RATE        # ... and how fast we send to one (below its limit)
    relay_max_items: int = 20_000       # relay store quota, in total ...
    relay_max_bytes: int = 512 << 20
    origin_max_items: int = 2_000       # ... and per origin domain
    origin_max_bytes: int = 64 << 20
    seen_max: int = 100_000             # keys remembered for duplicate suppression
    retry_first: int = RETRY_FIRST
    retry_max: int = RETRY_MAX


# -- Small types ------------------------------------------------------------------

class TokenBucket:
    """`rate` tokens a second, up to `burst` (9.3).  The core takes one per
    line received (a line that finds none is dropped); the shell's writer
    reserves one per line sent and waits out any debt, to pace itself."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.at = float(burst), now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(now, self.at)

    def take(self, now: float) -> bool:
        """One token if there is one."""
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def reserve(self, now: float) -> float:
        """One token, borrowed if need be: returns how long to wait before using it."""
        self._refill(now)
        self.tokens -= 1
        return max(0.0, -self.tokens / self.rate)


def domain_subject(domain: str) -> str:
    """Who is scored once a peer has proven its domain (9.1)."""
    return f"domain:{domain}"


def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, an IPv4-mapped IPv6 one as IPv4; None for anything else
    (tests name addresses freely)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_range(ip: str) -> str:
    """The block one operator usually holds (9.3): an IPv4 /24, the smallest
    routed on the Internet, or an IPv6 /48, a site's usual allocation."""
    address = parse_ip(ip)
    if address is None:
        return ip
    bits = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network((address, bits), strict=False))


def ip_subject(ip: str) -> str:
    """Who is scored before that, and for what may not be the peer's doing (9.1):
    an IPv4 address, or the /64 network of an IPv6 one, because a /64 is what
    one site gets and an attacker holds 2^64 addresses in it (9.2)."""
    address = parse_ip(ip)
    if address is None or address.version == 4:
        return f"ip:{address or ip}"
    return f"ip:{ipaddress.ip_network((address, 64), strict=False)}"


class Peer:
    """One connection's protocol state (PROTOCOL.md 8.1)."""

    def __init__(self, conn: int, ip: str, dialled: Dial | None, nonce: str, bucket: TokenBucket,
                 now: float):
        self.conn = conn
        self.ip = ip
        self.dialled = dialled          # the Dial that made it; None if they dialled us
        self.outbound = dialled is not None
        self.address = (dialled.host, dialled.port) if dialled else None
        self.expect = dialled.domain if dialled else None   # the domain we dialled, if we knew it
        self.nonce = nonce              # our challenge, base64
        self.their_nonce = ""           # theirs, from their hello
        self.refusal = ""               # the code of an error frame they sent before closing
        self.proven: str | None = None  # the listener's domain, from its TLS certificate (8.1)
        self.state = "hello"
        self.record: dict | None = None
        self.domain: str | None = None          # claimed by hello ...
        self.verified = False                   # ... and proven by TLS or by auth
        self.address_subject = ip_subject(ip)   # its address, or IPv6 /64 (9.1) ...
        self.address_range = address_range(ip)  # ... and its /24 or /48 (9.3)
        self.opened = now
        self.last_rx = now
        self.last_object: float | None = None   # when it last brought something new (9.3)
        self.pinged = now
        self.bucket = bucket
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def subject(self) -> str:
        """Who is scored: the domain once proven (8.1), the IP address before
        (a hello alone proves nothing: an impostor must not cost its victim)."""
        return domain_subject(self.domain) if self.verified else ip_subject(self.ip)

    @property
    def target(self) -> str | None:
        """The target of the dial that made this connection (5.5)."""
        return self.dialled.target if self.dialled else None

    def __repr__(self) -> str:
        return f"<Peer #{self.conn} {self.domain or self.ip} {self.state}>"


@dataclasses.dataclass(kw_only=True, slots=True)
class Item:
    """Something this node is trying to deliver: the routing view of an outbox
    mail, a stored relay object or one of our own acks.  The signed object
    itself stays in its store; this is the small index kept in memory (with
    slots, and the domains shared: a relay may hold 100,000 of them)."""

    key: str                    # mail_key / ack_key (7.1)
    kind: str                   # "mail" | "ack"
    mail_id: str                # the id of the mail (of the mail it answers, for an ack)
    store: str                  # "outbox" (ref: the mail id) or "relay" (ref: the key)
    ref: str                    # the key in that store
    target: str                 # the domain it is for
    origin: str                 # the domain that signed it
    expires: int
    size: int
    hops: int                   # what the next copy carries
    own: bool                   # we made it: we may dial its target directly
    next_try: float
    tries: int = 0
    source: str | None = None   # who gave it to us: rewarded when its ack proves it real
    handed: bool = False        # written to a connection of `target` itself
    offered: set = dataclasses.field(default_factory=set)   # conns that have it

    @classmethod
    def relayed(cls, key: str, kind: str, obj: dict, hops: int, expires: int, now: float,
                own: bool = False, source: str | None = None, next_try: float | None = None,
                size: int | None = None) -> "Item":
        """A held relay-store object: a mail goes from origin to target, an ack back.
        `size` is its canonical length, if the store kept it (a restart need
        not encode every held object again)."""
        origin, target = map(sys.intern, object_domains(obj))
        size = len(canonical_json(obj)) if size is None else size
        return cls(key=key, kind=kind, mail_id=obj["id"], store="relay", ref=key, target=target,
                   origin=origin, expires=expires, size=size, hops=hops, own=own,
                   next_try=now if next_try is None else next_try, source=source)

    @classmethod
    def outbox(cls, mail: dict, expires: int, now: float) -> "Item":
        """An own mail, sealed, from the outbox."""
        sender, target = object_domains(mail)
        return cls(key=mail_key(sender, mail["id"]), kind="mail", mail_id=mail["id"], store="outbox",
                   ref=mail["id"], target=target, origin=sender, expires=expires,
                   size=len(canonical_json(mail)), hops=MAX_HOPS, own=True, next_try=now)

    @property
    def settled(self) -> bool:
        """An ack that reached its target: kept only to answer late copies."""
        return self.kind == "ack" and self.handed


@dataclasses.dataclass
class Query:
    """A NIS query in flight: ours (origin None) or one we forward."""

    qid: str
    domain: str
    origin: int | None
    deadline: float
    asked: set = dataclasses.field(default_factory=set)
    answered: bool = False


class RelayQuota:
    """What the relay store holds, in total and per origin domain (7.6)."""

    def __init__(self, config: Config):
        self.config = config
        self.items = 0
        self.bytes = 0
        self.by_origin: dict[str, list[int]] = {}   # origin -> [items, bytes]

    def count(self, item: Item, sign: int) -> None:
        self.items += sign
        self.bytes += sign * item.size
        used = self.by_origin.setdefault(item.origin, [0, 0])
        used[0] += sign
        used[1] += sign * item.size
        if used == [0, 0]:
            del self.by_origin[item.origin]

    def refusal(self, origin: str, size: int) -> str | None:
        """Why an object of `size` bytes from `origin` would be over quota, or None."""
        c = self.config
        if self.items >= c.relay_max_items or self.bytes + size > c.relay_max_bytes:
            return "the relay store is full"
        items, used = self.by_origin.get(origin, (0, 0))
        if items >= c.origin_max_items or used + size > c.origin_max_bytes:
            return f"the relay store is full for mail from {origin}"
        return None


def forgery_event(exc: RemoteError) -> str:
    """A record whose signature, key or domain is wrong was forged; one that
    is merely stale or malformed is scored as what it is (9.1)."""
    return "forged_record" if exc.code in ("bad_signature", "bad_domain", "bad_key") else exc.code


def backoff(tries: int, first: float, cap: float) -> float:
    return min(cap, first * 2 ** min(tries, 20))


class InboundSlots:
    """Who gets an inbound slot (9.3, "Inbound caps"): the caps per address and
    per address range, and when every slot is taken, whom a newcomer evicts.

    A squatter holds slots by being cheap, not bad: many identities that shake
    hands and sit idle, score 0.  So eviction protects peers by the value they
    brought, a few of each kind, and among the rest takes from the address
    range that holds the most slots, its youngest connection first: a crowd
    from a few ranges makes room for others out of its own ranks, while long-
    standing peers and lone newcomers from other ranges stay."""

    def __init__(self, node: "Node"):
        self.node = node

    def refusal(self, newcomer: Peer, inbound: list[Peer]) -> str | None:
        """Why a newcomer is refused before anyone is evicted, or None."""
        config = self.node.config
        if sum(p.address_subject == newcomer.address_subject for p in inbound) >= config.max_inbound_per_ip:
            return "too many connections from this address"
        if sum(p.address_range == newcomer.address_range for p in inbound) >= config.max_inbound_per_range:
            return "too many connections from this address range"
        return None

    def protected(self, inbound: list[Peer], now: float) -> set[int]:
        """The open peers no newcomer evicts: for each kind of value, the
        PROTECTED_PER_KIND that brought the most."""
        scores = {p.conn: self.score(p, now) for p in inbound}
        good = [p for p in inbound if p.state == "open" and scores[p.conn] >= 0]
        held = self.node.delivery.items_for
        kinds = (
            (lambda p: scores[p.conn], lambda p: scores[p.conn] > 0),           # reputation earned
            (lambda p: p.last_object, lambda p: p.last_object is not None),     # new objects brought
            (lambda p: len(held.get(p.domain, ())), lambda p: p.domain in held),  # mail waits for it
        )
        keep: set[int] = set()
        for worth, counts in kinds:
            ranked = sorted((p for p in good if counts(p)), key=lambda p: (-worth(p), p.conn))
            keep.update(p.conn for p in ranked[:PROTECTED_PER_KIND])
        return keep

    def victim(self, inbound: list[Peer], now: float) -> Peer | None:
        """The connection a newcomer evicts, or None: the newcomer is refused.
        First a peer with a negative score (the lowest), then the youngest
        connection of the range with the most."""
        keep = self.protected(inbound, now)
        candidates = [p for p in inbound if p.conn not in keep]
        crowd = collections.Counter(p.address_range for p in inbound)
        return min(candidates, default=None, key=lambda p: (
            min(self.score(p, now), 0), -crowd[p.address_range], -p.opened, -p.conn))

    def score(self, peer: Peer, now: float) -> int:
        return self.node.reputation.score(peer.subject, int(now))


class Links:
    """Connections (PROTOCOL.md 8 and 9.3): admission, the handshake inside
    TLS, the rate limit, keepalive and timeouts, scoring and bans.  Frames
    that pass are handed to the engine named in FRAME_TYPES."""

    def __init__(self, node: "Node"):
        self.node = node
        self.peers: dict[int, Peer] = {}        # every connection, by the shell's handle
        self.open: dict[str, Peer] = {}         # connections past the handshake, by domain
        self.slots = InboundSlots(node)

    # -- sending and closing ------------------------------------------------------

    def send(self, peer: Peer, frame: dict) -> None:
        self.node.act(Send(peer.conn, frame))

    def close(self, peer: Peer, code: str, message: str, now: float) -> None:
        """Say why, then hang up (an error frame without ref precedes a close)."""
        if peer.state == "closed":
            return
        self.send(peer, make_error(code, message))
        self.node.act(Close(peer.conn, code))
        self.drop(peer, code, now)

    def enter(self, peer: Peer, state: str) -> None:
        """The one place a connection changes state (CONNECTION_TRANSITIONS)."""
        if state not in CONNECTION_TRANSITIONS[peer.state]:
            raise LocalError("refused", f"connection #{peer.conn}: no move from {peer.state} to {state}")
        peer.state = state

    def open_peers(self, now: float, exclude: Peer | None = None) -> list[Peer]:
        """Open peers, higher reputation first (7.2: better peers first)."""
        peers = [p for p in self.open.values() if p is not exclude]
        peers.sort(key=lambda p: (-self.node.score(p.domain, now), p.conn))
        return peers

    # -- connections coming and going ------------------------------------------

    def connection_made(self, conn: int, ip: str, now: float, dialled: Dial | None,
                        certificate: bytes | None = None) -> None:
        """A TLS connection is up (8.1): send hello, or refuse a banned or excess
        peer, or a listener whose certificate is not the node we dialled.
        `certificate` is the listener's, DER, when we dialled."""
        nonce = self.node.rng(HELLO_NONCE)
        peer = Peer(conn, ip, dialled, b64e(nonce), TokenBucket(self.node.config.rate,
                                                                self.node.config.burst, now), now)
        self.peers[conn] = peer
        if dialled is not None:
            self.node.peerset.dial_answered(dialled)
        if self.node.reputation.banned(ip_subject(ip), int(now)):
            self.close(peer, "banned", "this address is banned", now)
            return
        if dialled is None and not self.admit(peer, now):
            return
        if dialled is not None and not self.check_certificate(peer, certificate, now):
            return
        self.send(peer, make_hello(self.node.names.record, nonce))

    def check_certificate(self, peer: Peer, certificate: bytes | None, now: float) -> bool:
        """The listener's domain is what its certificate's key derives (8.1);
        TLS proved it holds that key.  A listener that is not the node we
        dialled is closed (wrong_peer)."""
        try:
            peer.proven = domain_of_key(certificate_key(certificate or b""))
        except RemoteError as exc:
            self.misbehaved(peer, exc.code, exc.message, now, disconnect=True)
            return False
        if peer.expect is not None and peer.proven != peer.expect:
            self.close(peer, "wrong_peer", f"dialled {peer.expect}, found {peer.proven}", now)
            return False
        return True

    def admit(self, newcomer: Peer, now: float) -> bool:
        """Give an inbound newcomer a slot, evicting if all are taken (9.3)."""
        inbound = [p for p in self.peers.values() if not p.outbound and p is not newcomer]
        refusal = self.slots.refusal(newcomer, inbound)
        if refusal is None and len(inbound) >= self.node.config.max_inbound:
            victim = self.slots.victim(inbound, now)
            if victim is None:
                refusal = "too many connections"
            else:
                self.close(victim, "busy", "evicted to make room", now)
        if refusal is not None:
            self.close(newcomer, "busy", refusal, now)
        return refusal is None

    def drop(self, peer: Peer, reason: str, now: float) -> None:
        """The connection is gone: forget it, and tell the engines that care."""
        if peer.state == "closed":
            return
        was_open = peer.state == "open"
        self.enter(peer, "closed")
        self.peers.pop(peer.conn, None)
        if was_open and self.open.get(peer.domain) is peer:
            del self.open[peer.domain]
            self.node.event("peer_closed", domain=peer.domain, conn=peer.conn, reason=reason)
        elif not was_open and peer.outbound and not {reason, peer.refusal} & {"duplicate_connection",
                                                                              "shutdown"}:
            self.node.peerset.dial_failed(peer.dialled, now)
        self.node.delivery.connection_gone(peer.conn)
        self.node.names.connection_gone(peer.conn)

    # -- lines in (8.2) -----------------------------------------------------------

    def line_received(self, conn: int, line: bytes, now: float, arrived: float) -> None:
        """One line: activity, the rate limit, then decode and dispatch (8.2)."""
        peer = self.peers.get(conn)
        if peer is None or peer.state == "closed":
            return
        peer.last_rx = now
        if not peer.bucket.take(arrived):
            self.misbehaved(peer, "rate_exceeded", "frames faster than the rate limit", now,
                            disconnect=peer.state != "open")
            return
        try:
            self.dispatch(peer, verify_frame(decode_frame(line)), now)
        except RemoteError as exc:
            # Before the handshake there is nothing to talk about: any error ends it.
            self.misbehaved(peer, exc.code, exc.message, now, disconnect=peer.state != "open")

    def dispatch(self, peer: Peer, frame: dict, now: float) -> None:
        """Hand a checked frame to its handler, if this state accepts it (8.2)."""
        if peer.state not in FRAME_TYPES[frame["type"]].states:
            raise RemoteError("not_ready", f"{frame['type']} before the handshake is complete")
        self.node.handlers[frame["type"]](peer, frame, now)

    def line_too_long(self, conn: int, now: float) -> None:
        """The shell read MAX_LINE bytes without a newline (3.1)."""
        peer = self.peers.get(conn)
        if peer is not None:
            self.misbehaved(peer, "oversize_line", f"a line longer than {MAX_LINE} bytes", now,
                            code="too_large")

    # -- scores and bans (9.1, 9.2) -------------------------------------------------

    def misbehaved(self, peer: Peer, event: str, message: str, now: float, code: str | None = None,
                   disconnect: bool = False, subject: str | None = None) -> None:
        """Score a misbehaviour (9.1) and disconnect where the table says so (or
        `disconnect` does); `code` is what the error frame says (default: the
        event); `subject` is who pays (default: the peer)."""
        change, always = REPUTATION_EVENTS.get(event, (0, True))
        disconnect = disconnect or always
        if peer.outbound and not peer.verified and subject is None:
            # We dialled it on a record's word: not an attacker that came to us (9.1).
            self.node.event("misbehaved", domain=peer.domain, ip=peer.ip, event=event,
                            message=message, score=0)
            self.close(peer, code or (event if event in ERROR_CODES else "malformed"), message, now)
            if change < 0:                      # what would have cost an attacker: a lie
                self.node.peerset.dialled_wrong(peer.dialled, now)
            return
        subject = subject or peer.subject
        score = self.node.reputation.change(subject, change, int(now)) if change else 0
        self.node.event("misbehaved", domain=peer.domain, ip=peer.ip, event=event, message=message,
                        score=score)
        if score <= SCORE_MIN:
            self.ban(peer, now, subject)
        elif disconnect:
            self.close(peer, code or (event if event in ERROR_CODES else "malformed"), message, now)

    def blame(self, domain: str, event: str, message: str, now: float) -> None:
        """Score a node for what it did on another connection (9.1): through its
        open link if there is one, else in the table alone."""
        peer = self.open.get(domain)
        if peer is not None:
            self.misbehaved(peer, event, message, now)
            return
        score = self.node.reputation.change(domain_subject(domain), REPUTATION_EVENTS[event][0], int(now))
        if score <= SCORE_MIN:
            self.node.reputation.ban(domain_subject(domain), int(now))

    def reward(self, peer: Peer, event: str, now: float) -> None:
        self.node.reputation.change(peer.subject, REPUTATION_EVENTS[event][0], int(now))
        peer.last_object = now                  # it brought something new (9.3)

    def ban(self, peer: Peer, now: float, subject: str) -> None:
        """Ban the peer's domain and address (9.2).  Unfinished handshakes from
        that address end too; other nodes already proven behind it stay."""
        until = self.node.reputation.ban(subject, int(now))
        if subject != peer.address_subject:
            self.node.reputation.ban(peer.address_subject, int(now))
        self.close_unproven(peer.address_subject, now, spare=peer)
        self.node.event("banned", domain=peer.domain, ip=peer.ip, until=until)
        self.close(peer, "banned", f"reputation reached {SCORE_MIN}; banned for {until - int(now)} s", now)

    def close_unproven(self, address_subject: str, now: float, spare: Peer | None = None) -> None:
        """An address was banned: its connections that have proven no domain
        end; nodes already proven behind it stay (9.2)."""
        for other in list(self.peers.values()):
            if other is not spare and other.address_subject == address_subject and not other.verified:
                self.close(other, "banned", "this address is banned", now)

    # -- the handshake (8.1) --------------------------------------------------------

    def handle_hello(self, peer: Peer, frame: dict, now: float) -> None:
        if frame["v"] != PROTOCOL_VERSION:
            self.close(peer, "version", f"this node speaks v{PROTOCOL_VERSION}", now)
            return
        b64d(frame["nonce"], "hello.nonce", HELLO_NONCE)
        record = verify_record(frame["record"], int(now), "hello.record")
        domain = record["domain"]
        if domain == self.node.domain:
            self.close(peer, "self_connection", "this is my own address", now)
            return
        if peer.outbound and domain != peer.proven:
            self.close(peer, "wrong_peer", f"the record is {domain}'s; the TLS certificate "
                       f"is {peer.proven}'s", now)
            return
        if (self.node.reputation.banned(domain_subject(domain), int(now))
                or self.node.reputation.banned(ip_subject(peer.ip), int(now))):
            self.close(peer, "banned", f"{domain} or its address is banned", now)
            return
        peer.record, peer.domain = record, domain
        self.enter(peer, "auth")
        peer.their_nonce = frame["nonce"]
        if peer.outbound:
            # TLS proved the listener; we prove ourselves, naming it, and talk.
            peer.verified = True
            self.send(peer, make_auth(self.node.identity, peer.their_nonce, domain, self.node.rng))
            self.open_link(peer, now)

    def handle_auth(self, peer: Peer, frame: dict, now: float) -> None:
        """The dialler's auth (8.1): its signature over our challenge and our
        name opens the link.  (A dialler never receives auth: it is open by
        then, and auth is refused in the open state.)"""
        verify_auth(frame, peer.record, peer.nonce, self.node.domain)
        peer.verified = True
        self.open_link(peer, now)

    def open_link(self, peer: Peer, now: float) -> None:
        """The link is proven: resolve a duplicate, then start talking (8.1)."""
        if peer.outbound:                       # an address that works, even if this link
            self.node.peerset.dial_worked(peer, now)   # loses to a duplicate (5.5)
        existing = self.open.get(peer.domain)
        if existing is not None:
            # Both dialled at once: keep the connection dialled by the smaller
            # domain; if one side dialled both, the newer one.
            if self.dialler(peer) > self.dialler(existing):
                self.close(peer, "duplicate_connection", "already connected", now)
                return
            self.close(existing, "duplicate_connection", "replaced by a newer connection", now)
        self.enter(peer, "open")
        self.open[peer.domain] = peer
        self.node.names.learn_record(peer.record, now)
        self.node.event("peer_open", domain=peer.domain, conn=peer.conn, ip=peer.ip,
                        outbound=peer.outbound)
        self.send(peer, {"type": "getpeers"})
        self.node.delivery.peer_opened(peer, now)
        self.node.outbox.peer_opened(now)

    def dialler(self, peer: Peer) -> str:
        return self.node.domain if peer.outbound else peer.domain

    # -- keepalive and errors (8.3, 9.4) -----------------------------------------

    def handle_ping(self, peer: Peer, frame: dict, now: float) -> None:
        self.send(peer, {"type": "pong"})

    def handle_pong(self, peer: Peer, frame: dict, now: float) -> None:
        pass                                    # last_rx was updated on receipt

    def handle_error(self, peer: Peer, frame: dict, now: float) -> None:
        """A peer explains a refusal.  With ref it refused one object: forget
        that it has it, so a later retry offers it again (9.4)."""
        ref = frame.get("ref")
        self.node.event("peer_error", domain=peer.domain, ip=peer.ip, code=frame["code"],
                        message=frame["message"], ref=ref)
        if ref is not None:
            check_hex_id(ref, "error.ref")
            self.node.delivery.refused(peer, ref)
            self.node.event("refused", domain=peer.domain, code=frame["code"], ref=ref)
        else:                                   # a goodbye: close our side at once (9.4)
            peer.refusal = frame["code"]
            self.node.act(Close(peer.conn, frame["code"]))
            self.drop(peer, frame["code"], now)

    def tick(self, now: float) -> None:
        """Handshake and idle timeouts, and pings on quiet links (8.1, 8.3)."""
        for peer in list(self.peers.values()):
            if peer.state != "open" and now - peer.opened > HANDSHAKE_TIMEOUT:
                self.misbehaved(peer, "timeout", f"no handshake within {HANDSHAKE_TIMEOUT} s", now)
            elif peer.state == "open" and now - peer.last_rx > IDLE_TIMEOUT:
                self.misbehaved(peer, "timeout", f"silent for {IDLE_TIMEOUT} s", now)
            elif peer.state == "open" and now - max(peer.last_rx, peer.pinged) > PING_INTERVAL:
                peer.pinged = now
                self.send(peer, {"type": "ping"})


class Delivery:
    """Mail and acks (PROTOCOL.md 7): what this node holds and routes -- its
    outbox, its own acks, the relay store -- with the seen set, the quotas,
    retries and expiry, and the recipient's store-then-ack."""

    def __init__(self, node: "Node"):
        self.node = node
        self.stores = node.stores
        self.items: dict[str, Item] = {}        # what we are delivering, by key
        self.items_for: dict[str, set[str]] = collections.defaultdict(set)     # target -> keys
        self.items_by_id: dict[str, set[str]] = collections.defaultdict(set)   # mail id -> keys
        self.quota = RelayQuota(node.config)
        self.seen: dict[str, int] = dict(self.stores.seen.items())   # key -> expires
        self.seen_changed: set[str] = set()     # saved with the next flush

    @property
    def links(self) -> Links:
        return self.node.links

    # -- the index of held objects ------------------------------------------------

    def add(self, item: Item) -> None:
        old = self.items.get(item.key)
        if old is not None:                     # replaced, never counted twice
            self.unindex(old)
        self.items[item.key] = item
        self.items_for[item.target].add(item.key)
        self.items_by_id[item.mail_id].add(item.key)
        if item.store == "relay":
            self.quota.count(item, +1)

    def forget(self, item: Item) -> None:
        if self.items.get(item.key) is not item:
            return
        del self.items[item.key]
        self.unindex(item)
        if item.store == "relay":
            with contextlib.suppress(KeyError):     # (del, not pop: nothing to read back)
                del self.stores.relay[item.ref]

    def unindex(self, item: Item) -> None:
        self.items_for[item.target].discard(item.key)
        if not self.items_for[item.target]:
            del self.items_for[item.target]
        self.items_by_id[item.mail_id].discard(item.key)
        if not self.items_by_id[item.mail_id]:
            del self.items_by_id[item.mail_id]
        if item.store == "relay":
            self.quota.count(item, -1)

    def load(self, now: float) -> None:
        """Rebuild the index from the durable stores after a start."""
        unopenable = []
        for key, entry in self.stores.relay.items():   # (one at a time: there may be 100,000)
            obj = entry["obj"]
            if entry["kind"] == "mail" and "key_id" not in obj:   # sealed by version 2: nobody can
                unopenable.append(key)                            # open it now (its sender re-seals)
                continue
            self.add(Item.relayed(key, entry["kind"], obj, entry["hops"], entry["expires"], now,
                                  own=object_domains(obj)[0] == self.node.domain, size=entry.get("size")))
        for key in unopenable:
            del self.stores.relay[key]

    def held_object(self, item: Item) -> dict | None:
        entry = getattr(self.stores, item.store).get(item.ref)
        if entry is None:
            return None
        return entry["mail"] if item.store == "outbox" else entry["obj"]

    def domains_needed(self) -> set[str]:
        """Domains whose records must stay in the NIS map: we hold something for
        them, or a mail waits for their key (5.3)."""
        return {*self.items_for, *self.node.outbox.waiting_key}

    # -- receiving mail and acks (7.2, 7.3) ------------------------------------------

    def handle_mail(self, peer: Peer, frame: dict, now: float) -> None:
        mail = verify_mail(frame["mail"], int(now), "mail.mail")
        sender, recipient = object_domains(mail)
        key = mail_key(sender, mail["id"])
        if self.repeated(peer, key, now):
            return
        if sender == self.node.domain:          # our own mail, back from a flood
            self.mark_has(key, peer)
            return
        if recipient == self.node.domain:
            self.deliver_local(mail, key, peer, now)
            return
        acked = self.items.get(ack_key(sender, mail["id"], recipient))
        if acked is not None:                   # already answered: tell the asker
            self.offer(acked, peer, now, follow=True)
            return
        if self.seen_before(key, peer, frame["hops"], now):
            return
        self.accept(peer, "mail", key, mail, mail["expires"], frame["hops"], now)

    def handle_ack(self, peer: Peer, frame: dict, now: float) -> None:
        ack = verify_ack(frame["ack"], int(now), "ack.ack")
        recipient = parse_address(ack["from"]).domain
        sender = parse_address(ack["to"]).domain
        key = ack_key(sender, ack["id"], recipient)
        if self.repeated(peer, key, now) or self.seen_before(key, peer, frame["hops"], now):
            return
        expires = int(ack["created"]) + ack_lifetime()
        if sender == self.node.domain:
            mine = self.items.get(mail_key(self.node.domain, ack["id"]))
            if self.node.outbox.ack_arrived(ack, recipient, now):     # only news about our own mail earns
                self.links.reward(peer, "ack_relayed", now)
                self.follow(ack, 1, mine.offered if mine else (), peer, now)
            self.remember(key, expires)
            return
        stored_mail = self.items.get(mail_key(sender, ack["id"]))
        if stored_mail is not None and stored_mail.target != recipient:
            stored_mail = None                  # someone else's ack for that id: not ours to act on
        if stored_mail is None:
            self.accept(peer, "ack", key, ack, expires, frame["hops"], now)
            return
        # The ack frees a mail we hold.  It is stored (even with no hops left,
        # to answer late copies of the mail), then follows the mail: every peer
        # we gave the mail to, or got it from, holds a copy to drop too (7.6).
        with self.stores.batch("relay"):        # store the ack and drop the mail: one commit
            item = self.accept(peer, "ack", key, ack, min(expires, stored_mail.expires),
                               max(frame["hops"], 1), now, frees=True)
            self.forget(stored_mail)            # the recipient has it: drop our copy
        if stored_mail.source:                  # the mail was real: whoever brought it earns (9.1)
            self.node.reputation.change(domain_subject(stored_mail.source),
                                        REPUTATION_EVENTS["mail_relayed"][0], int(now))
        self.follow(item, None, stored_mail.offered, peer, now)

    def follow(self, ack: dict | Item, hops: int | None, conns: set, came_from: Peer, now: float) -> None:
        """The ack follows its mail (7.3, 7.6): to every open peer whose connection
        had the mail, but the one it came from.  The sender sends its copy of
        the ack with one hop (`ack` a dict); a relay offers the ack it now holds
        (`ack` an Item), whatever its hops, once per connection."""
        for conn in conns:
            other = self.links.peers.get(conn)
            if other is None or other.state != "open" or other is came_from:
                continue
            if isinstance(ack, Item):
                self.offer(ack, other, now, follow=True)
            else:
                self.links.send(other, {"type": "ack", "hops": hops, "ack": ack})

    def repeated(self, peer: Peer, key: str, now: float) -> bool:
        """Per-connection duplicate check: honest peers send an object once per
        connection, so a repeat is flooding (9.1)."""
        if key in peer.recent:
            self.links.misbehaved(peer, "duplicate", f"{key} twice on one connection", now)
            return True
        peer.recent[key] = None
        if len(peer.recent) > RECENT_PER_CONNECTION:
            peer.recent.popitem(last=False)
        return False

    def mark_has(self, key: str, peer: Peer) -> None:
        item = self.items.get(key)
        if item is not None:
            item.offered.add(peer.conn)

    def seen_before(self, key: str, peer: Peer, hops: int, now: float) -> bool:
        """A copy of something we already handled: the peer has it.  If this
        copy may travel further than ours, ours takes its hops (so a peer
        cannot stunt a mail by handing us a copy with no hops left first)."""
        if key not in self.seen and key not in self.items:
            return False
        self.mark_has(key, peer)
        item = self.items.get(key)
        if item is not None and item.store == "relay" and hops - 1 > item.hops:
            item.hops = hops - 1
            entry = self.stores.relay[item.ref]
            entry["hops"] = item.hops
            self.stores.relay[item.ref] = entry
            self.route(item, now)
        return True

    def remember(self, key: str, expires: int) -> None:
        """Add to the seen-set (bounded: the soonest-expiring keys go first).
        It is saved in batches, not per key: everything it guards durably is
        also guarded by the relay store, the inbox or the outbox (7.1)."""
        self.seen[key] = expires
        self.seen_changed.add(key)
        if len(self.seen) > self.node.config.seen_max:    # (what we hold stays: it is an item)
            for old in heapq.nsmallest(len(self.seen) // 10, self.seen, key=self.seen.get):
                self.seen.pop(old, None)
                self.seen_changed.add(old)

    def save_seen(self) -> None:
        with self.stores.batch("seen"):
            for key in self.seen_changed:
                if key in self.seen:
                    self.stores.seen[key] = self.seen[key]
                else:
                    self.stores.seen.pop(key, None)
        self.seen_changed.clear()

    def accept(self, peer: Peer, kind: str, key: str, obj: dict, expires: int, hops: int, now: float,
               frees: bool = False) -> Item | None:
        """Take a new object from `peer` for relaying: store, then route (7.2).
        A copy with no hops left is not ours to pass on: it is dropped, and not
        remembered, so a copy that may travel is still welcome (7.2).  An ack
        that frees a held mail is never refused for quota: it frees space."""
        if hops == 0:
            return None
        item = Item.relayed(key, kind, obj, hops - 1, expires, now, source=peer.domain,
                            next_try=now + self.node.config.retry_first)
        refusal = None if frees else self.quota.refusal(item.origin, item.size)
        if refusal and item.target in self.links.open:
            # Full, but its target is right here: hand it over without keeping a copy.
            self.links.send(self.links.open[item.target], {"type": kind, "hops": hops - 1, kind: obj})
            return None
        if refusal:
            peer.recent.pop(key, None)          # not accepted: a retry may be
            self.links.send(peer, make_error("quota_exceeded", refusal, ref=obj["id"]))
            return None
        if frees:                               # an ack for nothing we held earns nothing
            self.links.reward(peer, "ack_relayed", now)
        self.stores.relay[key] = {"kind": kind, "obj": obj, "hops": hops - 1,
                                  "received": int(now), "expires": expires, "size": item.size}
        self.remember(key, expires)
        peer.last_object = now                  # a new object to carry (9.3)
        item.offered.add(peer.conn)
        self.add(item)
        self.route(item, now, obj)
        return item

    # -- the recipient (7.4) and the sender's acks (7.5) ---------------------------------

    def deliver_local(self, mail: dict, key: str, peer: Peer | None, now: float) -> dict:
        """Store first, ack after (7.4): an ack means nothing can lose it now.
        A duplicate is answered with the ack we made the first time."""
        sender = mail["from"]
        answered = self.items.get(ack_key(sender, mail["id"], self.node.domain))
        if answered is not None:
            if peer is not None:
                self.offer(answered, peer, now)
            self.route(answered, now)
            return self.held_object(answered)
        entry = self.stores.inbox.get(key)
        if entry is None:
            entry = self.open_and_store(mail, key, peer, now)
        if sender != self.node.domain:
            self.send_own_ack(entry["ack"], now, peer)
        return entry["ack"]

    def open_and_store(self, mail: dict, key: str, peer: Peer | None, now: float) -> dict:
        """Open a new mail for us, sign its ack, and store a delivered one (7.4)."""
        status, reason, plain = recipient_verdict(self.node.identity, self.node.mail_keys, mail, self.stores.users)
        ack = make_ack(self.node.identity, mail, status, reason, int(now), self.node.rng)
        entry = {"ack": ack}
        if status == "delivered":
            user = parse_address(plain["to"]).user.lower()
            entry.update(user=user, id=mail["id"], created=mail["created"],
                         received=int(now), unread=True, **plain)
            self.stores.inbox[key] = entry
            self.node.event("mail_received", key=key, user=user, sender=mail["from"],
                            size=len(mail["ct"]))     # never the subject: logs are not private
            if peer is not None:                # a real delivery: the bringer earns (9.1)
                self.links.reward(peer, "mail_relayed", now)
        else:
            self.node.event("mail_rejected", id=mail["id"], sender=mail["from"], reason=reason)
        return entry

    def send_own_ack(self, ack: dict, now: float, peer: Peer | None) -> None:
        sender = parse_address(ack["to"]).domain
        key = ack_key(sender, ack["id"], self.node.domain)
        item = self.items.get(key)
        if item is None:
            expires = ack["created"] + ack_lifetime()
            item = Item.relayed(key, "ack", ack, MAX_HOPS, expires, now, own=True,
                                next_try=now + self.node.config.retry_first)
            self.stores.relay[key] = {"kind": "ack", "obj": ack, "hops": MAX_HOPS,
                                      "received": int(now), "expires": expires, "size": item.size}
            self.remember(key, expires)
            self.add(item)
        if peer is not None and peer.state == "open":
            self.offer(item, peer, now, obj=ack)    # the peer that brought the mail waits for this
        self.route(item, now, ack)

    # -- routing (7.2) ------------------------------------------------------------

    def offer(self, item: Item, peer: Peer, now: float, follow: bool = False, obj: dict | None = None) -> None:
        """Write the object to one peer, once per connection (a peer that got it
        on this connection has it: TCP delivered it or the connection died).
        `follow`: an ack going where its mail went, whatever its hops (7.6).
        `obj`: the object, if the caller has just stored it (not read back)."""
        if peer.conn in item.offered:
            return
        if item.hops == 0 and peer.domain != item.target and not follow:
            return                              # no hops left: useful to its target only (7.2)
        if item.expires <= now:
            return                              # never pass on the dead (the sweep drops it)
        obj = obj if obj is not None else self.held_object(item)
        if obj is None:
            return
        self.links.send(peer, {"type": item.kind, "hops": item.hops, item.kind: obj})
        item.offered.add(peer.conn)
        if peer.domain == item.target:
            item.handed = True
        if item.store == "outbox" and self.stores.outbox[item.ref]["status"] == "queued":
            self.node.outbox.set_status(item.ref, "sent", "", now, sent=int(now))

    def route(self, item: Item, now: float, obj: dict | None = None) -> None:
        """Where an object goes next (7.2): its target if connected; else, if we
        made it and the target's record has a host, a direct dial; else every
        other peer, better reputation first.  (`obj` as in offer.)"""
        if item.settled:
            return
        peer = self.links.open.get(item.target)
        if peer is not None:
            self.offer(item, peer, now, obj=obj)
            return
        if item.own and self.node.peerset.dial_domain(item.target, now):
            return                              # wait for the dial; its failure floods
        for peer in self.links.open_peers(now):
            self.offer(item, peer, now, obj=obj)

    def peer_opened(self, peer: Peer, now: float) -> None:
        """A peer completed the handshake: everything we hold for it goes now
        (7.6), and so does every own mail still waiting for its ack, even one
        that other peers already have: the new peer may be the way to its
        recipient, and a retry would offer it there anyway, only later (7.2).
        """
        for key in list(self.items_for.get(peer.domain, ())):
            item = self.items[key]
            if not item.settled:
                self.offer(item, peer, now)
        for item in list(self.items.values()):
            if (item.store == "outbox" and item.target not in self.links.open
                    and not self.node.peerset.dial_in_flight(item.target)):
                self.offer(item, peer, now)

    def connection_gone(self, conn: int) -> None:
        for item in self.items.values():
            item.offered.discard(conn)

    def refused(self, peer: Peer, mail_id: str) -> None:
        """The peer refused the objects with this id (an error with ref, 9.4):
        this connection does not have them, so a retry offers them again."""
        for key in self.items_by_id.get(mail_id, ()):
            self.items[key].offered.discard(peer.conn)   # only affects this connection

    def dial_failed(self, target: str, now: float) -> None:
        """A direct dial to `target` failed: relay what we hold for it (7.2)."""
        for key in list(self.items_for.get(target, ())):
            item = self.items[key]
            for peer in self.links.open_peers(now):
                self.offer(item, peer, now)

    def retry(self, now: float) -> None:
        """Route again whatever is due (7.5): the schedule doubles up to retry_max."""
        for item in list(self.items.values()):
            if item.next_try <= now and item.key in self.items:
                item.tries += 1
                item.next_try = now + backoff(item.tries, self.node.config.retry_first,
                                              self.node.config.retry_max)
                self.route(item, now)

    # -- expiry (7.7) -------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop what has expired: held objects (our own undelivered mail becomes
        "expired") and seen keys."""
        for item in [i for i in self.items.values() if i.expires <= now]:
            self.forget(item)
            if item.store == "outbox":
                self.node.outbox.set_status(item.ref, "expired", "not acknowledged before it expired", now)
        for key in [k for k, expires in self.seen.items() if expires <= now]:
            del self.seen[key]
            self.seen_changed.add(key)


class Outbox:
    """Own mail (PROTOCOL.md 7.5): the user's submissions, sealed once the
    recipient's key is known, their status (OUTBOX_TRANSITIONS, one place that
    moves it), the lookup history of mail that waits for a key, withdrawal,
    and the ack that settles each.  Sealed mail is handed to Delivery to route."""

    def __init__(self, node: "Node"):
        self.node = node
        self.stores = node.stores
        self.waiting_key: dict[str, set[str]] = collections.defaultdict(set)   # domain -> outbox ids

    @property
    def delivery(self) -> "Delivery":
        return self.node.delivery

    def load(self, now: float) -> None:
        """Hand what still waits back to Delivery after a start."""
        for mail_id, entry in self.stores.outbox.items():
            if entry["status"] in OUTBOX_WAITING and entry.get("mail") and "key_id" not in entry["mail"]:
                entry.update(mail=None, status="queued")    # sealed by version 2 to a node key: sealed
                self.stores.outbox[mail_id] = entry          # again, to a mail key, once its record is known
            if entry["status"] in OUTBOX_WAITING:
                self.hand_over(mail_id, entry, now)
        for domain in [d for d in self.waiting_key if self.node.names.known_record(d, now)]:
            self.record_learned(domain, now)    # (the key came before the restart)

    def hand_over(self, mail_id: str, entry: dict, now: float) -> None:
        """A sealed mail goes to Delivery; one still without its key waits here."""
        target = parse_address(entry["to"]).domain
        if entry.get("mail") is None:
            self.waiting_key[target].add(mail_id)
            return
        if target == self.node.domain:          # to ourselves: no network involved
            ack = self.delivery.deliver_local(entry["mail"], mail_key(self.node.domain, mail_id), None, now)
            self.ack_arrived(ack, self.node.domain, now)
            return
        self.delivery.add(Item.outbox(entry["mail"], entry["expires"], now))

    def set_status(self, mail_id: str, status: str, reason: str, now: float, **fields: Any) -> dict:
        """The one place an outbox entry changes status (OUTBOX_TRANSITIONS):
        stored, then announced."""
        entry = self.stores.outbox[mail_id]
        if status not in OUTBOX_TRANSITIONS[entry["status"]]:
            raise LocalError("refused", f"mail {mail_id}: no move from {entry['status']} to {status}")
        entry.update(status=status, reason=reason, **fields)
        self.stores.outbox[mail_id] = entry
        self.node.event("mail_status", id=mail_id, status=status, reason=reason)
        if status in OUTBOX_BOUNCED:
            self.bounce(entry, now)
        return entry

    def bounce(self, entry: dict, now: float) -> None:
        """A refused or expired own mail is reported in its sender's inbox by
        Core (Appendix B), as a delivery status notification, so that the mail
        client that sent it shows the failure, not only `outbox`.  Its id is
        derived from the mail's, so a bounce is made once."""
        sender = parse_address(entry["from"])
        bounce_id = hashlib.sha256(b"secral bounce\0" + entry["id"].encode()).hexdigest()[:32]
        key = mail_key(self.node.domain, bounce_id)
        if key in self.stores.inbox or sender.user.lower() not in self.stores.users:
            return
        what = "was refused by the recipient's node" if entry["status"] == "rejected" else "expired undelivered"
        self.stores.inbox[key] = {
            "user": sender.user.lower(), "id": bounce_id, "from": f"{CORE_USER}@{self.node.domain}",
            "to": entry["from"], "subject": f"Undelivered: {entry['subject']}"[:MAX_SUBJECT],
            "body": f"Your mail to {entry['to']} {what}: {entry['reason']}.", "parts": [],
            "in_reply_to": None, "created": int(now), "received": int(now), "unread": True,
            "report": {"mail": entry["id"], "from": entry["from"], "to": entry["to"],
                       "subject": entry["subject"], "created": entry["created"],
                       "status": entry["status"], "reason": entry["reason"]}}
        self.node.event("mail_received", key=key, user=sender.user.lower(), sender=CORE_USER, size=0)

    def ack_arrived(self, ack: dict, recipient: str, now: float) -> bool:
        """An ack for our own mail (7.5): the outbox entry reaches its end.
        Returns whether it was news (an entry still waiting for this ack)."""
        entry = self.stores.outbox.get(ack["id"])
        if entry is None or parse_address(entry["to"]).domain != recipient:
            return False
        if ack["status"] not in OUTBOX_TRANSITIONS[entry["status"]]:
            return False                        # settled already
        self.set_status(ack["id"], ack["status"], ack["reason"], now, acked=ack["created"],
                        done_ms=int(now * 1000))
        item = self.delivery.items.get(mail_key(self.node.domain, ack["id"]))
        if item is not None:
            self.delivery.forget(item)
        return True

    def submit(self, user: str, to: str, subject: str, body: str, now: float, ttl: int,
               parts: Sequence[dict] = (), in_reply_to: str | None = None,
               sealed: dict | None = None, local: dict | None = None) -> str:
        """Queue a mail from a local user (7.5).  Returns its id.

        If the recipient's record (and so its key) is unknown, the mail waits
        in the outbox, unsealed, while Core asks the network for the record.
        `sealed` is the same mail sealed already, by the shell, off the lock
        (issue 17); it is taken as it is, with its id and times.  `local`
        is what only the sender keeps (OUTBOX_LOCAL: the mail client's
        Message-ID and display names), never sealed.
        The user's input breaks no wire rule, only a local one: errors are
        LocalErrors with the code of the rule.
        """
        try:
            sender = Address(check_user(user, "from"), self.node.domain)
        except RemoteError as exc:
            raise local_error(exc)
        if sender.is_core:
            raise LocalError("refused", f"{CORE_USER} sends only acks and NIS queries")
        if sender.user.lower() not in self.stores.users:
            raise LocalError("not_found", f"no local user {sender.user!r}")
        sender = Address(self.stores.users[sender.user.lower()]["name"], self.node.domain)
        try:
            recipient = parse_address(to, "to")
            make_plaintext(sender, recipient, subject, body, parts, in_reply_to)   # the limits, now
        except RemoteError as exc:
            raise local_error(exc)
        if not 0 < ttl <= MAX_TTL:
            raise LocalError("bad_ttl", f"the time to live must be 1..{MAX_TTL} seconds")
        if sealed is not None and (sealed["from"], sealed["to"], sealed["expires"] - sealed["created"]) != (
                self.node.domain, recipient.domain, ttl):
            raise LocalError("refused", "the sealed mail is not this one")
        mail_id = sealed["id"] if sealed else self.node.rng(MAIL_ID).hex()
        created = sealed["created"] if sealed else int(now)
        entry = {"id": mail_id, "from": str(sender), "to": str(recipient), "subject": subject,
                 "body": body, "parts": list(parts), "in_reply_to": in_reply_to,
                 "created": created, "expires": created + ttl,
                 "status": "queued", "reason": "", "mail": sealed, "submitted_ms": int(now * 1000),
                 "lookups": 0, "last_lookup": None}
        entry.update({k: str(v) for k, v in (local or {}).items() if k in OUTBOX_LOCAL and v})
        self.stores.outbox[mail_id] = entry
        self.node.event("mail_status", id=mail_id, status="queued", reason="")
        if sealed is not None:
            self.route_sealed(mail_id, entry, now)
        elif self.node.names.known_record(recipient.domain, now) is None and recipient.domain != self.node.domain:
            self.waiting_key[recipient.domain].add(mail_id)
            self.node.names.ask(recipient.domain, now)
        else:
            self.seal_waiting(mail_id, now)
        return mail_id

    def seal_waiting(self, mail_id: str, now: float) -> None:
        entry = self.stores.outbox.get(mail_id)
        if entry is None or entry["mail"] is not None or entry["status"] != "queued":
            return
        recipient = parse_address(entry["to"])
        names = self.node.names
        record = names.record if recipient.domain == self.node.domain else names.known_record(recipient.domain, now)
        if record is None:                      # expired or evicted meanwhile: ask again
            self.waiting_key[recipient.domain].add(mail_id)
            names.ask(recipient.domain, now)
            return
        ttl = entry["expires"] - entry["created"]
        mail = seal_mail(self.node.identity, parse_address(entry["from"]), recipient, record,
                         entry["subject"], entry["body"], entry["created"], ttl,
                         _prefixed_rng(bytes.fromhex(mail_id), self.node.rng),
                         entry.get("parts", ()), entry.get("in_reply_to"))
        entry["mail"] = mail
        self.stores.outbox[mail_id] = entry
        self.route_sealed(mail_id, entry, now)

    def route_sealed(self, mail_id: str, entry: dict, now: float) -> None:
        """A sealed own mail goes to Delivery and on its way (7.2)."""
        self.hand_over(mail_id, entry, now)
        item = self.delivery.items.get(mail_key(self.node.domain, mail_id))
        if item is not None:
            self.delivery.route(item, now)

    def record_learned(self, domain: str, now: float) -> None:
        """A record arrived: seal and route what waited for that key (5.3, 7.5)."""
        for mail_id in self.waiting_key.pop(domain, ()):
            self.seal_waiting(mail_id, now)

    def lookup_failed(self, domain: str, now: float) -> None:
        """Our question for `domain` found nothing: note it on every mail that
        waits for that key, so the user sees why it waits (7.5)."""
        for mail_id in self.waiting_key.get(domain, ()):
            entry = self.stores.outbox.get(mail_id)
            if entry is not None:
                entry.update(lookups=entry.get("lookups", 0) + 1, last_lookup=int(now))
                self.stores.outbox[mail_id] = entry

    def cancel(self, mail_id: str, now: float) -> dict:
        """The user withdraws an own mail that is not yet delivered (7.5): no
        more retries.  Copies already handed to peers may still arrive; an ack
        that comes later is still recorded, because it is the truth."""
        entry = self.stores.outbox.get(mail_id)
        if entry is None:
            raise LocalError("not_found", f"no outbox entry {mail_id}")
        if entry["status"] not in OUTBOX_WAITING:
            raise LocalError("refused", f"mail {mail_id} is {entry['status']}: there is nothing to withdraw")
        item = self.delivery.items.get(mail_key(self.node.domain, mail_id))
        if item is not None:
            self.delivery.forget(item)
        self.waiting_key.get(parse_address(entry["to"]).domain, set()).discard(mail_id)
        return self.set_status(mail_id, "cancelled", "withdrawn by the sender", now)

    def peer_opened(self, now: float) -> None:
        """A new peer may know the keys that mail waits for (5.4)."""
        for domain in [d for d, ids in self.waiting_key.items() if ids]:
            self.node.names.ask(domain, now)

    def sweep(self, now: float) -> None:
        """Mail that waited for a key in vain expires (7.7); for the rest the
        question is asked again, once per domain however many mails wait."""
        for domain, ids in list(self.waiting_key.items()):
            for mail_id in list(ids):
                entry = self.stores.outbox.get(mail_id)
                if entry is None or entry["expires"] <= now:
                    ids.discard(mail_id)
                    if entry is not None:
                        self.set_status(mail_id, "expired", "no NIS record for the recipient was found", now)
            if ids:
                self.node.names.ask(domain, now)
            else:
                del self.waiting_key[domain]


def _prefixed_rng(first: bytes, rng: Rng) -> Rng:
    """An rng whose first draw is `first` (to seal a mail under an id chosen earlier)."""
    pending = [first]

    def draw(n: int) -> bytes:
        if pending:
            value = pending.pop()
            assert len(value) == n
            return value
        return rng(n)
    return draw


class Names:
    """NIS (PROTOCOL.md 5.3, 5.4): the NIS map and its bound, our own record,
    and the questions we ask and forward."""

    def __init__(self, node: "Node"):
        self.node = node
        self.stores = node.stores
        for domain in [d for d, r in self.stores.nis.items() if not isinstance(r.get("mail_keys"), list)]:
            del self.stores.nis[domain]         # version 2 records, which no sender can use now
        self.expiry = {d: r["expires"] for d, r in self.stores.nis.items()   # bounds the map
                       if d != node.domain}
        self.queries: dict[str, Query] = {}
        self.seen_queries: collections.OrderedDict[str, None] = collections.OrderedDict()

    # -- the map and our record (5.3) ---------------------------------------------

    @property
    def record(self) -> dict:
        return self.stores.nis[self.node.domain]

    def refresh_record(self, now: float) -> bool:
        """Re-sign our record when its host/port changed or it nears expiry (5.3),
        and announce it to every open peer."""
        config, domain = self.node.config, self.node.domain
        old = self.stores.nis.get(domain)
        host = config.host
        port = config.port if host is not None else 0     # (the rule of make_record)
        listed, covered = self.node.mail_keys.listing(now)
        expires = min(int(now) + RECORD_LIFETIME, covered)  # a record lives no longer than its keys
        moved = old is None or old["host"] != host or old["port"] != port
        cut_short = old is not None and old["expires"] == (old["mail_keys"][-1]["epoch"] + 1) * MAIL_KEY_EPOCH
        due = old is not None and expires > old["expires"] and (cut_short or old["expires"] - now <= RECORD_REFRESH)
        if not listed or not (moved or due or self.record_is_wrong(old, now)):
            return False                        # (nothing to gain until more keys are made)
        seq = max(int(now), old["seq"] + 1 if old else 0)
        listed = [k for k in listed if k["epoch"] <= epoch_of(expires - 1)]
        record = make_record(self.node.identity, host, port, seq, expires, listed, self.node.rng)
        self.stores.nis[domain] = record
        for peer in self.node.links.open.values():
            self.node.links.send(peer, {"type": "peers", "records": [record]})
        return True

    def record_is_wrong(self, record: dict, now: float) -> bool:
        """Our record lists, for now or later, a mail key we do not hold (the
        keys were lost, or deleted by a clock set far ahead), or it was
        signed by a clock far ahead: it must go, even for a shorter one."""
        keys = self.node.mail_keys
        return (record["expires"] > now + MAX_RECORD_LIFETIME
                or any(k["epoch"] >= epoch_of(now) and keys.public(k["epoch"]) != k["key"]
                       for k in record["mail_keys"]))

    def known_record(self, domain: str, now: float) -> dict | None:
        """An unexpired record for `domain` (not our own) from the map."""
        record = self.stores.nis.get(domain)
        if record is None or record["expires"] <= now:
            return None
        return record

    def record_of(self, domain: str, now: float) -> dict | None:
        """Our own record, or an unexpired one from the map."""
        return self.record if domain == self.node.domain else self.known_record(domain, now)

    def learn_record(self, record: dict, now: float) -> bool:
        """Keep a verified record if it is newer than ours for that domain (5.3);
        then the peer set learns its address and waiting mail its key."""
        domain = record["domain"]
        if domain == self.node.domain or not record_supersedes(record, self.stores.nis.get(domain)):
            return False
        self.stores.nis[domain] = record
        self.expiry[domain] = record["expires"]
        if len(self.expiry) > MAX_NIS_RECORDS:
            # The soonest to expire goes, unless we need it: a peer's, or that of
            # a node we hold something for or wait to write to (5.3).
            keep = {domain, *self.node.links.open, *self.node.delivery.domains_needed()}
            victims = [d for d in self.expiry if d not in keep]
            if victims:
                victim = min(victims, key=self.expiry.get)
                del self.expiry[victim], self.stores.nis[victim]
        if record["host"] is not None:
            self.node.peerset.record_learned(record)
        self.node.outbox.record_learned(domain, now)
        return True

    def sweep(self, now: float) -> None:
        """Records past their expiry leave the map (7.7)."""
        for domain in [d for d, expires in self.expiry.items() if expires <= now]:
            del self.expiry[domain], self.stores.nis[domain]

    # -- lookups (5.4) ------------------------------------------------------------

    def lookup(self, domain: str, now: float) -> dict | None:
        """A record from the NIS map, or None and a nis_query on its way."""
        try:
            check_domain(domain)
        except RemoteError as exc:
            raise local_error(exc)
        record = self.record_of(domain, now)
        if record is None:
            self.ask(domain, now)
        return record

    def ask(self, domain: str, now: float) -> None:
        """Ask every open peer for `domain`'s record (5.4).  A question already
        pending goes to the peers not asked yet; with no peer to ask, the
        lookup fails at once rather than after a timeout nobody can change."""
        query = next((q for q in self.queries.values() if q.domain == domain and q.origin is None), None)
        peers = self.node.links.open_peers(now)
        if query is None and not peers:
            self.failed(domain, now)
            return
        if query is None:
            query = Query(self.node.rng(QUERY_ID).hex(), domain, None, now + NIS_TIMEOUT)
            self.queries[query.qid] = query
            self.seen_query(query.qid)
        for peer in peers:
            if peer.conn not in query.asked:
                self.node.links.send(peer, {"type": "nis_query", "qid": query.qid, "domain": domain,
                                            "hops": NIS_HOPS})
                query.asked.add(peer.conn)

    def failed(self, domain: str, now: float) -> None:
        self.node.outbox.lookup_failed(domain, now)
        self.node.event("nis_result", domain=domain, record=None)

    def seen_query(self, qid: str) -> bool:
        if qid in self.seen_queries:
            return True
        self.seen_queries[qid] = None
        if len(self.seen_queries) > SEEN_QUERIES:
            self.seen_queries.popitem(last=False)
        return False

    def share_full(self, peer: Peer) -> bool:
        """Whether the peer's address already has MAX_QUERIES_PER_PEER questions
        forwarded and unanswered (5.4): counted by address subject, so that
        sixteen connections from one address share one share."""
        peers = self.node.links.peers
        held = sum(1 for q in self.queries.values() if not q.answered and q.origin in peers
                   and peers[q.origin].address_subject == peer.address_subject)
        return held >= MAX_QUERIES_PER_PEER

    def handle_nis_query(self, peer: Peer, frame: dict, now: float) -> None:
        """Answer from the map, or forward with one hop less and remember the way back."""
        if self.seen_query(frame["qid"]):
            return                              # flooding brings duplicates; not a fault
        domain = frame["domain"]
        record = self.record_of(domain, now)
        if record is not None:
            self.node.links.send(peer, {"type": "nis_answer", "qid": frame["qid"], "record": record})
            return
        if frame["hops"] == 0 or len(self.queries) >= MAX_QUERIES or self.share_full(peer):
            return                              # not forwarded: the asker's timeout tells it
        query = Query(frame["qid"], domain, peer.conn, now + NIS_TIMEOUT)
        forward = {"type": "nis_query", "qid": frame["qid"], "domain": domain, "hops": frame["hops"] - 1}
        for other in self.node.links.open_peers(now, exclude=peer):
            self.node.links.send(other, forward)
            query.asked.add(other.conn)
        if query.asked:
            self.queries[query.qid] = query

    def handle_nis_answer(self, peer: Peer, frame: dict, now: float) -> None:
        query = self.queries.get(frame["qid"])
        if query is None or peer.conn not in query.asked:
            return                              # late or unasked: cheap to drop, not a fault
        query.asked.discard(peer.conn)          # one answer per peer asked
        try:
            record = verify_nis_answer(frame, query.domain, int(now))
        except RemoteError as exc:
            self.node.links.misbehaved(peer, forgery_event(exc), exc.message, now)
            return
        self.node.links.reward(peer, "nis_answer", now)
        self.learn_record(record, now)
        if query.answered:
            return
        query.answered = True
        origin = self.node.links.peers.get(query.origin) if query.origin is not None else None
        if query.origin is None:
            self.node.event("nis_result", domain=query.domain, record=record)
        elif origin is not None and origin.state == "open":
            self.node.links.send(origin, {"type": "nis_answer", "qid": query.qid, "record": record})

    def tick(self, now: float) -> None:
        """Questions past their deadline are dropped; ours that found nothing fail."""
        for qid, query in list(self.queries.items()):
            if query.deadline <= now:
                del self.queries[qid]
                if query.origin is None and not query.answered:
                    self.failed(query.domain, now)

    def connection_gone(self, conn: int) -> None:
        for query in self.queries.values():
            query.asked.discard(conn)


@dataclasses.dataclass
class DialState:
    """The reconnect backoff of one dial target (5.5).  For a known peer it is
    also kept, as `fails` and `next`, in its durable entry."""

    failures: int = 0
    next: float = 0.0


class PeerSet:
    """Who this node dials (PROTOCOL.md 5.5): bootstrap and known peers, the
    outbound target, direct dials for own objects, reconnect backoff, and
    peer exchange (getpeers / peers)."""

    def __init__(self, node: "Node"):
        self.node = node
        self.stores = node.stores
        self.dialing: dict[str, float] = {}     # dial target -> since
        self.backoff: dict[str, DialState] = {}

    # -- the backoff record of a target ---------------------------------------------

    def state(self, target: str) -> DialState:
        """A target's backoff; a known peer's starts from its durable entry."""
        if target in self.backoff:
            return self.backoff[target]
        known = self.stores.peers.get(target, {})
        return DialState(known.get("fails", 0), known.get("next", 0))

    def may_dial(self, target: str, now: float) -> bool:
        """Not waiting out a reconnect backoff (the one rule, for every dial)."""
        return self.state(target).next <= now

    def dial_in_flight(self, target: str) -> bool:
        return target in self.dialing

    def connecting(self, target: str) -> bool:
        """A dial of ours to this target is in flight, or a connection to it is
        proven: a node never dials a domain twice at once (5.5).  An inbound
        hello alone proves nothing (anyone can replay a record), so it counts
        only once its auth has verified."""
        return target in self.dialing or any(
            (p.outbound and target in (p.target, p.expect)) or (p.verified and p.domain == target)
            for p in self.node.links.peers.values())

    def outbound_count(self) -> int:
        return sum(p.outbound for p in self.node.links.peers.values()) + len(self.dialing)

    def dial(self, host: str, port: int, domain: str | None, now: float) -> None:
        action = Dial(host, port, domain)
        self.dialing[action.target] = now
        self.node.act(action)

    # -- outcomes of dials ----------------------------------------------------------

    def dial_answered(self, dial: Dial) -> None:
        """The TCP connection of a dial is up; the handshake decides the rest."""
        self.dialing.pop(dial.target, None)

    def dial_worked(self, peer: Peer, now: float) -> None:
        """An outbound handshake completed: the address is this domain's (5.5)."""
        self.backoff.pop(peer.target, None)
        self.backoff.pop(peer.domain, None)
        host, port = peer.address
        self.remember(peer.domain, {"host": host, "port": port, "fails": 0, "next": 0, "seen": int(now)})

    def dial_failed(self, dial: Dial | None, now: float) -> None:
        """The shell could not connect, or the connection ended before its
        handshake (5.5): back off, and relay what waited for a direct dial."""
        if dial is not None:
            self.failed(dial.target, now)

    def failed(self, target: str, now: float) -> None:
        if target in self.node.links.open:
            return
        self.dialing.pop(target, None)
        state = self.backoff[target] = self.state(target)
        state.next = now + backoff(state.failures, DIAL_RETRY_FIRST, DIAL_RETRY_MAX)
        state.failures += 1
        known = self.stores.peers.get(target)
        if known is not None:
            known.update(fails=state.failures, next=int(state.next))
            self.stores.peers[target] = known
        self.node.delivery.dial_failed(target, now)

    def expire_dials(self, now: float) -> None:
        """A dial the shell never reported back on is given up (5.5)."""
        for target, since in list(self.dialing.items()):
            if now - since > DIAL_TIMEOUT + HANDSHAKE_TIMEOUT:
                self.failed(target, now)

    # -- whom to dial ---------------------------------------------------------------

    def dial_domain(self, domain: str, now: float) -> bool:
        """Dial `domain` from its record, if that is possible now (5.5: direct
        connections).  True while a dial is in flight or a connection is being
        made; False if there is no host, or it may not be dialled now."""
        if self.connecting(domain):
            return True
        record = self.node.names.known_record(domain, now)
        if (not self.may_dial(domain, now) or record is None or record["host"] is None
                or self.node.reputation.banned(domain_subject(domain), int(now))
                or self.outbound_count() >= self.node.config.max_outbound):
            return False
        self.dial(record["host"], record["port"], domain, now)
        return True

    def maintain(self, now: float) -> None:
        """Keep `target_outbound` outbound connections (5.5): bootstrap peers
        first, then known peers, most recently seen first."""
        config, links = self.node.config, self.node.links
        outbound = self.outbound_count()
        known = sorted(self.stores.peers.items(), key=lambda kv: -kv[1].get("seen", 0))
        candidates = [(k["host"], k["port"], domain) for domain, k in known]
        addresses = {(host, port) for host, port, _ in candidates}
        candidates[:0] = [(host, port, None) for host, port in config.bootstrap
                          if (host, port) not in addresses]
        connected = {(p.address or (None, None)) for p in links.peers.values()}
        for host, port, domain in candidates:
            if outbound >= config.target_outbound:
                break
            target = Dial(host, port, domain).target
            if (domain in links.open or domain == self.node.domain or self.connecting(target)
                    or (host, port) in connected or not self.may_dial(target, now)
                    or (domain and self.node.reputation.banned(domain_subject(domain), int(now)))):
                continue
            self.dial(host, port, domain, now)
            outbound += 1

    # -- known peers ------------------------------------------------------------------

    def remember(self, domain: str, entry: dict) -> None:
        """Keep an address for reconnecting, within MAX_KNOWN_PEERS: the entry
        with most failures, then least recently seen, makes room (5.5)."""
        self.stores.peers[domain] = entry
        if len(self.stores.peers) > MAX_KNOWN_PEERS:
            open_ = self.node.links.open
            candidates = [(d, e) for d, e in self.stores.peers.items() if d not in open_ and d != domain]
            if candidates:
                worst = max(candidates, key=lambda kv: (kv[1].get("fails", 0), -kv[1].get("seen", 0)))
                del self.stores.peers[worst[0]]

    def record_learned(self, record: dict) -> None:
        """A record with a host: its address becomes (or stays) a known peer (5.3)."""
        known = self.stores.peers.get(record["domain"], {"fails": 0, "next": 0, "seen": 0})
        self.remember(record["domain"], {**known, "host": record["host"], "port": record["port"]})

    def dialled_wrong(self, dial: Dial, now: float) -> None:
        """What we dialled on a record's word did not speak Secral, or was not
        the node the record names (9.1).  The address is not to blame -- it
        never came to us -- nor is whoever passed the record on, since relays
        pass on what others signed: the record's address is forgotten, and its
        owner, whose signature made the claim, pays for it."""
        known = self.stores.peers.get(dial.domain) if dial.domain else None
        if known is None or (known["host"], known["port"]) != (dial.host, dial.port):
            return                              # a bootstrap address, or already replaced
        del self.stores.peers[dial.domain]
        self.node.links.blame(dial.domain, "bad_record", f"its record's address {dial.host}:{dial.port} "
                              "does not answer as this node", now)

    def sweep(self, now: float) -> None:
        """Forget addresses that stopped working (5.5, 7.7)."""
        for domain, known in list(self.stores.peers.items()):
            if known.get("fails", 0) >= KNOWN_PEER_FAILURES and known.get("seen", 0) < now - MAX_TTL:
                del self.stores.peers[domain]

    # -- peer exchange (5.5) --------------------------------------------------------

    def handle_getpeers(self, peer: Peer, frame: dict, now: float) -> None:
        """Records of reachable peers, ours first."""
        names, links = self.node.names, self.node.links
        records = [names.record] if names.record["host"] else []
        current = (names.known_record(p.domain, now) for p in links.open.values() if p is not peer)
        others = [r for r in current if r is not None and r["host"] is not None]
        random.Random(self.node.rng(8)).shuffle(others)
        records += others[:MAX_PEER_RECORDS - len(records)]
        links.send(peer, {"type": "peers", "records": records})

    def handle_peers(self, peer: Peer, frame: dict, now: float) -> None:
        """Records from a peer: an answer to getpeers or an announcement.  A record
        newer than the one we had is passed on, so refreshes spread (5.3)."""
        if len(frame["records"]) > MAX_PEER_RECORDS:
            raise RemoteError("too_large", f"more than {MAX_PEER_RECORDS} records")
        fresher = []
        for record in frame["records"]:
            domain = record.get("domain") if isinstance(record, dict) else None
            known = self.stores.nis.get(domain) if isinstance(domain, str) else None
            if known is not None and type(record.get("seq")) is int and record["seq"] <= known["seq"]:
                continue                        # nothing new: not worth an RSA verification
            try:
                verify_record(record, int(now), "peers.record")
            except RemoteError as exc:
                self.node.links.misbehaved(peer, forgery_event(exc), exc.message, now)
                continue
            known = record["domain"] in self.stores.nis
            if self.node.names.learn_record(record, now) and known:
                fresher.append(record)
        if fresher:
            for other in self.node.links.open_peers(now, exclude=peer):
                self.node.links.send(other, {"type": "peers", "records": fresher})


# -- The frame table (PROTOCOL.md 8.2) ------------------------------------------
# Each frame type: the fields it must carry (checked by verify_frame), the
# connection states that accept it (anything else is not_ready), and the
# engine method that handles it.

@dataclasses.dataclass(frozen=True)
class FrameType:
    fields: dict[str, Callable[[Any, str], Any]]
    states: tuple[str, ...]
    engine: type                        # the engine class that handles it ...
    handler: Callable[..., None]        # ... and its method: handler(engine, peer, frame, now)


OPEN = ("open",)
FRAME_TYPES: dict[str, FrameType] = {
    "hello":      FrameType({"v": check_int, "record": check_dict, "nonce": check_str,
                             "agent": check_short_text(MAX_AGENT)},
                            ("hello",), Links, Links.handle_hello),
    "auth":       FrameType({"sig": check_str},
                            ("auth",), Links, Links.handle_auth),
    "mail":       FrameType({"hops": check_hops(MAX_HOPS), "mail": check_dict},
                            OPEN, Delivery, Delivery.handle_mail),
    "ack":        FrameType({"hops": check_hops(MAX_HOPS), "ack": check_dict},
                            OPEN, Delivery, Delivery.handle_ack),
    "nis_query":  FrameType({"qid": check_hex_id, "domain": check_domain, "hops": check_hops(NIS_HOPS)},
                            OPEN, Names, Names.handle_nis_query),
    "nis_answer": FrameType({"qid": check_hex_id, "record": check_dict},
                            OPEN, Names, Names.handle_nis_answer),
    "getpeers":   FrameType({}, OPEN, PeerSet, PeerSet.handle_getpeers),
    "peers":      FrameType({"records": check_list}, OPEN, PeerSet, PeerSet.handle_peers),
    "ping":       FrameType({}, OPEN, Links, Links.handle_ping),
    "pong":       FrameType({}, OPEN, Links, Links.handle_pong),
    "error":      FrameType({"code": check_short_text(MAX_ERROR_CODE),
                             "message": check_short_text(MAX_ERROR_MESSAGE)},
                            ("hello", "auth", "open"), Links, Links.handle_error),
}


def verify_frame(frame: dict) -> dict:
    """Check a decoded frame's type and fields against FRAME_TYPES (8.2: types
    and ranges only; the objects inside are their handlers' to check)."""
    spec = FRAME_TYPES.get(frame["type"])
    if spec is None:
        raise RemoteError("unknown_type", f"unknown frame type {frame['type'][:40]!r}")
    return check_fields(frame, spec.fields, frame["type"])


class Node:
    """A Secral node's protocol engine (PROTOCOL.md sections 5, 7, 8 and 9).

    Inputs -- each takes `now` (Unix seconds, a float) and returns the list of
    actions (Send, Close, Dial, Event) for the shell to carry out:
        connection_made(conn, ip, now, dialled, certificate)
                                                   a TLS connection is up (the
                                                   listener's certificate if we dialled)
        tls_failed(ip, now)                        an inbound TLS handshake failed
        line_received(conn, line, now, arrived)    one line from a peer
        line_too_long(conn, now)                   a line past MAX_LINE
        connection_lost(conn, now)                 the connection is gone
        dial_failed(dial, now)                     a Dial could not connect
        dial_not_tls(dial, now)                    a Dial's host did not speak TLS 1.3
        tick(now)                                  time passed (twice a second)
        submit(...), cancel(...), lookup(...)      a user's request (these also
                                                   return a value: id, entry, record)
        learn_record(record, now), refresh_record(now), transmit(conn, frame)
        close_all(now)                             the node is stopping
    Questions, answered without actions: status(now), admits(ip, now),
    open_peer_list(now), score(domain, now).

    Events: peer_open, peer_closed, mail_received, mail_rejected, mail_status
    (an outbox status changed), nis_result, banned, refused (a peer refused an
    object), misbehaved (a peer was scored), peer_error (a peer's error frame).

    Engines, and the calls between them -- a porter's checklist:
        Links (8, 9)      connection_made -> PeerSet.dial_answered
                          open_link -> PeerSet.dial_worked, Names.learn_record,
                                       Delivery.peer_opened (hands over what it holds),
                                       Outbox.peer_opened (asks Names for waiting keys)
                          drop -> PeerSet.dial_failed (a dial that never opened),
                                  Delivery.connection_gone, Names.connection_gone
                          handle_error with ref -> Delivery.refused
                          dispatch -> the handler in FRAME_TYPES
        Delivery (7)      route -> PeerSet.dial_domain (own objects only)
                          offer, sweep -> Outbox.set_status (sent, expired)
                          handle_ack -> Outbox.ack_arrived (our own mail's end)
        Outbox (7.5)      submit, seal_waiting, sweep -> Names.ask
                          a sealed mail -> Delivery.add, Delivery.route
                          to ourselves -> Delivery.deliver_local
        Names (5.3, 5.4)  learn_record -> PeerSet.record_learned (the address),
                                          Outbox.record_learned (seals waiting mail)
                          a lookup failed -> Outbox.lookup_failed (the entry notes it)
                          the map's bound asks Delivery.domains_needed
        PeerSet (5.5)     a dial failed -> Delivery.dial_failed (relays what waited)
                          peer exchange -> Names.learn_record
    Each engine sends through Links.send and scores through Links.misbehaved
    and Links.reward; all of them share this facade's actions, stores,
    reputation table, config and rng.
    """

    def __init__(self, identity: Identity, stores: "Stores", config: Config, now: float,
                 rng: Rng = os.urandom, mail_keys: "MailKeys | None" = None):
        self.identity = identity
        self.domain = identity.domain
        self.stores = stores
        self.mail_keys = mail_keys if mail_keys is not None else MailKeys()
        self.config = config
        self.rng = rng
        self.reputation = Reputation(stores.reputation)
        self.actions: list[Action] = []
        self.links = Links(self)
        self.names = Names(self)
        self.peerset = PeerSet(self)
        self.delivery = Delivery(self)
        self.outbox = Outbox(self)
        engines = {type(e): e for e in (self.links, self.names, self.peerset, self.delivery)}
        self.handlers = {name: functools.partial(spec.handler, engines[spec.engine])
                         for name, spec in FRAME_TYPES.items()}
        self.next_sweep = now
        self.next_maintain = now
        self.next_flush = now + REPUTATION_FLUSH
        if DEFAULT_USER.lower() not in stores.users:
            stores.users[DEFAULT_USER.lower()] = {"name": DEFAULT_USER, "created": int(now)}
        self.delivery.load(now)
        self.outbox.load(now)
        self.retire_mail_keys(now)
        if not self.names.refresh_record(now) and self.domain not in stores.nis:
            raise LocalError("not_found", f"no mail key for epoch {epoch_of(now)}: a node needs one to publish its record")

    # -- shared by the engines ---------------------------------------------------

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def event(self, name: str, **data: Any) -> None:
        self.actions.append(Event(name, data))

    def take(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions


    def score(self, domain: str, now: float) -> int:
        return self.reputation.score(domain_subject(domain), int(now))

    # -- inputs --------------------------------------------------------------------

    def connection_made(self, conn: int, ip: str, now: float, dialled: Dial | None = None,
                        certificate: bytes | None = None) -> list[Action]:
        self.links.connection_made(conn, ip, now, dialled, certificate)
        return self.take()

    def tls_failed(self, ip: str, now: float) -> list[Action]:
        """A connection from `ip` that did not complete a TLS 1.3 handshake (8.1):
        no domain was proven, so its address pays (9.1)."""
        subject = ip_subject(ip)
        if self.reputation.change(subject, REPUTATION_EVENTS["bad_tls"][0], int(now)) <= SCORE_MIN:
            self.reputation.ban(subject, int(now))
            self.links.close_unproven(subject, now)
        self.event("misbehaved", domain=None, ip=ip, event="bad_tls", message="no TLS 1.3 handshake",
                   score=self.reputation.score(subject, int(now)))
        return self.take()

    def line_received(self, conn: int, line: bytes, now: float, arrived: float | None = None) -> list[Action]:
        """`arrived` is when the line came off the socket: the rate limit judges
        the peer by its sending, not by how late we got round to reading."""
        self.links.line_received(conn, line, now, now if arrived is None else arrived)
        return self.take()

    def line_too_long(self, conn: int, now: float) -> list[Action]:
        self.links.line_too_long(conn, now)
        return self.take()

    def connection_lost(self, conn: int, now: float) -> list[Action]:
        peer = self.links.peers.get(conn)
        if peer is not None:
            self.links.drop(peer, "closed", now)
        return self.take()

    def dial_failed(self, dial: Dial, now: float) -> list[Action]:
        """The shell could not connect to a Dial's host."""
        self.peerset.dial_failed(dial, now)
        return self.take()

    def dial_not_tls(self, dial: Dial, now: float) -> list[Action]:
        """A Dial's host took the TCP connection but not a TLS 1.3 handshake:
        a failed dial and, if a record named that address, its owner's lie (9.1)."""
        self.peerset.dial_failed(dial, now)
        self.peerset.dialled_wrong(dial, now)
        return self.take()

    def tick(self, now: float) -> list[Action]:
        """Timeouts, keepalives, retries, expiry, and the outbound peer set."""
        self.retire_mail_keys(now)
        self.peerset.expire_dials(now)
        self.links.tick(now)
        self.names.tick(now)
        self.delivery.retry(now)
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_SECONDS
            self.sweep(now)
        if now >= self.next_maintain:
            self.next_maintain = now + MAINTAIN_SECONDS
            self.names.refresh_record(now)
            self.peerset.maintain(now)
        if now >= self.next_flush:
            self.next_flush = now + REPUTATION_FLUSH
            self.reputation.flush(int(now))
            self.delivery.save_seen()
        return self.take()

    def retire_mail_keys(self, now: float) -> None:
        """Delete the mail keys whose time has come (6.3), at that instant."""
        for epoch in self.mail_keys.retire_due(now):
            RSA_MEMO.clear()                    # (it holds unwrapped AES keys of recent mail)
            self.event("mail_key_retired", epoch=epoch)

    def sweep(self, now: float) -> None:
        """Drop what has expired (7.7)."""
        self.delivery.sweep(now)
        self.outbox.sweep(now)
        self.names.sweep(now)
        self.peerset.sweep(now)

    def submit(self, user: str, to: str, subject: str, body: str, now: float, ttl: int = MAX_TTL,
               parts: Sequence[dict] = (), in_reply_to: str | None = None,
               sealed: dict | None = None, local: dict | None = None) -> tuple[str, list[Action]]:
        return self.outbox.submit(user, to, subject, body, now, ttl, parts, in_reply_to, sealed, local), self.take()

    def recipient_record(self, to: str, now: float) -> dict | None:
        """The record a mail to `to` would be sealed with now, if it is known."""
        domain = parse_address(to).domain
        return self.names.record if domain == self.domain else self.names.known_record(domain, now)

    def sender_address(self, user: str) -> Address | None:
        """`user` as it was created, at our domain (6.1), if it is a local user."""
        entry = self.stores.users.get(user.lower()) if isinstance(user, str) else None
        return Address(entry["name"], self.domain) if entry else None

    def cancel(self, mail_id: str, now: float) -> tuple[dict, list[Action]]:
        return self.outbox.cancel(mail_id, now), self.take()

    def lookup(self, domain: str, now: float) -> tuple[dict | None, list[Action]]:
        """A record from the NIS map, or None and a nis_query on its way (5.4)."""
        return self.names.lookup(domain, now), self.take()

    def learn_record(self, record: dict, now: float) -> list[Action]:
        """Learn a record verified elsewhere (tools and tests)."""
        self.names.learn_record(record, now)
        return self.take()

    def refresh_record(self, now: float) -> list[Action]:
        self.names.refresh_record(now)
        return self.take()

    def transmit(self, conn: int, frame: dict) -> list[Action]:
        """Send any frame on a connection, as if our own (for tools and tests)."""
        peer = self.links.peers.get(conn)
        if peer is not None:
            self.links.send(peer, frame)
        return self.take()

    def close_all(self, now: float) -> list[Action]:
        """The node is stopping: say so to every peer and save the scores."""
        for peer in list(self.links.peers.values()):
            self.links.close(peer, "shutdown", "the node is stopping", now)
        self.reputation.flush(int(now))
        self.delivery.save_seen()
        return self.take()

    # -- questions -------------------------------------------------------------------
    # Views of the engines' state for tools and tests: read them, never write.

    @property
    def record(self) -> dict:
        return self.names.record

    def known_record(self, domain: str, now: float) -> dict | None:
        return self.names.known_record(domain, now)

    @property
    def peers(self) -> dict[int, Peer]:
        return self.links.peers

    @property
    def open(self) -> dict[str, Peer]:
        return self.links.open

    @property
    def items(self) -> dict[str, Item]:
        return self.delivery.items

    @property
    def seen(self) -> dict[str, int]:
        return self.delivery.seen

    @property
    def quota(self) -> RelayQuota:
        return self.delivery.quota

    @property
    def dialing(self) -> dict[str, float]:
        return self.peerset.dialing

    @property
    def dial_backoff(self) -> dict[str, DialState]:
        """Dial targets with failures behind them (5.5)."""
        return self.peerset.backoff

    def backing_off(self, target: str, now: float) -> bool:
        return not self.peerset.may_dial(target, now)

    def admits(self, ip: str, now: float) -> bool:
        """Whether a connection from `ip` is worth a thread: not banned (9.2)."""
        return not self.reputation.banned(ip_subject(ip), int(now))

    def status(self, now: float) -> dict:
        """What this node holds and whom it talks to (the control port's status)."""
        relayed = [i for i in self.items.values() if i.store == "relay"]
        outbox = collections.Counter(e["status"] for e in self.stores.outbox.values())
        return {
            "domain": self.domain, "peers": len(self.open), "connections": len(self.peers),
            "inbox": len(self.stores.inbox), "outbox": dict(sorted(outbox.items())),
            "relay": {"mail": sum(i.kind == "mail" for i in relayed),
                      "ack": sum(i.kind == "ack" for i in relayed),
                      "bytes": self.quota.bytes, "keys": sorted(i.key for i in relayed)},
            "seen": len(self.seen), "nis_records": len(self.stores.nis),
            "known_peers": len(self.stores.peers),
            "banned": len(self.reputation.bans(int(now))), "time": int(now),
            "mail_keys": {"held": sorted(self.mail_keys.keys), "retired": len(self.mail_keys.retired),
                          "listed": [k["epoch"] for k in self.record["mail_keys"]],
                          "record_expires": self.record["expires"]}}

    def open_peer_list(self, now: float) -> list[dict]:
        return [{"domain": p.domain, "host": p.record["host"], "port": p.record["port"],
                 "ip": p.ip, "direction": "outbound" if p.outbound else "inbound",
                 "score": self.score(p.domain, now), "since": int(p.opened)}
                for p in sorted(self.open.values(), key=lambda p: p.domain)]


# =============================================================================
# Stores
# =============================================================================
# Appendix B.  Each store is a shelve.Shelf over a one-table SQLite database:
# WAL journal, one transaction per write, synchronous=FULL where losing a
# write would lose mail.  Not dbm.dumb (neither crash- nor thread-safe) and
# not Python 3.13's dbm.sqlite3 (its connection refuses other threads).
# Values are JSON, not pickle, so that a port can read the same files and a
# copied data directory cannot run code.

class SqliteMapping(MutableMapping):
    """bytes -> bytes in one SQLite table; each write commits on its own."""

    def __init__(self, path: str, synchronous: str = "FULL"):
        self.path = path
        self.lock = threading.RLock()
        self.depth = 0                          # > 0 inside batch(): writes wait for its COMMIT
        self.begun = False                      # ... and the first of them began the transaction
        # isolation_level=None: autocommit, so every statement is its own
        # transaction and is durable when it returns.
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        if synchronous == "FULL":               # mail and passwords: a deleted row is zeroed in the
            self.db.execute("PRAGMA secure_delete=ON")   # file (the WAL keeps it to the next checkpoint)
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
        self.reader: sqlite3.Connection | None = None     # for holds_committed, opened on first use
        self.reader_lock = threading.Lock()
        self.closed = False

    def __getitem__(self, key: bytes) -> bytes:
        with self.lock:
            row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor:
        """A write; inside batch() the first one begins the transaction, so a
        batch that writes nothing costs no BEGIN and no COMMIT."""
        if self.depth and not self.begun:
            self.db.execute("BEGIN IMMEDIATE")
            self.begun = True
        return self.db.execute(sql, args)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        with self.lock:
            self._write("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def __delitem__(self, key: bytes) -> None:
        with self.lock:
            if self._write("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
                raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None

    def holds_committed(self, key: bytes) -> bool:
        """Whether the last commit holds `key`, asked on a connection of its
        own: a WAL reader never waits for the transaction in progress, so work
        ahead (NodeShell) does not wait for the core's group commit."""
        with self.reader_lock:
            if self.closed:
                return False                    # stop() closed the store: the core will know
            try:
                if self.reader is None:
                    self.reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                return self.reader.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None
            except sqlite3.Error:               # (the core finds out what is wrong)
                return False

    def __iter__(self) -> Iterator[bytes]:
        with self.lock:
            keys = [row[0] for row in self.db.execute("SELECT key FROM kv ORDER BY key")]
        return iter(keys)

    def rows(self, page: int = 1000) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), a page at a time in key order: one query per
        page, not one per key, and never the whole table in memory."""
        after = b""
        while True:
            with self.lock:
                rows = self.db.execute("SELECT key, value FROM kv WHERE key > ? ORDER BY key LIMIT ?",
                                       (after, page)).fetchall()
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM kv").fetchone()[0]

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes into one transaction: all of them are durable, or none."""
        with self.lock:
            self.depth += 1
            try:
                yield
            except BaseException:
                self.depth -= 1
                if self.depth == 0 and self.begun:
                    self.begun = False
                    self.db.execute("ROLLBACK")
                raise
            self.depth -= 1
            if self.depth == 0 and self.begun:
                self.begun = False
                self.db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.db.close()
        with self.reader_lock:
            self.closed = True
            if self.reader is not None:
                self.reader.close()


class JsonShelf(shelve.Shelf):
    """A shelf whose values are JSON documents instead of pickles."""

    def batch(self) -> contextlib.AbstractContextManager:
        return self.dict.batch()

    def holds_committed(self, key: str) -> bool:
        return self.dict.holds_committed(key.encode(self.keyencoding))

    def __getitem__(self, key: str) -> Any:
        return json.loads(self.dict[key.encode(self.keyencoding)])

    def __setitem__(self, key: str, value: Any) -> None:
        self.dict[key.encode(self.keyencoding)] = json.dumps(value, sort_keys=True, allow_nan=False).encode()

    def items(self) -> Iterator[tuple[str, Any]]:       # (what a start reads, 100,000 items at a time)
        return ((key.decode(self.keyencoding), json.loads(value)) for key, value in self.dict.rows())


class MemoryStore(dict):
    """A dict with a shelf's copy semantics (values go through JSON), for tests
    and simulations: code that mutates a fetched value without storing it back
    is as wrong here as it would be on disk."""

    def __getitem__(self, key: str) -> Any:
        return json.loads(super().__getitem__(key))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, json.dumps(value, sort_keys=True, allow_nan=False))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def holds_committed(self, key: str) -> bool:     # (in memory every write is committed)
        return key in self

    def items(self):
        return [(key, self[key]) for key in self.keys()]

    def values(self):
        return [self[key] for key in self.keys()]

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)


class Stores:
    """The node's durable state, one store each (DATA_DIR/<name>.db)."""

    DURABILITY = {
        # store        synchronous  what it holds
        "inbox":       "FULL",      # delivered mail, by mail_key (acked: must survive)
        "outbox":      "FULL",      # our own mail and its status, by mail id
        "relay":       "FULL",      # mail and acks held for others, by key
        "users":       "FULL",      # local users, by lowercase name
        "contacts":    "FULL",      # the address book, by lowercase name
        "passwords":   "FULL",      # salted scrypt hashes for SMTP/POP3/IMAP, by user
        "folders":     "FULL",      # IMAP: each folder's UIDVALIDITY and next UID, appended messages
        "seen":        "NORMAL",    # keys already handled -> expiry (a cache, saved in batches)
        "nis":         "NORMAL",    # the NIS map, by domain (re-learnable)
        "peers":       "NORMAL",    # addresses that worked, by domain
        "reputation":  "NORMAL",    # scores and bans, by subject
    }

    def __init__(self, **stores: MutableMapping):
        for name in self.DURABILITY:
            setattr(self, name, stores[name])
        self._closers: list[Callable[[], None]] = []

    def batch(self, name: str) -> contextlib.AbstractContextManager:
        """One transaction for several writes to one store (a no-op in memory)."""
        return self.batch_of(getattr(self, name))

    @staticmethod
    def batch_of(store: MutableMapping) -> contextlib.AbstractContextManager:
        return store.batch() if hasattr(store, "batch") else contextlib.nullcontext()

    # The order group() commits in: what a crash between two commits may
    # leave half done must never be an ack or a forward without its mail
    # (7.4): the inbox and outbox first, the relay store (which holds our
    # own acks) after them, the caches last.
    GROUP_ORDER = ("inbox", "outbox", "folders", "users", "contacts", "passwords", "relay", "seen", "nis",
                   "peers", "reputation")

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """One transaction per store for everything done inside (Appendix B):
        the frames that arrived together cost one commit, not one each.
        Nothing inside may be sent before the group has committed."""
        with contextlib.ExitStack() as stack:
            for name in reversed(self.GROUP_ORDER):   # exits run in reverse: inbox commits first
                stack.enter_context(self.batch(name))
            yield

    @classmethod
    def memory(cls) -> "Stores":
        return cls(**{name: MemoryStore() for name in cls.DURABILITY})

    @classmethod
    def open(cls, data_dir: str) -> "Stores":
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        shelves = {}
        for name, synchronous in cls.DURABILITY.items():
            mapping = SqliteMapping(os.path.join(data_dir, f"{name}.db"), synchronous)
            shelves[name] = JsonShelf(mapping, writeback=False)
        stores = cls(**shelves)
        stores._closers = [shelf.close for shelf in shelves.values()]
        return stores

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []


MAIL_KEY_DIR = "mail-keys"      # in the data directory: <epoch>.pem per key, and "retired"


class MailKeys:
    """A node's mail keys (PROTOCOL.md 5.3, 6.3, 12.4): the private half of
    one RSA-3072 key per epoch, by epoch and by id, and the ids of the keys
    already deleted, so that a mail sealed to one is refused as retired_key
    rather than unknown_key.  The core asks and retires; the shell adds the
    keys it made ahead of time.

    On disk each key is its own file, mail-keys/<epoch>.pem (PEM PKCS#8,
    mode 0600, written like node.key), never a database row: deleting a key
    overwrites its file with zeros, syncs it, unlinks it and syncs the
    directory, which a SQLite page (with its WAL and free pages) cannot
    promise.  Its id goes to mail-keys/retired first, one line each.
    Thread-safe: the work-ahead pool opens mail ahead of the core."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.lock = threading.RLock()
        self.keys: dict[int, tuple[Any, str, str]] = {}    # epoch -> (private key, public, id)
        self.epoch_by_id: dict[str, int] = {}
        self.retired: set[str] = set()
        if directory is not None:
            self._load()

    def _load(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(self.directory, "retired"), encoding="ascii") as f:
                self.retired.update(line.split()[1] for line in f if len(line.split()) == 2)
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):           # a write a crash cut short: it may hold a key
                self._wipe(path)
            elif re.fullmatch(r"[0-9]+\.pem", name):
                try:
                    identity = load_identity(path, create=False)
                except LocalError:              # zeroed by a deletion a crash cut short
                    log.warning("mail key file %s cannot be read: wiped", name)
                    self._wipe(path)
                    continue
                if mail_key_id(identity.public_b64) in self.retired:
                    self._wipe(path)            # (its id was noted before the crash)
                else:
                    self._hold(int(name[:-4]), identity)
        self._sync_directory()

    def _hold(self, epoch: int, identity: Identity) -> str:
        key_id = mail_key_id(identity.public_b64)
        self.keys[epoch] = (identity.key, identity.public_b64, key_id)
        self.epoch_by_id[key_id] = epoch
        return key_id

    def add(self, epoch: int, identity: Identity) -> str:
        """Keep `identity`'s key as the mail key of `epoch`, on disk first.
        Returns its id.  A key already used, or deleted, is refused."""
        key_id = mail_key_id(identity.public_b64)
        with self.lock:
            if epoch in self.keys or key_id in self.epoch_by_id or key_id in self.retired:
                raise LocalError("exists", f"epoch {epoch} has a key, or key {key_id} was used")
            if self.directory is not None:
                save_identity(identity, os.path.join(self.directory, f"{epoch}.pem"))
                self._sync_directory()          # the file's name is durable before a record lists it
            return self._hold(epoch, identity)

    def public(self, epoch: int) -> str | None:
        """The public key held for `epoch`, if any."""
        with self.lock:
            held = self.keys.get(epoch)
        return held[1] if held else None

    def private_key(self, key_id: str) -> Any:
        """The private key a mail's key_id names (6.3), or why there is none."""
        with self.lock:
            if key_id in self.epoch_by_id:
                return self.keys[self.epoch_by_id[key_id]][0]
            if key_id in self.retired:
                raise RemoteError("retired_key", f"mail key {key_id} was deleted at its time (5.6)")
        raise RemoteError("unknown_key", f"this node holds no mail key {key_id}, and never deleted one")

    def listing(self, now: float) -> tuple[list[dict], int]:
        """The public keys of now's epoch and those after it without a gap
        (at most MAX_MAIL_KEYS), and the time up to which they cover."""
        with self.lock:
            listed, epoch = [], epoch_of(now)
            while epoch in self.keys and len(listed) < MAX_MAIL_KEYS:
                listed.append({"epoch": epoch, "key": self.keys[epoch][1]})
                epoch += 1
        return listed, epoch * MAIL_KEY_EPOCH

    def missing(self, now: float) -> list[int]:
        """The epochs from now's to MAIL_KEYS_AHEAD on that have no key yet."""
        with self.lock:
            return [e for e in range(epoch_of(now), epoch_of(now + MAIL_KEYS_AHEAD) + 1) if e not in self.keys]

    def retire_due(self, now: float) -> list[int]:
        """Delete every key whose deletion time has come (6.3).  Returns their epochs."""
        with self.lock:
            due = sorted(e for e in self.keys if mail_key_deletion(e) <= now)
            for epoch in due:
                _, _, key_id = self.keys.pop(epoch)
                del self.epoch_by_id[key_id]
                self.retired.add(key_id)
                if self.directory is not None:
                    self._erase(epoch, key_id)
            return due

    def _erase(self, epoch: int, key_id: str) -> None:
        with open(os.path.join(self.directory, "retired"), "a", encoding="ascii") as f:
            f.write(f"{epoch} {key_id}\n")
            f.flush()
            os.fsync(f.fileno())
        self._wipe(os.path.join(self.directory, f"{epoch}.pem"))
        self._sync_directory()

    @staticmethod
    def _wipe(path: str) -> None:
        """Overwrite a file with zeros, sync it, unlink it."""
        with contextlib.suppress(FileNotFoundError):
            with open(path, "r+b") as f:
                f.write(b"\0" * os.fstat(f.fileno()).st_size)
                f.flush()
                os.fsync(f.fileno())
            os.unlink(path)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# =============================================================================
# Network shell
# =============================================================================
# The only code that touches sockets, threads and the clock.  Each connection
# has a reader (the socketserver handler thread, or the dialling thread) and
# a writer thread with a bounded queue.  TLS is the stdlib's sans-IO kind, an
# ssl.SSLObject over two MemoryBIOs behind a small lock of its own, so that
# the two threads share a raw socket, never an SSLSocket.  Every core call
# happens under one lock; its actions are carried out right after.  Nothing
# here decides anything about the protocol.
#
# Two things keep that one lock from making the node use one core and one
# commit per frame (issue 17).  Work ahead: the RSA work a line will cost
# the core -- verifying mail, acks and records, unwrapping and acking mail
# for us -- runs first on a pool of one thread per core (pycryptodome lets
# go of the interpreter lock in its arithmetic), with the core's own pure
# functions; the core finds the results in RSA_MEMO and SIGNED_AHEAD, so it
# stays deterministic and decides exactly as before, and a port may leave
# all of this out.  (The other way, a core that hands out "verify this"
# actions and takes results as inputs, would give every engine a second
# state per frame for the same speed.)  A LinePipeline keeps each
# connection's lines in order while the reader goes on reading.  Group
# commit: the lines delivered together are handled in one transaction per
# store, and what they cause is sent after the commit (Appendix B).

MAX_QUEUE_BYTES = 16 << 20      # unsent bytes per connection; a peer that does not
                                # read that much is dropped rather than buffered
MAX_QUEUED_TOTAL = 64 << 20     # unsent bytes on all connections together: 96
                                # connections of 16 MiB each would be 1.5 GiB (9.3)
TICK_SECONDS = 0.5              # how often the core is told that time passed
SOCKET_TIMEOUT = IDLE_TIMEOUT + 30   # a safety net under the core's own timeouts
SERVE_POLL = 0.05               # seconds; how soon a listening server notices stop()
RECV_SIZE = 65_536              # bytes read from a socket at a time
AHEAD_BYTES = 262_144           # bytes of one connection's lines waiting for their work
                                # ahead or the core: about 50 mails, room for every core


def tls_dialler_context() -> ssl.SSLContext:
    """A dialler's TLS (PROTOCOL.md 8.1): 1.3 only, no tickets, and any
    certificate, because the core, not a CA, decides whose key it is.  (No
    SNI either: TlsLink passes no server name.)"""
    dialler = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    dialler.minimum_version = ssl.TLSVersion.TLSv1_3
    dialler.options |= ssl.OP_NO_TICKET
    dialler.check_hostname = False
    dialler.verify_mode = ssl.CERT_NONE
    return dialler


def tls_contexts(identity: Identity, data_dir: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(listener, dialler) contexts for links (8.1).  The listener's: TLS 1.3
    only, the node's certificate, no session tickets (so no resumption and
    no 0-RTT).  The stdlib loads a certificate only from a file: a private
    one (0600) lives long enough to be read."""
    listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    listener.minimum_version = ssl.TLSVersion.TLSv1_3
    listener.options |= ssl.OP_NO_TICKET
    listener.num_tickets = 0
    fd, path = tempfile.mkstemp(prefix=".tls-", dir=data_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_pem() + b"\n")
            f.write(ssl.DER_cert_to_PEM_cert(identity.certificate).encode("ascii"))
        listener.load_cert_chain(path)
    finally:
        os.unlink(path)
    return listener, tls_dialler_context()


class TlsLink:
    """One TLS session, sans-IO (8.1): bytes from the socket go in, lines'
    bytes come out, and what TLS wants sent waits in `outgoing` for the
    connection's one writer.  Touched only under its own lock, and never
    while blocked on the socket, so reader and writer cannot deadlock."""

    def __init__(self, context: ssl.SSLContext, server_side: bool):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=None)
        self.lock = threading.Lock()
        self.ended = False              # the peer said close_notify

    def handshake(self, sock: socket.socket, data: bytes = b"", timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Run the handshake on a blocking socket, before the writer starts,
        within `timeout` seconds in all: a peer that trickles bytes gets no
        more time than one that sends nothing (8.1)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                self.incoming.write(data)
                try:
                    self.tls.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                out = self.outgoing.read()
            if out:
                sock.sendall(out)
            if done:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no TLS handshake in time")
            sock.settimeout(remaining)
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("closed during the TLS handshake")

    def receive(self, data: bytes) -> bytes | None:
        """Decrypt what arrived; None once the peer has said close_notify and
        everything before it has been returned."""
        chunks = []
        with self.lock:
            if self.ended:
                return None
            self.incoming.write(data)
            while True:
                try:
                    chunk = self.tls.read(RECV_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    chunk = b""
                if not chunk:                   # close_notify: what came before it still counts
                    self.ended = True
                    break
                chunks.append(chunk)
        return b"".join(chunks) if chunks or not self.ended else None

    def encrypt(self, line: bytes) -> bytes:
        """The TLS records for `line`, after anything TLS had waiting."""
        with self.lock:
            if line:
                self.tls.write(line)
            return self.outgoing.read()

    def goodbye(self) -> bytes:
        """close_notify, so that the peer can tell an end from a cut (RFC 8446 6.1)."""
        with self.lock:
            with contextlib.suppress(ssl.SSLError):     # (it would wait for the peer's)
                self.tls.unwrap()
            return self.outgoing.read()

    @property
    def pending(self) -> bool:
        return self.outgoing.pending > 0

    def certificate(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)


class LineBuffer:
    """Splits a byte stream into lines of at most MAX_LINE bytes, the line
    feed included (3.1); never holds more than that plus one read."""

    def __init__(self) -> None:
        self.data = bytearray()

    def split(self, data: bytes) -> tuple[list[bytes], bool]:
        """The complete lines so far, and whether a line past the limit came
        after them (the stream cannot go on: 3.1)."""
        self.data += data
        lines, start = [], 0
        while (end := self.data.find(b"\n", start)) >= 0 and end + 1 - start <= MAX_LINE:
            lines.append(bytes(self.data[start:end + 1]))
            start = end + 1
        del self.data[:start]
        newline = self.data.find(b"\n")
        return lines, len(self.data) > MAX_LINE and not 0 <= newline < MAX_LINE


class SendBudget:
    """The unsent bytes of all connections together, at most MAX_QUEUED_TOTAL
    (9.3).  Taken when a line is queued, given back when it is written or
    thrown away; the shell decides whom to drop when a take fails."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()      # writers give back without the shell's lock

    def take(self, size: int) -> bool:
        with self.lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self.lock:
            self.used -= size


class Committed:
    """A store's keys as of its last commit (SqliteMapping.holds_committed):
    what work ahead may ask while the core's group commit is in progress."""

    def __init__(self, store: MutableMapping):
        self.store = store

    def __contains__(self, key: str) -> bool:
        return self.store.holds_committed(key)


def work_ahead(frame: dict, identity: Identity, mail_keys: MailKeys, stores: "Stores", now: float) -> None:
    """The RSA work a frame will cost the core, done now (see RSA_MEMO and
    SIGNED_AHEAD).  Any error is the core's to find and score; here it only
    stops the work.  For a new mail to us that means the verification, the
    unwrap and the ack's signature: the verdict is the core's own function,
    and a mail already answered is skipped, so a replay costs no signature.
    The stores are read as last committed, never waiting for the core."""
    kind = frame.get("type")
    if kind in ("mail", "ack"):
        obj = frame[kind]
        verify_signed(obj, parse_public_key(obj["from_key"]), kind)
        if kind == "mail" and obj.get("to") == identity.domain:
            if (stores.inbox.holds_committed(mail_key(obj["from"], obj["id"]))
                    or stores.relay.holds_committed(ack_key(obj["from"], obj["id"], identity.domain))):
                return
            status, reason, _ = recipient_verdict(identity, mail_keys, obj, Committed(stores.users))
            sign_ahead(identity.key, canonical_json(ack_statement(identity, obj, status, reason, int(now))))
    records: list = []
    if kind in ("hello", "nis_answer"):
        records = [frame.get("record")]
    elif kind == "peers" and isinstance(frame.get("records"), list):
        records = frame["records"][:MAX_PEER_RECORDS]
    for record in records:
        with contextlib.suppress(RemoteError, KeyError, TypeError, AttributeError):
            verify_signed(record, parse_public_key(record["key"]), "record")


class LinePipeline:
    """One connection's lines on their way to the core (issue 17).  The work
    ahead of each line runs on the shell's pool, on every core, while the
    reader goes on reading; the lines reach the core in the order they
    came, the lines of one read together and with every read ready behind
    them, in one call (one group commit), from whichever thread finds them
    ready.  At most AHEAD_BYTES (and one read) wait at once: a peer faster
    than that waits for the reader, and so for TCP."""

    def __init__(self, pool: concurrent.futures.Executor,
                 deliver: Callable[[list[tuple[bytes, float]]], None]):
        self.pool = pool
        self.deliver = deliver                  # NodeShell.call_lines for this connection
        self.reads: collections.deque[tuple[list[tuple[bytes, float]], list[concurrent.futures.Future]]] = \
            collections.deque()                 # each read's lines and the work ahead of them
        self.held = 0                           # bytes of the lines not yet delivered
        self.draining = False                   # one thread delivers at a time, in order
        self.cond = threading.Condition()

    def put(self, lines: list[bytes], arrived: float, work: Callable[[bytes], Callable[[], None] | None]) -> None:
        """Queue the lines of one read, the work ahead of each started
        (`work(line)`, None for none); wait for room first.  Only the reader
        calls this, so reads queue in the order they came."""
        with self.cond:
            while self.held >= AHEAD_BYTES:     # (held until delivered: the core may be slow)
                self.cond.wait()
        futures = [self.start(work(line)) for line in lines]    # (not under cond: a pool that shuts
        with self.cond:                                         # down runs callbacks, which take it)
            self.reads.append(([(line, arrived) for line in lines], futures))
            self.held += sum(map(len, lines))
        for future in futures:
            future.add_done_callback(lambda _: self.drain())

    def start(self, work: Callable[[], None] | None) -> concurrent.futures.Future:
        if work is not None:
            with contextlib.suppress(RuntimeError):     # the pool is shut down: the node stops
                return self.pool.submit(work)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(None)
        return done

    def drain(self) -> None:
        """Deliver the lines at the front whose work is done, until none is."""
        with self.cond:
            if self.draining:                   # that thread will look again after its batch
                return
            self.draining = True
        while True:
            with self.cond:
                batch = []
                while self.reads and all(future.done() for future in self.reads[0][1]):
                    batch += self.reads.popleft()[0]
                if not batch:
                    self.draining = False
                    self.cond.notify_all()
                    return
            try:
                self.deliver(batch)
            except Exception:
                # A bug, or a commit that failed: nothing these lines caused was
                # sent, so their senders try again; the lines behind still go.
                log.exception("%d lines not handled (nothing was sent for them)", len(batch))
            with self.cond:
                self.held -= sum(len(line) for line, _ in batch)
                self.cond.notify_all()

    def finish(self) -> None:
        """Return once every queued line has reached the core (the reader's
        last act before the core hears that the connection is gone)."""
        with self.cond:
            futures = [future for _, read in self.reads for future in read]
        concurrent.futures.wait(futures)
        self.drain()
        with self.cond:
            while self.reads or self.draining:
                self.cond.wait()


class Connection:
    """The shell's side of one link: TLS, then read lines and queue writes."""

    _ids = iter(range(1, 2**62))
    _ids_lock = threading.Lock()

    def __init__(self, shell: "NodeShell", sock: socket.socket, ip: str, dialled: Dial | None):
        with Connection._ids_lock:
            self.id = next(Connection._ids)
        self.shell = shell
        self.sock = sock
        self.ip = ip
        self.dialled = dialled
        self.link = TlsLink(shell.tls_dialler if dialled else shell.tls_listener, dialled is None)
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0
        self.closing = False
        self.cond = threading.Condition()
        self.writer = threading.Thread(target=self._write_loop, daemon=True,
                                       name=f"secral-writer-{self.id}")
        self.started = time.monotonic()          # the handshake deadline counts from here (8.1)
        config = shell.core.config
        self.ahead = TokenBucket(config.rate, config.burst, self.started)   # for work_ahead
        self.pipeline = LinePipeline(shell.pool, functools.partial(shell.call_lines, self.id))

    # reader --------------------------------------------------------------

    def run(self) -> None:
        """Handshake, then read lines until the peer or the core ends the link."""
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            shaken = self._handshake()
        finally:
            if self.dialled is None:
                self.shell.handshake_over(self.sock)
        if not shaken:
            with contextlib.suppress(OSError):
                self.sock.close()
            return
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.shell.register(self)
        self.writer.start()
        try:
            self.shell.call("connection_made", self.id, self.ip, dialled=self.dialled,
                            certificate=self.link.certificate() if self.dialled else None)
            self._read_lines()
        except (OSError, ValueError):
            pass                               # reset, timeout, bad record, or closed under us
        except Exception:                      # a bug: log it, keep the node alive
            log.exception("connection %d: unexpected error", self.id)
        finally:
            self.pipeline.finish()              # (never raises: drain logs what fails)
            self.shell.call("connection_lost", self.id)
            self.close()
            # Let the writer finish first, so a last error frame reaches the peer.
            self.writer.join(timeout=5)

    def _handshake(self) -> bool:
        """TLS 1.3 (8.1).  A listener that meets a JSON line where the
        ClientHello belongs answers in plain JSON, once: a v1 node learns why."""
        try:
            first = b""
            if self.dialled is None:
                first = self.sock.recv(RECV_SIZE)
                if first[:1] == b"{":
                    self.sock.sendall(encode_frame(make_error(
                        "version", f"this node speaks Secral v{PROTOCOL_VERSION}, inside TLS 1.3")))
                    return False
            self.link.handshake(self.sock, first, HANDSHAKE_TIMEOUT - (time.monotonic() - self.started))
            return True
        except (OSError, ValueError) as exc:
            log.info("connection from %s: no TLS 1.3 handshake (%s)", self.ip if not self.dialled
                     else f"{self.dialled.host}:{self.dialled.port}", exc)
            if not isinstance(exc, ssl.SSLError):     # a timeout or a reset proves nothing
                if self.dialled is not None:
                    self.shell.call("dial_failed", self.dialled)
            elif self.dialled is not None:
                self.shell.call("dial_not_tls", self.dialled)
            else:
                self.shell.call("tls_failed", self.ip)
            return False

    def _read_lines(self) -> None:
        buffer = LineBuffer()
        data = b""                             # lines may have come with the handshake's last flight
        while not self.closing:
            data = self.link.receive(data)
            if self.link.pending:              # TLS has something to say (an alert)
                with self.cond:
                    self.cond.notify()
            if data is None:
                return
            lines, oversize = buffer.split(data)
            if lines:
                self.pipeline.put(lines, self.shell.clock(), self.work_for)
            if oversize:                       # never buffer past the limit (3.1)
                self.pipeline.finish()
                self.shell.call("line_too_long", self.id)
                return
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return

    def work_for(self, line: bytes) -> Callable[[], None] | None:
        """The work ahead of one line, for the pool: verify mail, acks and
        records, unwrap and ack mail for us, without the core's lock; the core
        then finds the answers in RSA_MEMO and SIGNED_AHEAD.  Only as fast as
        the peer may send (9.3), so that a flood costs us no more RSA than the
        core would pay; None past that."""
        if not self.ahead.take(time.monotonic()):
            return None
        shell = self.shell

        def work() -> None:
            try:
                work_ahead(decode_frame(line), shell.identity, shell.mail_keys, shell.stores, shell.clock())
            except (RemoteError, KeyError, TypeError, AttributeError, ValueError):
                pass                            # the core finds it and says so
            except Exception:                   # a bug: the core still gets the line
                log.exception("connection %d: work ahead failed", self.id)
        return work

    # writer --------------------------------------------------------------

    def send(self, line: bytes) -> None:
        """Queue a line (called under the shell's lock, so by one sender at a
        time).  A peer that lets MAX_QUEUE_BYTES pile up is dropped; when all
        queues together would pass MAX_QUEUED_TOTAL, the shell drops the
        connection that has the most waiting, which is this one or a peer
        that reads less (9.3)."""
        if self.closing:
            return
        if self.queued + len(line) > MAX_QUEUE_BYTES:
            self.abort("peer is not reading")
            return
        while not self.shell.budget.take(len(line)):
            victim = self.shell.longest_queue()
            if victim is None or victim.queued <= self.queued:
                victim = self
            victim.abort("the node's send queues are full and this peer reads least")
            if victim is self:
                return
        with self.cond:
            if self.closing:
                self.shell.budget.give(len(line))
                return
            self.queue.append(line)
            self.queued += len(line)
            self.cond.notify()

    def close(self) -> None:
        """Close after the queued frames (an error frame, say) are written."""
        with self.cond:
            self.closing = True
            self.cond.notify()

    def abort(self, why: str) -> None:
        """Close now: throw the queue away and shut the socket, so that a
        writer stuck on a peer that does not read, and the reader, both end."""
        was_closing, dropped = self.closing, self._discard()
        if dropped or not was_closing:
            log.warning("connection %d: %s; dropping it", self.id, why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _discard(self) -> int:
        """Stop queueing and throw the queue away, giving its bytes back to
        the node's budget (9.3).  Returns how many bytes were dropped."""
        with self.cond:
            dropped, self.queued = self.queued, 0
            self.queue.clear()
            self.closing = True
            self.cond.notify()
        self.shell.budget.give(dropped)
        return dropped

    def _next_line(self) -> bytes | None:
        """The next line to send (b"" when only TLS has something), or None
        when the connection is closing and all is sent."""
        with self.cond:
            while not self.queue and not self.closing and not self.link.pending:
                self.cond.wait()
            if not self.queue:
                return b"" if self.link.pending else None
            line = self.queue.popleft()
            self.queued -= len(line)
        self.shell.budget.give(len(line))
        return line

    def _write_loop(self) -> None:
        rate = self.shell.core.config.send_rate          # below the peer's limit (9.3)
        pace = TokenBucket(rate, rate, time.monotonic())
        try:
            while (line := self._next_line()) is not None:
                if line:
                    delay = pace.reserve(time.monotonic())   # pace below the peer's limit (9.3)
                    if delay:
                        time.sleep(delay)
                self.sock.sendall(self.link.encrypt(line))
            self.sock.sendall(self.link.goodbye())
        except (OSError, ValueError):
            pass
        finally:
            self._discard()                     # a reset peer leaves no bytes counted
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.shell.unregister(self)


class PeerHandler(socketserver.BaseRequestHandler):
    """socketserver's per-connection thread: hand the socket to a Connection."""

    def handle(self) -> None:
        try:
            Connection(self.server.shell, self.request, self.client_address[0], None).run()
        finally:
            self.server.shell.handshake_over(self.request)     # (if run() never got that far)


class PeerServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    block_on_close = False

    def __init__(self, address: tuple[str, int], shell: "NodeShell"):
        self.shell = shell
        super().__init__(address, PeerHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """A banned address, or one past its share of TLS handshakes, is closed
        before a thread or a byte is spent on it (9.2, 9.3)."""
        return self.shell.may_handshake(request, client_address[0])


class DataDirLock:
    """An exclusive lock on DATA_DIR/lock for a node's lifetime (Appendix B):
    two nodes on one key and one set of stores would answer for each other
    and corrupt each other's state.  The file holds the owner's PID, so that
    the second one can say who holds it."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(data_dir, "lock")
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 32).decode("ascii", "replace").strip() or "?"
            self.release()
            raise LocalError("refused", f"a node (PID {holder}) is already running for {data_dir}")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)                   # closing the file drops the lock
            self.fd = None


class Clock:
    """Wall-clock time, optionally shifted by the number in a file: tests move
    a node's clock a day ahead without sleeping (node --clock-file)."""

    def __init__(self, offset_file: str | None = None):
        self.offset_file = offset_file
        self.offset = 0.0
        self.reload()

    def reload(self) -> None:
        if self.offset_file:
            with contextlib.suppress(OSError, ValueError):
                with open(self.offset_file) as f:
                    self.offset = float(f.read().strip() or 0)

    def __call__(self) -> float:
        return time.time() + self.offset


EVENT_LOG: dict[str, tuple[int, Callable[[dict], str]]] = {
    # event          level, line (ids, addresses and sizes only: never a subject or a body)
    "peer_open":     (logging.INFO, lambda d: f"peer {d['domain']} connected ({d['ip']}, "
                                              f"{'outbound' if d['outbound'] else 'inbound'})"),
    "peer_closed":   (logging.INFO, lambda d: f"peer {d['domain']} disconnected ({d['reason']})"),
    "peer_error":    (logging.INFO, lambda d: f"peer {d['domain'] or d['ip']} says {d['code']}: {d['message']}"),
    "misbehaved":    (logging.INFO, lambda d: f"peer {d['domain'] or d['ip']}: {d['event']} ({d['message']}) "
                                              f"-> score {d['score']}"),
    "banned":        (logging.WARNING, lambda d: f"banned {d['domain'] or '-'} ({d['ip']}) until "
                                                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d['until']))}"),
    "mail_received": (logging.INFO, lambda d: f"mail {d['key'].rsplit('/', 1)[-1][:12]} for {d['user']} "
                                              f"from {d['sender']} ({d['size']} bytes sealed)"),
    "mail_rejected": (logging.INFO, lambda d: f"rejected mail {d['id'][:12]} from {d['sender']}: {d['reason']}"),
    "mail_status":   (logging.INFO, lambda d: f"outbox {d['id'][:12]}: {d['status']}"
                                              + (f" ({d['reason']})" if d["reason"] else "")),
    "nis_result":    (logging.INFO, lambda d: f"NIS {d['domain']}: {'found' if d['record'] else 'not found'}"),
}


class NodeShell:
    """Runs a Node core on real sockets: listener, dialers, tick, control port."""

    def __init__(self, data_dir: str, config: Config, listen: tuple[str, int] | None,
                 clock: Clock | None = None, identity: Identity | None = None,
                 smtp: tuple[str, int] | None = None, pop3: tuple[str, int] | None = None,
                 imap: tuple[str, int] | None = None, announce: Callable[[str], None] | None = None,
                 mail_key_source: "Callable[[int, MailKeys], Identity] | None" = None):
        self.data_dir = data_dir
        self.clock = clock or Clock()
        self.servers: list[socketserver.BaseServer] = []
        self.lock_file = DataDirLock(data_dir)          # one node per data directory
        try:
            self.identity = identity or load_identity(os.path.join(data_dir, "node.key"), announce=announce)
            self.server = self._listen(PeerServer, listen, "--host/--port") if listen else None
            self.mail_servers = {name: self._listen(MailClientServer, address, f"--{name}-port", handler)
                                 for name, address, handler in (("smtp", smtp, SmtpHandler),
                                                                ("pop3", pop3, Pop3Handler),
                                                                ("imap", imap, ImapHandler)) if address}
        except BaseException:
            self._release()
            raise
        self.stores = Stores.open(data_dir)
        self.tls_listener, self.tls_dialler = tls_contexts(self.identity, data_dir)
        self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "secral-ahead")   # work ahead
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.generation = 0                     # bumped on every event, for waiters
        self.conns: dict[int, Connection] = {}
        self.handshaking: dict[socket.socket, tuple[str, float]] = {}   # inbound, still in TLS:
                                                # address subject, since when
        self.budget = SendBudget(MAX_QUEUED_TOTAL)
        self.stopping = threading.Event()
        self.closed = False
        if self.server and config.host is not None and not config.port:
            config.port = self.server.server_address[1]
        self.mail_key_source = mail_key_source or (lambda epoch, keys: Identity.generate())
        self.mail_keys = MailKeys(os.path.join(data_dir, MAIL_KEY_DIR))
        first = [e for e in {epoch_of(self.clock()), epoch_of(self.clock() + 86_400)} if e not in self.mail_keys.keys]
        if first:                               # what a start waits for: this week's key (and the
            if announce is not None:            # next one's, in a week's last day)
                announce(f"generating this week's mail key (RSA-{RSA_BITS}) ...")
            self.make_mail_keys(sorted(first))
        self.core = Node(self.identity, self.stores, config, self.clock(), os.urandom, self.mail_keys)
        self.control: "ControlServer | None" = None
        self.threads: list[threading.Thread] = []
        self.key_maker: threading.Thread | None = None

    def _listen(self, factory: type, address: tuple[str, int], option: str, *args: Any) -> Any:
        """Bind one listening socket; a failure is the operator's to fix, in one line."""
        try:
            server = factory(address, *args, self)
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LocalError("refused", f"cannot listen on {address[0]}:{address[1]} ({option}): {reason}")
        self.servers.append(server)
        return server

    def _release(self) -> None:
        for server in self.servers:
            server.server_close()
        self.lock_file.release()

    @property
    def port(self) -> int | None:
        return self.server.server_address[1] if self.server else None

    # calling the core ----------------------------------------------------

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one core input under the lock and carry out its actions.
        Core methods that return (value, actions) give back the value."""
        with self.lock:
            if self.closed:
                return None                     # a straggling thread after stop()
            result = getattr(self.core, method)(*args, now=self.clock(), **kwargs)
            value, actions = (result if isinstance(result, tuple) else (None, result))
            self.execute(actions)
            return value

    def call_lines(self, conn: int, lines: list[tuple[bytes, float]]) -> None:
        """Lines of one connection, each with the time it came off the socket,
        handled in one group commit (issue 17): every store change they make
        is committed once, together, and only then is anything they caused
        sent (7.4: store, then ack).  A bug on one line is logged and costs
        the rest nothing."""
        with self.lock:
            if self.closed:
                return
            actions: list[Action] = []
            with self.stores.group():
                for line, arrived in lines:
                    try:
                        actions += self.core.line_received(conn, line, now=self.clock(), arrived=arrived)
                    except Exception:
                        log.exception("connection %d: unexpected error on a line", conn)
                        actions += self.core.take()
            self.execute(actions)

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                conn = self.conns.get(action.conn)
                if conn is not None:
                    conn.send(encode_frame(action.frame))
            elif isinstance(action, Close):
                conn = self.conns.get(action.conn)
                if conn is not None:
                    conn.close()
            elif isinstance(action, Dial):
                self._spawn(self._dial, action, name=f"secral-dial-{action.host}:{action.port}")
            elif isinstance(action, Event):
                self._log_event(action)
                self.generation += 1
                self.changed.notify_all()

    def _log_event(self, event: Event) -> None:
        level, text = EVENT_LOG.get(event.name, (None, None))
        if level is not None:
            log.log(level, text(event.data))

    def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait (holding no lock while asleep) until predicate() is truthy."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0 or self.stopping.is_set():
                    return value
                self.changed.wait(min(remaining, 1.0))

    # connections ---------------------------------------------------------

    def register(self, conn: Connection) -> None:
        with self.lock:
            self.conns[conn.id] = conn

    def unregister(self, conn: Connection) -> None:
        with self.lock:
            self.conns.pop(conn.id, None)

    def longest_queue(self) -> Connection | None:
        with self.lock:
            return max(self.conns.values(), key=lambda conn: conn.queued, default=None)

    def may_handshake(self, sock: socket.socket, ip: str) -> bool:
        """Whether an inbound TCP connection gets a TLS handshake (9.2, 9.3):
        not banned, and within the caps on connections still in TLS, which
        the core has not seen yet.  One address subject gets its share and
        no more; when all are taken, the oldest handshake makes room, as it
        has had the most time: a crowd that never finishes evicts itself,
        not a newcomer that takes a round trip."""
        subject = ip_subject(ip)
        config = self.core.config
        with self.lock:
            crowd = sum(s == subject for s, _ in self.handshaking.values())
            if not self.core.admits(ip, self.clock()) or crowd >= config.max_inbound_per_ip:
                return False
            if len(self.handshaking) >= config.max_inbound:
                oldest = min(self.handshaking, key=lambda other: self.handshaking[other][1])
                del self.handshaking[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)      # its handshake ends; its thread notices
            self.handshaking[sock] = (subject, time.monotonic())
            return True

    def handshake_over(self, sock: socket.socket) -> None:
        with self.lock:
            self.handshaking.pop(sock, None)

    def _dial(self, dial: Dial) -> None:
        try:
            sock = socket.create_connection((dial.host, dial.port), timeout=DIAL_TIMEOUT)
        except (OSError, UnicodeError, ValueError) as exc:   # unreachable, or not a usable name
            log.info("cannot reach %s (%s:%d): %s", dial.domain or "peer", dial.host, dial.port, exc)
            self.call("dial_failed", dial)
            return
        ip = sock.getpeername()[0]
        Connection(self, sock, ip, dial).run()

    def _spawn(self, target: Callable, *args: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        thread.start()
        return thread

    # life cycle ----------------------------------------------------------

    def start(self) -> None:
        if self.server:
            self.threads.append(self._spawn(self.server.serve_forever, SERVE_POLL, name="secral-listen"))
        self.threads.append(self._spawn(self._tick_loop, name="secral-tick"))
        self.key_maker = self._spawn(self._mail_key_loop, name="secral-mail-keys")
        self.threads.append(self.key_maker)
        self.control = ControlServer(self)
        self.threads.append(self._spawn(self.control.serve_forever, SERVE_POLL, name="secral-control"))
        for name, server in self.mail_servers.items():
            self.threads.append(self._spawn(server.serve_forever, SERVE_POLL, name=f"secral-{name}"))
        self.control.publish()
        self.call("tick")

    def _tick_loop(self) -> None:
        while not self.stopping.wait(TICK_SECONDS):
            try:
                self.clock.reload()
                self.call("tick")
            except Exception:
                log.exception("tick failed")

    def make_mail_keys(self, epochs: list[int]) -> int:
        """Make and keep the mail keys of `epochs` (5.3); how many were made."""
        made = 0
        for epoch in epochs:
            key = self.mail_key_source(epoch, self.mail_keys)
            if self.stopping.is_set():          # (the data directory may be going away)
                break
            self.mail_keys.add(epoch, key)
            made += 1
        return made

    def _mail_key_loop(self) -> None:
        """Keys for the epochs ahead, made here one at a time, off the core's
        path (5.3): a record refresh never waits for RSA key generation.
        After each, the record may be re-signed with it."""
        rest = TICK_SECONDS
        while not self.stopping.wait(rest):
            rest = TICK_SECONDS
            try:
                missing = self.mail_keys.missing(self.clock())
                if missing:
                    started = time.monotonic()
                    self.make_mail_keys(missing[:1])
                    self.call("refresh_record")
                    rest = (time.monotonic() - started) * MAIL_KEY_REST
            except Exception:
                log.exception("making mail keys failed; trying again in a minute")
                rest = 60

    def stop(self) -> None:
        """Stop cleanly: tell peers, close sockets, close the stores."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.control:
            self.control.unpublish()
            self.control.shutdown()
            self.control.server_close()
        for server in [self.server, *self.mail_servers.values()]:
            if server:
                server.shutdown()
                server.server_close()
        with self.lock:
            self.execute(self.core.close_all(self.clock()))
            self.changed.notify_all()
        deadline = time.monotonic() + 2
        while self.conns and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.key_maker is not None:          # a key half made is not written once we stop
            self.key_maker.join(timeout=30)
        with self.lock:
            self.closed = True
            self.stores.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.lock_file.release()


# =============================================================================
# Control interface
# =============================================================================
# The CLI talks to a running node over a TCP port bound to 127.0.0.1.  The
# port and a random token are in DATA_DIR/control.json (mode 0600), so only
# the node's owner can use it.  One request line, one response line:
#   {"token": ..., "cmd": "send", "args": {...}}
#   {"ok": true, "result": ...}  or  {"ok": false, "code": ..., "message": ...}

CONTROL_FILE = "control.json"
CONTROL_MAX_WAIT = 600          # seconds a request may wait (send --wait, nis lookup)


def write_private_json(path: str, obj: Any) -> None:
    """Write JSON atomically with mode 0600 (control.json)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class ControlHandler(socketserver.StreamRequestHandler):
    timeout = CONTROL_MAX_WAIT + 30

    def handle(self) -> None:
        line = self.rfile.readline(MAX_LINE * 2)
        try:
            try:
                request = json.loads(line)      # the owner's own client: floats allowed
            except ValueError:
                raise LocalError("refused", "a control request is one JSON line")
            if not isinstance(request, dict) or not isinstance(request.get("token"), str):
                raise LocalError("unauthorized", "no control token")
            if not hmac.compare_digest(request["token"], self.server.token):
                raise LocalError("unauthorized", "wrong control token")
            command = request.get("cmd")
            method = self.server.control.commands.get(command) if isinstance(command, str) else None
            if method is None:
                raise LocalError("refused", f"unknown command {command!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise LocalError("refused", "args must be an object")
            response = {"ok": True, "result": method(**args)}
        except SecralError as exc:
            response = {"ok": False, "code": exc.code, "message": exc.message}
        except TypeError as exc:                # wrong arguments for the command
            response = {"ok": False, "code": "refused", "message": str(exc)}
        except Exception as exc:                # a bug: say so, keep serving
            log.exception("control command failed")
            response = {"ok": False, "code": "refused", "message": f"internal error: {exc}"}
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(response).encode() + b"\n")


class ControlServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, shell: NodeShell):
        self.shell = shell
        self.token = secrets.token_hex(32)
        self.control = Control(shell)
        super().__init__(("127.0.0.1", 0), ControlHandler)

    def publish(self) -> None:
        write_private_json(os.path.join(self.shell.data_dir, CONTROL_FILE), {
            "port": self.server_address[1], "token": self.token, "pid": os.getpid(),
            "domain": self.shell.identity.domain})

    def unpublish(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.shell.data_dir, CONTROL_FILE))


def inbox_view(key: str, entry: dict, users: MutableMapping, contacts: dict) -> dict:
    """An inbox entry as the CLI and the control port show it (every field, always)."""
    user = users.get(entry["user"])
    return {"id": entry["id"], "key": key, "folder": "inbox", "from": entry["from"], "to": entry["to"],
            "user": user["name"] if user else entry["user"], "subject": entry["subject"],
            "created": entry["created"], "received": entry["received"],
            "unread": entry.get("unread", False), "contact": contacts.get(Address(*entry["from"].split("@")).key)}


def mail_content(entry: dict) -> dict:
    """What `read` adds to a mail's view: its body, parts and in_reply_to."""
    return {"body": entry["body"], "parts": entry.get("parts") or [],
            "in_reply_to": entry.get("in_reply_to")}


def outbox_note(entry: dict) -> str:
    """Why an own mail is where it is, in words (7.5): what a user asks first."""
    status = entry["status"]
    if status == "queued" and entry.get("mail") is None:
        if not entry.get("lookups"):
            return "waiting for the recipient's key: asking the network (NIS)"
        return (f"waiting for the recipient's key: NIS not found \u00d7{entry['lookups']}, "
                f"last {when(entry['last_lookup'])}; asking again every minute")
    if status == "queued":
        return "sealed; waiting for a peer to hand it to"
    if status == "sent":
        return "handed on; waiting for the recipient's ack"
    if status == "cancelled":
        return "withdrawn: no more retries (copies already handed on may still arrive)"
    return entry.get("reason", "")


def outbox_view(entry: dict, contacts: dict | None = None) -> dict:
    """An outbox entry as the CLI and the control port show it: the same fields
    always (null when not yet known), never the sealed mail or the body."""
    return {"id": entry["id"], "folder": "sent", "from": entry["from"], "to": entry["to"],
            "contact": (contacts or {}).get(Address(*entry["to"].split("@")).key),
            "subject": entry["subject"], "created": entry["created"], "expires": entry["expires"],
            "status": entry["status"], "reason": entry["reason"], "note": outbox_note(entry),
            "key_id": (entry.get("mail") or {}).get("key_id"),     # the recipient's mail key (5.6)
            "lookups": entry.get("lookups", 0), "last_lookup": entry.get("last_lookup"),
            "sent": entry.get("sent"), "acked": entry.get("acked"),
            "submitted_ms": entry.get("submitted_ms"), "done_ms": entry.get("done_ms")}


def find_by_prefix(entries: list[tuple[str, dict]], prefix: str, what: str) -> tuple[str, dict]:
    """The one entry whose mail id starts with `prefix` (at least 4 hex digits)."""
    prefix = prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,32}", prefix):
        raise LocalError("refused", "give at least 4 hexadecimal digits of the mail id")
    matches = [(k, e) for k, e in entries if e["id"].startswith(prefix)]
    if not matches:
        raise LocalError("not_found", f"no {what} with id {prefix}")
    if len(matches) > 1:
        ids = ", ".join(sorted(e["id"][:12] for _, e in matches)[:10])
        raise LocalError("refused", f"{prefix} is ambiguous: {len(matches)} mails match ({ids}); "
                         "give more digits")
    return matches[0]


class Control:
    """The commands a running node serves to its owner (README: command line).
    Each cmd_<name> takes keyword arguments and returns JSON-able data; the
    table COMMANDS names them, so a request picks one by table, not by
    building a method name from its input."""

    def __init__(self, shell: NodeShell):
        self.shell = shell
        self.core = shell.core
        self.stores = shell.stores
        self.commands: dict[str, Callable[..., Any]] = {
            "whoami": self.cmd_whoami, "status": self.cmd_status, "peers": self.cmd_peers,
            "nis_lookup": self.cmd_nis_lookup, "send": self.cmd_send, "wait": self.cmd_wait,
            "outbox": self.cmd_outbox, "outbox_cancel": self.cmd_outbox_cancel,
            "inbox": self.cmd_inbox, "inbox_delete": self.cmd_inbox_delete, "read": self.cmd_read,
            "users_list": self.cmd_users_list, "users_add": self.cmd_users_add,
            "users_remove": self.cmd_users_remove, "passwd": self.cmd_passwd,
            "contacts_list": self.cmd_contacts_list, "contacts_add": self.cmd_contacts_add,
            "contacts_remove": self.cmd_contacts_remove,
        }

    def _now(self) -> float:
        return self.shell.clock()

    def _contacts_by_address(self) -> dict[str, str]:
        return {parse_address(c["address"]).key: c["name"] for c in self.stores.contacts.values()}

    def _resolve(self, to: str) -> str:
        """An address, or a contact name standing for one (contacts are local only)."""
        if "@" in to:
            try:
                return str(parse_address(to.strip(), "to"))
            except RemoteError as exc:
                raise local_error(exc)
        contact = self.stores.contacts.get(to.lower())
        if contact is None:
            raise LocalError("not_found", f"{to!r} is neither an address nor a contact")
        return contact["address"]

    # identity and peers --------------------------------------------------

    def cmd_whoami(self) -> dict:
        with self.shell.lock:
            users = sorted(u["name"] for u in self.stores.users.values())
            record = self.core.record
        return {"domain": self.core.domain,
                "addresses": [f"{u}@{self.core.domain}" for u in [CORE_USER] + users],
                "host": record["host"], "port": self.shell.port, "advertised_port": record["port"]}

    def cmd_status(self) -> dict:
        """What this node holds: its mail, what it keeps for others, its peers."""
        with self.shell.lock:
            return self.core.status(self._now())

    def cmd_peers(self, banned: bool = False) -> list[dict]:
        now = self._now()
        with self.shell.lock:
            if banned:
                return [{"subject": subject, "until": entry["until"], "bans": entry["bans"]}
                        for subject, entry in self.core.reputation.bans(int(now))]
            return self.core.open_peer_list(now)

    def cmd_nis_lookup(self, domain: str, timeout: float = NIS_TIMEOUT) -> dict:
        domain = domain.strip().lower()
        record = self.shell.call("lookup", domain)
        if record is None:
            record = self.shell.wait_for(lambda: self.core.known_record(domain, self._now()),
                                         min(float(timeout), CONTROL_MAX_WAIT))
        if record is None:
            raise LocalError("not_found", f"no NIS record for {domain} was found")
        return record

    # mail ----------------------------------------------------------------

    def cmd_send(self, to: str, subject: str, body: str, user: str = DEFAULT_USER,
                 ttl: int = MAX_TTL, parts: list | None = None, in_reply_to: str | None = None) -> dict:
        """Queue a mail (parts: [{"type", "name"?, "data": base64}], 6.1).  If
        the recipient's key must be looked up first, wait for that first
        answer, so that the user hears at once when nobody knows the
        recipient's node (the node keeps asking)."""
        with self.shell.lock:
            address = self._resolve(to)
            record, sender = self.core.recipient_record(address, self.shell.clock()), self.core.sender_address(user)
        sealed = None
        if record is not None and sender is not None and not sender.is_core:
            # Seal here, off the core's lock (issue 17); whatever is wrong with
            # the mail, submit below says so in its own words.
            with contextlib.suppress(SecralError, TypeError, ValueError):
                sealed = seal_mail(self.shell.identity, sender, parse_address(address), record, subject, body,
                                   int(self.shell.clock()), int(ttl), os.urandom, parts or (), in_reply_to)
        with self.shell.lock:
            mail_id = self.shell.call("submit", user, address, subject, body, ttl=int(ttl),
                                      parts=parts or (), in_reply_to=in_reply_to, sealed=sealed)

        def looked_up() -> bool:
            entry = self.stores.outbox[mail_id]
            return entry["mail"] is not None or entry.get("lookups", 0) > 0 or entry["status"] != "queued"
        self.shell.wait_for(looked_up, NIS_TIMEOUT + 2)
        with self.shell.lock:
            return outbox_view(self.stores.outbox[mail_id])

    def cmd_wait(self, id: str, timeout: float = 10) -> dict:
        """Wait until an outbox entry reaches delivered/rejected/expired/cancelled."""
        def final():
            entry = self.stores.outbox.get(id)
            return entry if entry and entry["status"] in OUTBOX_FINAL else None
        self.shell.wait_for(final, min(float(timeout), CONTROL_MAX_WAIT))
        with self.shell.lock:
            entry = self.stores.outbox.get(id)
        if entry is None:
            raise LocalError("not_found", f"no outbox entry {id}")
        return outbox_view(entry)

    def cmd_outbox(self) -> list[dict]:
        with self.shell.lock:
            contacts = self._contacts_by_address()
            entries = [outbox_view(e, contacts) for e in self.stores.outbox.values()]
        return sorted(entries, key=lambda e: (e["created"], e["id"]))

    def cmd_outbox_cancel(self, id: str) -> dict:
        with self.shell.lock:
            mail_id, _ = find_by_prefix(list(self.stores.outbox.items()), id, "sent mail")
            return outbox_view(self.shell.call("cancel", mail_id))

    def cmd_inbox(self, user: str | None = None) -> list[dict]:
        with self.shell.lock:
            if user is not None and user.lower() not in self.stores.users:
                raise LocalError("not_found", f"no local user {user!r}")
            contacts = self._contacts_by_address()
            entries = [inbox_view(k, e, self.stores.users, contacts) for k, e in self.stores.inbox.items()
                       if user is None or e["user"] == user.lower()]
        return sorted(entries, key=lambda e: (e["received"], e["id"]))

    def cmd_inbox_delete(self, id: str) -> dict:
        """Delete one received mail.  Its ack stays in the relay store, so a
        late copy of the mail is answered, never stored again (7.4)."""
        with self.shell.lock:
            key, entry = find_by_prefix(list(self.stores.inbox.items()), id, "received mail")
            view = inbox_view(key, entry, self.stores.users, self._contacts_by_address())
            del self.stores.inbox[key]
        return view

    def cmd_read(self, id: str) -> dict:
        """One mail, received or sent, with its body; reading marks it read."""
        with self.shell.lock:
            try:                                # (mail to oneself is in both: the inbox wins)
                key, entry = find_by_prefix(list(self.stores.inbox.items()), id, "mail")
            except LocalError as exc:
                if exc.code != "not_found":
                    raise
                _, entry = find_by_prefix(list(self.stores.outbox.items()), id, "mail")
                return outbox_view(entry, self._contacts_by_address()) | mail_content(entry)
            if entry.get("unread"):
                entry["unread"] = False
                self.stores.inbox[key] = entry
            view = inbox_view(key, entry, self.stores.users, self._contacts_by_address())
            return view | mail_content(entry)

    # users and contacts (local only: never on the wire) --------------------

    def cmd_users_list(self) -> list[dict]:
        with self.shell.lock:
            inbox = collections.Counter(e["user"] for e in self.stores.inbox.values())
            return [{"name": u["name"], "address": f"{u['name']}@{self.core.domain}",
                     "created": u["created"], "mails": inbox[key]}
                    for key, u in sorted(self.stores.users.items())]

    def cmd_users_add(self, name: str) -> dict:
        try:
            check_user(name, "user")
        except RemoteError as exc:
            raise local_error(exc)
        if name.lower() == CORE_USER.lower():
            raise LocalError("refused", f"{CORE_USER} is the system user")
        with self.shell.lock:
            if name.lower() in self.stores.users:
                raise LocalError("exists", f"user {self.stores.users[name.lower()]['name']} exists")
            self.stores.users[name.lower()] = {"name": name, "created": int(self._now())}
        return {"name": name, "address": f"{name}@{self.core.domain}"}

    def cmd_users_remove(self, name: str, force: bool = False) -> dict:
        key = name.lower()
        if key == CORE_USER.lower():
            raise LocalError("refused", f"{CORE_USER} is the system user")
        with self.shell.lock:
            if key not in self.stores.users:
                raise LocalError("not_found", f"no local user {name!r}")
            known = self.stores.users[key]["name"]
            mails = [k for k, e in self.stores.inbox.items() if e["user"] == key]
            if mails and not force:
                raise LocalError("refused", f"{known} has {len(mails)} mails in the inbox; "
                                 "use --force to remove the user and the mail")
            for k in mails:
                del self.stores.inbox[k]
            del self.stores.users[key]
            self.stores.passwords.pop(key, None)
        return {"name": known, "removed_mails": len(mails)}

    def cmd_passwd(self, user: str, password: str) -> dict:
        """Set the password a mail client uses for `user` (SMTP and POP3)."""
        if len(password) < 8:
            raise LocalError("refused", "a password needs at least 8 characters")
        with self.shell.lock:
            known = self.stores.users.get(user.lower())
            if known is None:
                raise LocalError("not_found", f"no local user {user!r}")
            self.stores.passwords[user.lower()] = hash_password(password)
        return {"user": known["name"]}

    def cmd_contacts_list(self) -> list[dict]:
        with self.shell.lock:
            return [self.stores.contacts[k] for k in sorted(self.stores.contacts.keys())]

    def cmd_contacts_add(self, name: str, address: str) -> dict:
        if "@" in name or not USER_RE.fullmatch(name):
            raise LocalError("refused", f"{name!r}: a contact name is 1-64 of A-Z a-z 0-9 . _ - "
                             "starting with a letter or digit")
        try:
            address = str(parse_address(address.strip(), "address"))
        except RemoteError as exc:
            raise local_error(exc)
        with self.shell.lock:
            if name.lower() in self.stores.contacts:
                raise LocalError("exists", f"contact {self.stores.contacts[name.lower()]['name']} exists")
            self.stores.contacts[name.lower()] = {"name": name, "address": address}
        return {"name": name, "address": address}

    def cmd_contacts_remove(self, name: str) -> dict:
        with self.shell.lock:
            contact = self.stores.contacts.pop(name.lower(), None)
        if contact is None:
            raise LocalError("not_found", f"no contact {name!r}")
        return contact


# =============================================================================
# Mail clients: SMTP submission, IMAP and POP3
# =============================================================================
# So that Thunderbird, a phone, mutt or Python's smtplib/imaplib/poplib can
# use a node, it can serve the subset of SMTP submission (RFC 5321, RFC 4954
# AUTH PLAIN), IMAP4rev1 (RFC 3501, further below) and POP3 (RFC 1939) a
# mail client needs, on 127.0.0.1 by default: these ports
# carry passwords and plaintext, and are meant for the machine the node runs
# on.  Passwords are set with `secral.py passwd USER` and kept as salted
# scrypt hashes.  Nothing here is part of the Secral protocol.

MAIL_LINE = 4096                # bytes in one SMTP/POP3 command line
MAIL_MESSAGE = 4 << 20          # bytes in one SMTP DATA section, before it is parsed
MAIL_TIMEOUT = 300              # seconds a mail client may stay silent
SCRYPT = {"n": 2**14, "r": 8, "p": 1}   # ~50 ms and 16 MiB per check ...
PASSWORD_CHECKS = 4             # ... so at most this many at once
MAIL_CLIENTS = 32               # concurrent SMTP/POP3 connections
_password_slots = threading.BoundedSemaphore(PASSWORD_CHECKS)


def hash_password(password: str, salt: bytes | None = None, **params: int) -> dict:
    params = params or SCRYPT
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, maxmem=64 << 20, **params)
    return {"salt": b64e(salt), "hash": b64e(digest), **params}


def password_matches(stored: dict | None, password: str) -> bool:
    with _password_slots:                       # scrypt is memory-hard: a few at a time
        if stored is None:
            hash_password(password)             # the same work for unknown users
            return False
        params = {k: stored[k] for k in ("n", "r", "p")}
        again = hash_password(password, base64.b64decode(stored["salt"]), **params)
        return hmac.compare_digest(again["hash"], stored["hash"])


# -- whole messages: MIME in and out -------------------------------------------
# A Secral mail (PROTOCOL.md 6) is a subject, a text body and parts; what a
# mail client sends and shows is a MIME message (RFC 2045-2049).  SMTP maps a
# message onto a mail (parse_submission); POP3 and IMAP rebuild an equivalent
# message from a mail (message_of), the same bytes every time, since POP3
# sizes and UIDLs and IMAP's messages must not change between sessions.
# Message-IDs are derived from the mail id, so a reply threads on both sides.

SECRAL_MESSAGE_ID = re.compile(r"<([0-9a-f]{32})@node-[a-z2-7]{24}>")


def message_id(mail_id: str, sender_domain: str) -> str:
    """The Message-ID of a mail: both the sender's Sent copy and the
    recipient's copy carry it, and a reply's In-Reply-To names it."""
    return f"<{mail_id}@{sender_domain}>"


def header_text(value: Any) -> str:
    """Any stored text as one header-safe line (no lone surrogates, no line breaks)."""
    value = str(value).encode("utf-8", "replace").decode("utf-8")
    return " ".join(LINE_BREAKERS.sub(" ", value).split())


def mime_boundary(entry: dict) -> str:
    """A boundary the mail cannot contain: "=_" never occurs in quoted-printable
    or base64, and the rest is a hash of the content it would have to hold."""
    content = json.dumps([entry.get(k) for k in ("id", "subject", "body", "parts", "report")],
                         sort_keys=True, default=str)
    return "=_" + hashlib.sha256(content.encode("utf-8", "replace")).hexdigest()[:40]


def replied_domain(stores: "Stores", own_domain: str, entry: dict) -> str | None:
    """The domain of the node that sent the mail `entry` answers, so that
    In-Reply-To names its Message-ID (message_id): our own if it is in our
    outbox, else whichever of the two nodes' copies is in our inbox."""
    replied = entry.get("in_reply_to")
    if not replied:
        return None
    if replied in stores.outbox:
        return own_domain
    for address in (entry.get("from"), entry.get("to")):
        domain = str(address).rpartition("@")[2]
        if mail_key(domain, replied) in stores.inbox:
            return domain
    return None


def message_of(entry: dict, from_name: str | None = None, to_name: str | None = None,
               replied: str | None = None) -> bytes:
    """An inbox or outbox entry as an RFC 5322 message (CRLF line ends).  It
    cannot fail on a stored mail, whatever it holds (a mail stored under older
    rules, say): a text that breaks a header is mended, never refused here,
    since a mailbox that cannot be listed locks its owner out."""
    try:
        if entry.get("report"):
            return report_message(entry)
        return mail_message(entry, from_name, to_name, replied)
    except Exception:                           # (a bug here must not lock anyone out)
        log.exception("cannot render mail %s; serving it as plain text", str(entry.get("id"))[:12])
        body = str(entry.get("body", "")).encode("utf-8", "replace")
        return (b"Subject: (this mail could not be shown as it was stored)\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body.replace(b"\n", b"\r\n"))


def mail_message(entry: dict, from_name: str | None, to_name: str | None, replied: str | None) -> bytes:
    """A mail as MIME: text/plain alone, or with its HTML alternative and its
    other parts attached, each part's bytes as they were sent.  `replied`
    is the domain of the mail it answers (replied_domain), if known."""
    import email.message
    import email.parser
    import email.policy
    import email.utils
    sender = entry["from"] if isinstance(entry.get("from"), str) else "unknown@unknown"
    message = email.message.EmailMessage(policy=email.policy.SMTP)
    message["From"] = email.utils.formataddr((header_text(from_name or entry.get("from_name") or ""), sender))
    message["To"] = email.utils.formataddr((header_text(to_name or entry.get("to_name") or ""),
                                            header_text(entry["to"])))
    message["Subject"] = header_text(entry["subject"])
    message["Date"] = email.utils.formatdate(entry["created"], usegmt=True)
    message["Message-ID"] = message_id(entry["id"], sender.rpartition("@")[2])
    if entry.get("in_reply_to"):                # (by default: a mail its recipient sent)
        answered = message_id(entry["in_reply_to"], replied or header_text(entry["to"]).rpartition("@")[2])
        message["In-Reply-To"] = message["References"] = answered
    message.set_content(str(entry["body"]).encode("utf-8", "replace").decode("utf-8"))
    for part in entry.get("parts") or ():
        maintype, _, subtype = part["type"].partition("/")
        data = base64.b64decode(part["data"])
        if part["type"] == "text/html" and "name" not in part:
            message.add_alternative(data.decode("utf-8", "replace"), subtype="html")
        elif part["type"] == "message/rfc822":  # a forwarded message stays readable as one
            forwarded = email.parser.BytesParser(policy=email.policy.SMTP).parsebytes(data)
            message.add_attachment(forwarded, filename=header_text(part.get("name") or "forwarded.eml"))
        else:
            message.add_attachment(data, maintype=maintype, subtype=subtype,
                                   filename=header_text(part.get("name") or "part"))
            if maintype == "text":              # a part's text is UTF-8 (6): say so, or clients guess
                message.get_payload()[-1].set_param("charset", "utf-8")
    boundary = mime_boundary(entry)
    for n, part in enumerate(p for p in message.walk() if p.is_multipart()):
        part.set_boundary(f"{boundary}.{n}")
    return message.as_bytes()


DSN_STATUS = {                                  # a bounce's status code (RFC 3463) by reason
    "no_such_user": "5.1.1", "too_large": "5.3.4", "bad_address": "5.1.7", "expired": "5.4.7"}   # else 5.6.0


def report_message(entry: dict) -> bytes:
    """A bounce (a delivery status notification, RFC 3464) as multipart/report:
    words for people, the machine-readable report, the original's headers."""
    import email.header
    import email.utils
    report, domain = entry["report"], entry["from"].rpartition("@")[2]

    def header(name: str, value: str) -> str:
        value = header_text(value)
        encoded = value if value.isascii() else email.header.Header(value, "utf-8", header_name=name).encode()
        return f"{name}: {encoded}"
    boundary = mime_boundary(entry)
    status = DSN_STATUS.get(report["reason"] if report["status"] == "rejected" else "expired", "5.6.0")
    original = message_id(report["mail"], domain)
    lines = [header("From", f"Mail Delivery <{entry['from']}>"), header("To", entry["to"]),
             header("Subject", entry["subject"]),
             f"Date: {email.utils.formatdate(entry['created'], usegmt=True)}",
             f"Message-ID: {message_id(entry['id'], domain)}",
             f"In-Reply-To: {original}", f"References: {original}", "Auto-Submitted: auto-replied",
             "MIME-Version: 1.0",
             f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"', "",
             f"--{boundary}", 'Content-Type: text/plain; charset="utf-8"', "Content-Transfer-Encoding: 8bit", "",
             *textwrap.wrap(header_text(entry["body"]), 76), "",
             f"--{boundary}", "Content-Type: message/delivery-status", "",
             f"Reporting-MTA: dns; {domain}", f"Arrival-Date: {email.utils.formatdate(report['created'])}", "",
             f"Final-Recipient: rfc822; {header_text(report['to'])}", "Action: failed", f"Status: {status}",
             f"Diagnostic-Code: x-secral; {report['status']}: {header_text(report['reason'])}"[:900], "",
             f"--{boundary}", "Content-Type: text/rfc822-headers", "",
             header("From", report["from"]), header("To", report["to"]),
             header("Subject", report["subject"]),
             f"Date: {email.utils.formatdate(report['created'], usegmt=True)}", f"Message-ID: {original}", "",
             f"--{boundary}--", ""]
    return "\r\n".join(lines).encode("utf-8")


def parse_submission(data: bytes) -> dict:
    """What a mail client submitted, as the pieces of a mail (6): subject,
    text body, parts (the HTML alternative first, then every other leaf:
    attachments, inline images, forwarded messages, a second text), the
    in_reply_to of a reply to a Secral mail, and what only the sender keeps
    (its Message-ID, so a client's own copy in Sent is recognised, and the
    display names).  Nothing is dropped: a part the mail cannot hold makes
    the whole mail too large, and it is refused, not cut."""
    import email.parser
    import email.policy
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    subject = re.sub(r"\r?\n[ \t]*", " ", str(message.get("Subject", ""))).strip()   # unfolded (RFC 5322 2.2.3)
    body_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    parts = [{"type": "text/html", "data": b64e(mime_text(html_part).encode("utf-8"))}] if html_part else []
    parts += [mime_part(leaf) for leaf in mime_leaves(message) if leaf is not body_part and leaf is not html_part]
    return {"subject": subject, "body": mime_text(body_part) if body_part is not None else "",
            "parts": parts, "in_reply_to": replied_id(message),
            "local": {"message_id": header_text(message.get("Message-ID", ""))[:998] or None,
                      "from_name": display_name(message, "From"), "to_name": display_name(message, "To")}}


MIME_DEPTH = 32                 # multiparts inside each other that a message may have


def mime_leaves(part: Any, depth: int = 0) -> Iterator[Any]:
    """The leaves of a MIME tree; a forwarded message is one leaf, not a tree."""
    if part.is_multipart() and part.get_content_maintype() != "message":
        if depth >= MIME_DEPTH:
            raise LocalError("refused", f"multiparts nested more than {MIME_DEPTH} deep")
        for child in part.iter_parts():
            yield from mime_leaves(child, depth + 1)
    else:
        yield part


def mime_text(part: Any) -> str:
    """A text part's text, line ends as LF, format=flowed undone (RFC 3676)."""
    try:
        text = part.get_content()
    except (LookupError, ValueError):           # an unknown charset: the bytes as UTF-8
        text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    text = text.replace("\r\n", "\n")
    if part.get_param("format", "").lower() == "flowed":
        text = decode_flowed(text, part.get_param("delsp", "").lower() == "yes")
    return text


def decode_flowed(text: str, delsp: bool) -> str:
    """RFC 3676 section 4: a line ending in a space flows into the next line
    of the same quote depth; delsp=yes means that space was added, so it goes
    (else CJK words split by a soft break would gain a space)."""
    out: list[str] = []
    paragraph, depth = None, 0
    for line in text.split("\n"):
        quotes = len(line) - len(line.lstrip(">"))
        content = line[quotes:]
        content = content[1:] if content.startswith(" ") else content    # space-stuffing (4.4)
        flowed = content.endswith(" ") and content != "-- "              # the signature line (4.3)
        if flowed and delsp:
            content = content[:-1]
        if paragraph is not None and quotes != depth:   # a broken paragraph ends (4.5)
            out.append(paragraph)
            paragraph = None
        prefix = ">" * quotes + (" " if quotes else "")
        paragraph, depth = (paragraph + content if paragraph is not None else prefix + content), quotes
        if not flowed:
            out.append(paragraph)
            paragraph = None
    if paragraph is not None:
        out.append(paragraph)
    return "\n".join(out)


def mime_part(leaf: Any) -> dict:
    """One leaf as a mail part (6): its media type, its bytes, its file name.
    Text parts are carried as UTF-8 (6: a part's text has no charset)."""
    import email.policy
    media_type = leaf.get_content_type()
    if not MEDIA_TYPE_RE.fullmatch(media_type) or len(media_type) > MAX_MEDIA_TYPE:
        media_type = "application/octet-stream"
    if leaf.get_content_type() == "message/rfc822" and leaf.is_multipart():
        data = leaf.get_payload(0).as_bytes(policy=email.policy.SMTP)   # a forwarded message, whole
    elif leaf.get_content_maintype() == "message":  # a report's blocks (delivery-status ...), as sent
        data = leaf.as_bytes(policy=email.policy.SMTP).partition(b"\r\n\r\n")[2]
    else:
        data = leaf.get_payload(decode=True) or b""
        charset = (leaf.get_content_charset() or "utf-8").lower()
        if leaf.get_content_maintype() == "text" and charset not in ("utf-8", "us-ascii", "ascii"):
            with contextlib.suppress(LookupError, UnicodeError):
                data = data.decode(charset).encode("utf-8")
    part = {"type": media_type, "data": b64e(data)}
    name = header_text(leaf.get_filename() or "")
    name = re.split(r"[/\\]", name)[-1][:MAX_FILE_NAME]     # a name, never a path
    if name not in ("", ".", ".."):
        part["name"] = name
    return part


def replied_id(message: Any) -> str | None:
    """The Secral mail a message answers: In-Reply-To, else the last of its References."""
    for field, pick in (("In-Reply-To", 0), ("References", -1)):
        found = SECRAL_MESSAGE_ID.findall(str(message.get(field, "")))
        if found:
            return found[pick]
    return None


def display_name(message: Any, field: str) -> str | None:
    """The display name a client wrote beside an address, kept by the sender."""
    with contextlib.suppress(Exception):        # (a header the parser cannot read has none)
        addresses = message[field].addresses
        return header_text(addresses[0].display_name)[:MAX_SUBJECT] or None
    return None


class MailClientHandler(socketserver.StreamRequestHandler):
    """Shared line handling for the SMTP and POP3 sessions: a session is a
    verb table (VERBS: verb -> method), like the stdlib's `cmd`, and each
    method answers one command.  A method returning False ends the session."""

    timeout = MAIL_TIMEOUT
    VERBS: dict[str, str] = {}
    UNKNOWN = ""                                # the reply to a verb not in VERBS

    def send(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8") + b"\r\n")

    def read_line(self) -> str | None:
        line = self.rfile.readline(MAIL_LINE + 1)
        if not line or not line.endswith(b"\n"):
            return None                         # hung up, or a line past the limit
        return line.decode("utf-8", "replace").rstrip("\r\n")

    def handle(self) -> None:
        try:
            self.greet()
            while (line := self.read_line()) is not None:
                verb, _, arg = line.partition(" ")
                name = self.VERBS.get(verb.upper())
                refusal = self.UNKNOWN if name is None else self.refusal(verb.upper())
                if refusal is not None:
                    self.send(refusal)
                elif getattr(self, name)(arg.strip()) is False:
                    return
        except (OSError, ValueError):
            pass                               # the client went away
        finally:
            self.end()

    def greet(self) -> None:
        raise NotImplementedError

    def refusal(self, verb: str) -> str | None:
        """The reply to a known verb this session may not use now, or None."""
        return None

    def end(self) -> None:
        """Called once when the session ends, however it ends."""

    def login(self, name: str, password: str) -> str | None:
        """The local user (key) for these credentials.  A mail client may give
        the user name or the whole address (user@own-domain)."""
        shell: NodeShell = self.server.shell
        user, at, domain = name.partition("@")
        if at and domain.lower() != shell.identity.domain:
            user = ""
        with shell.lock:
            stored = shell.stores.passwords.get(user.lower()) if USER_RE.fullmatch(user) else None
            known = shell.stores.users.get(user.lower()) if stored else None
        return user.lower() if password_matches(stored, password) and known else None


class SmtpHandler(MailClientHandler):
    """SMTP submission (RFC 5321 subset, RFC 4954 AUTH PLAIN and LOGIN): one
    Secral mail per DATA."""

    VERBS = {"EHLO": "smtp_EHLO", "HELO": "smtp_HELO", "AUTH": "smtp_AUTH", "MAIL": "smtp_MAIL",
             "RCPT": "smtp_RCPT", "DATA": "smtp_DATA", "RSET": "smtp_RSET", "NOOP": "smtp_NOOP",
             "QUIT": "smtp_QUIT"}
    UNKNOWN = "500 5.5.2 Command not recognised"

    def greet(self) -> None:
        self.domain = self.server.shell.identity.domain
        self.user: str | None = None
        self.sender = self.recipient = None
        self.send(f"220 {self.domain} Secral ESMTP ready")

    def smtp_HELO(self, arg: str) -> None:
        self.sender = self.recipient = None
        self.send(f"250 {self.domain}")

    def smtp_EHLO(self, arg: str) -> None:
        self.sender = self.recipient = None
        self.send(f"250-{self.domain} greets {arg[:64] or 'you'}")
        for ext in ("AUTH PLAIN LOGIN", f"SIZE {MAIL_MESSAGE}", "8BITMIME", "SMTPUTF8"):
            self.send(f"250-{ext}")
        self.send("250 ENHANCEDSTATUSCODES")

    def smtp_AUTH(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        credentials = None
        if mechanism.upper() == "PLAIN":
            if not initial:
                self.send("334 ")
                initial = self.read_line() or ""
            with contextlib.suppress(ValueError, binascii.Error):
                _, name, password = base64.b64decode(initial.strip(), validate=True).decode("utf-8").split("\0")
                credentials = name, password
        elif mechanism.upper() == "LOGIN":       # (draft-murchison-sasl-login: what clients send)
            with contextlib.suppress(ValueError, binascii.Error):
                if not initial:                 # (an initial response is the user name)
                    self.send("334 VXNlcm5hbWU6")    # "Username:"
                    initial = self.read_line() or ""
                name = base64.b64decode(initial.strip(), validate=True).decode("utf-8")
                self.send("334 UGFzc3dvcmQ6")    # "Password:"
                password = base64.b64decode((self.read_line() or "").strip(), validate=True).decode("utf-8")
                credentials = name, password
        else:
            self.send("504 5.5.4 Only AUTH PLAIN and AUTH LOGIN are supported")
            return
        user = self.login(*credentials) if credentials else None
        if user is not None:
            with self.server.shell.lock:
                self.user = self.server.shell.stores.users[user]["name"]
        self.send("235 2.7.0 Authentication successful" if user else
                  "535 5.7.8 Authentication credentials invalid")

    def smtp_MAIL(self, arg: str) -> None:
        if not self.user:
            self.send("530 5.7.0 Authentication required")
            return
        address = self._path(arg, "FROM")
        if address is None or address.lower() != f"{self.user}@{self.domain}".lower():
            self.send(f"553 5.7.1 You may send only as {self.user}@{self.domain}")
            return
        self.sender, self.recipient = address, None
        self.send("250 2.1.0 Sender OK")

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.send("503 5.5.1 MAIL first")
            return
        address = self._path(arg, "TO")
        if self.recipient is not None:
            self.send("452 4.5.3 A Secral mail has exactly one recipient")
        elif address is None:
            self.send("501 5.1.3 Bad recipient address syntax")
        else:
            user_part, _, host = address.rpartition("@")
            try:
                self.recipient = str(parse_address(f"{user_part}@{host.lower()}"))
                self.send("250 2.1.5 Recipient OK")
            except RemoteError:
                self.send(f"550 5.1.2 {address[:80]} is not a Secral address (user@node-...)")

    def smtp_DATA(self, arg: str) -> None:
        if self.recipient is None:
            self.send("503 5.5.1 RCPT first")
            return
        self.send("354 End data with <CR><LF>.<CR><LF>")
        data = self._read_data()
        if data is None:
            self.send(f"552 5.3.4 Message larger than {MAIL_MESSAGE} bytes")
        else:
            self.send(self._submit(data))
        self.sender = self.recipient = None

    def smtp_RSET(self, arg: str) -> None:
        self.sender = self.recipient = None
        self.send("250 2.0.0 Reset")

    def smtp_NOOP(self, arg: str) -> None:
        self.send("250 2.0.0 OK")

    def smtp_QUIT(self, arg: str) -> bool:
        self.send("221 2.0.0 Bye")
        return False

    @staticmethod
    def _path(arg: str, word: str) -> str | None:
        match = re.match(rf"{word}:\s*<([^<>\s]*)>", arg, re.IGNORECASE)
        return match.group(1) if match and "@" in match.group(1) else None

    def _read_data(self) -> bytes | None:
        lines, size = [], 0
        while True:
            line = self.rfile.readline(MAIL_MESSAGE + 3)     # whole lines: "." only at a line start
            if not line:
                raise ValueError("the client hung up during DATA")
            if line in (b".\r\n", b".\n"):
                return b"".join(lines) if size <= MAIL_MESSAGE else None
            size += len(line)
            if size <= MAIL_MESSAGE:
                lines.append(line[1:] if line.startswith(b".") else line)   # dot-stuffing

    def _submit(self, data: bytes) -> str:
        shell: NodeShell = self.server.shell
        try:
            mail = parse_submission(data)
        except SecralError as exc:
            return smtp_refusal(exc)
        except Exception as exc:               # a message the email package cannot read
            return f"554 5.6.0 Cannot read the message: {str(exc)[:200]}"
        try:                                    # (only what refused the mail may answer 5xx)
            mail_id = shell.call("submit", self.user, self.recipient, mail["subject"], mail["body"],
                                 parts=mail["parts"], in_reply_to=mail["in_reply_to"], local=mail["local"])
        except SecralError as exc:
            return smtp_refusal(exc)
        return f"250 2.0.0 Queued as {mail_id}"


def smtp_refusal(exc: SecralError) -> str:
    """Why a message was refused, as SMTP says it (RFC 3463 status codes)."""
    if exc.code == "too_large":
        return f"552 5.3.4 {exc.message}"
    if exc.code == "refused":                   # what the message is made of, not its text
        return f"554 5.6.1 {exc.message}"
    return f"554 5.6.0 {exc.message}"


class Pop3Handler(MailClientHandler):
    """POP3 (RFC 1939, RFC 2449 response codes) over a user's inbox; deletions
    happen at QUIT.  One session per mailbox at a time."""

    VERBS = {"USER": "pop_USER", "PASS": "pop_PASS", "CAPA": "pop_CAPA", "QUIT": "pop_QUIT",
             "STAT": "pop_STAT", "LIST": "pop_LIST", "UIDL": "pop_UIDL", "RETR": "pop_RETR",
             "TOP": "pop_TOP", "DELE": "pop_DELE", "RSET": "pop_RSET", "NOOP": "pop_NOOP"}
    UNKNOWN = "-ERR command not recognised"
    TRANSACTION = ("STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP")

    def greet(self) -> None:
        self.name: str | None = None
        self.user: str | None = None            # set once logged in and the mailbox is locked
        self.messages: list[tuple[str, bytes]] = []
        self.deleted: set[int] = set()
        self.send("+OK Secral POP3 ready")

    def end(self) -> None:
        if self.user is not None:
            self.server.unlock_user(self.user)

    def refusal(self, verb: str) -> str | None:
        if self.user is None and verb in self.TRANSACTION:   # (RFC 1939 section 3: states)
            return "-ERR USER and PASS first"
        return None

    def pop_USER(self, arg: str) -> None:
        self.name = arg
        self.send("+OK send PASS")

    def pop_PASS(self, arg: str) -> None:
        if self.name is None or self.user is not None:
            self.send("-ERR USER first")
            return
        user = self.login(self.name, arg)
        self.name = None
        if user is None:
            self.send("-ERR [AUTH] invalid user name or password")
        elif not self.server.lock_user(user):
            self.send("-ERR [IN-USE] the mailbox is open in another session")
        else:
            self.user = user
            self.messages = self._load(user)
            self.send(f"+OK {len(self.messages)} messages")

    def pop_CAPA(self, arg: str) -> None:
        self.send("+OK capabilities follow")
        for capa in ("USER", "UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "."):
            self.send(capa)

    def pop_QUIT(self, arg: str) -> bool:
        shell: NodeShell = self.server.shell
        with shell.lock:                        # the UPDATE state: deletions now (RFC 1939 section 6)
            for i in self.deleted:
                shell.stores.inbox.pop(self.messages[i][0], None)
        self.send(f"+OK bye, {len(self.deleted)} messages deleted" if self.user else "+OK bye")
        return False

    def _load(self, user: str) -> list[tuple[str, bytes]]:
        shell: NodeShell = self.server.shell
        with shell.lock:
            contacts = {parse_address(c["address"]).key: c["name"] for c in shell.stores.contacts.values()}
            entries = sorted(((k, e) for k, e in shell.stores.inbox.items() if e["user"] == user),
                             key=lambda ke: (ke[1]["received"], ke[0]))
        return [(key, message_of(e, from_name=contacts.get(Address(*e["from"].split("@")).key),
                                 replied=replied_domain(shell.stores, shell.identity.domain, e)))
                for key, e in entries]

    def _live(self) -> list[int]:
        return [i for i in range(len(self.messages)) if i not in self.deleted]

    def _pick(self, arg: str) -> int | None:
        if (arg.isascii() and arg.isdigit() and 1 <= int(arg) <= len(self.messages)
                and int(arg) - 1 not in self.deleted):
            return int(arg) - 1
        self.send("-ERR no such message")
        return None

    def pop_STAT(self, arg: str) -> None:
        live = self._live()
        self.send(f"+OK {len(live)} {sum(len(self.messages[i][1]) for i in live)}")

    def _listing(self, arg: str, show: Callable[[int], Any]) -> None:
        if arg:
            if (i := self._pick(arg)) is not None:
                self.send(f"+OK {i + 1} {show(i)}")
            return
        live = self._live()
        self.send(f"+OK {len(live)} messages")
        for i in live:
            self.send(f"{i + 1} {show(i)}")
        self.send(".")

    def pop_LIST(self, arg: str) -> None:
        self._listing(arg, lambda i: len(self.messages[i][1]))

    def pop_UIDL(self, arg: str) -> None:
        self._listing(arg, lambda i: self.messages[i][0])

    def pop_RETR(self, arg: str) -> None:
        if (i := self._pick(arg)) is not None:
            self._multiline(self.messages[i][1])

    def pop_TOP(self, arg: str) -> None:
        number, _, lines = arg.partition(" ")
        if not (lines.strip().isascii() and lines.strip().isdigit()):
            self.send("-ERR TOP needs a message number and a line count")
            return
        if (i := self._pick(number)) is not None:
            head, _, body = self.messages[i][1].partition(b"\r\n\r\n")
            self._multiline(head + b"\r\n\r\n" + b"".join(body.splitlines(True)[:int(lines)]))

    def _multiline(self, data: bytes) -> None:
        self.send(f"+OK {len(data)} octets")
        for line in data.split(b"\r\n")[:-1] if data.endswith(b"\r\n") else data.split(b"\r\n"):
            self.wfile.write((b"." + line if line.startswith(b".") else line) + b"\r\n")
        self.send(".")

    def pop_DELE(self, arg: str) -> None:
        if (i := self._pick(arg)) is not None:
            self.deleted.add(i)
            self.send(f"+OK message {i + 1} deleted")

    def pop_RSET(self, arg: str) -> None:
        self.deleted.clear()
        self.send(f"+OK {len(self.messages)} messages")

    def pop_NOOP(self, arg: str) -> None:
        self.send("+OK")


# -- IMAP: the grammar (RFC 3501 section 9) --------------------------------------
# So that Thunderbird, phones and every device of a user share one mailbox:
# IMAP4rev1 with IDLE, UIDPLUS, MOVE, UNSELECT, SPECIAL-USE and SASL-IR, over
# the same stores the node uses.  A command is read whole (its lines and
# literals, each bounded) before it is parsed; anything the grammar does not
# allow is answered BAD, and the session goes on.

IMAP_LINE = 65536               # bytes in one line of a command (a UID set can be long)
IMAP_LITERAL = 65536            # bytes in one literal, but APPEND's message (MAIL_MESSAGE)
IMAP_LITERAL_ANONYMOUS = 8192   # ... and before login: a user name or a password, no more
IMAP_COMMAND = MAIL_MESSAGE + 4 * IMAP_LITERAL   # bytes in one command, lines and literals:
                                # what one connection may make the node hold at a time
IMAP_LOGIN_TIMEOUT = 60         # seconds to log in: an idle stranger does not keep a slot
IMAP_DEPTH = 8                  # nested parentheses in a command
IMAP_TIMEOUT = 1800             # seconds a client may stay silent (RFC 3501 5.4: at least 30 minutes)
IMAP_IDLE_POLL = 0.25           # seconds between looks at the mailbox during IDLE
IMAP_RENDERED = 8 << 20         # bytes of rendered messages a session keeps at hand
IMAP_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")   # all kept, no keywords
IMAP_FOLDERS = {"INBOX": "", "Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash"}   # name -> use
IMAP_CAPABILITIES = "IMAP4rev1 AUTH=PLAIN SASL-IR IDLE UIDPLUS MOVE UNSELECT SPECIAL-USE ENABLE"


class ImapError(Exception):
    """A command the session answers with `status` (NO or BAD) and `text`."""

    def __init__(self, status: str, text: str, tag: str | None = None):
        super().__init__(text)
        self.status, self.text, self.tag = status, text, tag


def imap_bad(text: str) -> ImapError:
    return ImapError("BAD", text)


def imap_no(text: str) -> ImapError:
    return ImapError("NO", text)


class Atom(str):
    """A bare word of a command (an atom), as opposed to a quoted string."""


class ImapReader:
    """Reads one command: its first line, and for each literal `{n}` at a
    line's end a continuation request, n bytes, and the next line (RFC 3501
    7.5).  Returns the pieces: text lines (bytes) and literals (bytearray).
    A literal over its limit, or past the command's, is refused before the
    client sends it (no "+"); before login only short ones are taken."""

    def __init__(self, rfile: Any, send: Callable[[str], None], authenticated: Callable[[], bool]):
        self.rfile, self.send, self.authenticated = rfile, send, authenticated

    def line(self) -> bytes | None:
        line = self.rfile.readline(IMAP_LINE + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise ConnectionError("a command line past the limit")     # no way to find the next one
        return line.rstrip(b"\r\n")

    def read(self) -> list | None:
        pieces: list = []
        line = self.line()
        total = 0
        while line is not None:
            literal = re.search(rb"\{([0-9]{1,10})\}$", line)
            if literal is None:
                return pieces + [line]
            size = int(literal.group(1))
            first = pieces[0] if pieces else line
            if not self.authenticated():
                limit = IMAP_LITERAL_ANONYMOUS
            elif re.match(rb"\S+ +APPEND ", first, re.IGNORECASE):
                limit = MAIL_MESSAGE
            else:
                limit = IMAP_LITERAL
            total += len(line) + size
            if size > limit or total > IMAP_COMMAND:
                raise ImapError("NO", f"[TOOBIG] a literal of {size} bytes; the limit is {limit}",
                                first.split(b" ", 1)[0].decode("ascii", "replace"))
            self.send("+ Ready for literal data")
            data = self.rfile.read(size)
            if len(data) < size:
                return None
            pieces += [line[:literal.start()], bytearray(data)]
            line = self.line()
        return None


def imap_tokens(pieces: list) -> list:
    """The pieces of a command as tokens: Atom, str (quoted), bytes (literal),
    and lists for parentheses.  An atom may hold a bracketed section with
    spaces (BODY[HEADER.FIELDS (FROM TO)]<0.100>), as FETCH needs."""
    stack: list[list] = [[]]
    for piece in pieces:
        if isinstance(piece, bytearray):
            stack[-1].append(bytes(piece))
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            raise imap_bad("a command must be UTF-8") from None
        i = 0
        while i < len(text):
            c = text[i]
            if c == " ":
                i += 1
            elif c == "(":
                if len(stack) > IMAP_DEPTH:
                    raise imap_bad("too deeply nested")
                stack.append([])
                i += 1
            elif c == ")":
                if len(stack) == 1:
                    raise imap_bad("unbalanced parenthesis")
                done = stack.pop()
                stack[-1].append(done)
                i += 1
            elif c == '"':
                value, i = _quoted(text, i)
                stack[-1].append(value)
            else:
                value, i = _atom(text, i)
                stack[-1].append(Atom(value))
    if len(stack) != 1:
        raise imap_bad("unbalanced parenthesis")
    return stack[0]


def _quoted(text: str, i: int) -> tuple[str, int]:
    """A quoted string from text[i] == '"': only \\" and \\\\ are escapes."""
    out, i = [], i + 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1] not in '"\\':
                raise imap_bad("a bad escape in a quoted string")
            c, i = text[i + 1], i + 1
        elif ord(c) < 0x20 or c == "\x7f":
            raise imap_bad("a control character in a quoted string")
        out.append(c)
        i += 1
    raise imap_bad("an unterminated quoted string")


def _atom(text: str, i: int) -> tuple[str, int]:
    start, depth = i, 0
    while i < len(text):
        c = text[i]
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise imap_bad("an unbalanced bracket")
        elif depth == 0 and c in ' ()"':
            break
        elif ord(c) < 0x20 or c in "{\x7f":
            raise imap_bad(f"{c!r} cannot appear in an atom")
        i += 1
    if depth:
        raise imap_bad("an unterminated bracket")
    return text[start:i], i


def imap_text(token: Any, what: str) -> str:
    """An astring (an atom, a quoted string or a literal) as text."""
    if isinstance(token, bytes):
        try:
            return token.decode("utf-8")
        except UnicodeDecodeError:
            raise imap_bad(f"{what} must be UTF-8") from None
    if not isinstance(token, str):
        raise imap_bad(f"{what} must be a string")
    return str(token)


def imap_atom(token: Any, what: str) -> str:
    if not isinstance(token, Atom):
        raise imap_bad(f"{what} must be an atom")
    return token.upper()


SEQUENCE_SET = re.compile(r"(\*|[1-9][0-9]{0,9})(:(\*|[1-9][0-9]{0,9}))?(,(\*|[1-9][0-9]{0,9})(:(\*|[1-9][0-9]{0,9}))?)*")


def sequence_set(token: Any) -> list[tuple[int | None, int | None]]:
    """A sequence set (RFC 3501 9: sequence-set) as ranges; None is "*"."""
    if not isinstance(token, Atom) or not SEQUENCE_SET.fullmatch(token):
        raise imap_bad("not a sequence set")
    ranges = []
    for item in token.split(","):
        low, _, high = item.partition(":")
        number = (lambda s: None if s == "*" else int(s))
        ranges.append((number(low), number(high or low)))
    return ranges


def in_sequence_set(ranges: list, value: int, largest: int) -> bool:
    """Whether `value` is in the set, "*" being `largest` (a:b is b:a too)."""
    for low, high in ranges:
        low, high = (largest if low is None else low), (largest if high is None else high)
        if min(low, high) <= value <= max(low, high):
            return True
    return False


def imap_pattern_matches(pattern: str, name: str) -> bool:
    """A LIST pattern (RFC 3501 6.3.8): * matches anything, % anything but
    the delimiter "/"; INBOX in any case.  The positions of `name` each
    prefix of the pattern can reach, one step per character: no pattern
    can make it backtrack, as a regular expression made of it could."""
    if name == "INBOX":
        pattern = pattern.upper()
    reach = {0}
    for c in pattern:
        if c == "*":
            reach = set(range(min(reach), len(name) + 1))
        elif c == "%":
            reach = {j for i in reach for j in range(i, len(name) + 1) if "/" not in name[i:j]}
        else:
            reach = {i + 1 for i in reach if i < len(name) and name[i] == c}
        if not reach:
            return False
    return len(name) in reach


def imap_string(value: str | bytes | None) -> bytes:
    """A value as an IMAP nstring: NIL, a quoted string, or a literal for
    what a quoted string cannot hold (line breaks, 8-bit bytes)."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8", "replace") if isinstance(value, str) else value
    if data.isascii() and len(data) < 1000 and not re.search(rb"[\x00-\x1f\x7f]", data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def imap_list(items: Sequence[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")" if items else b"NIL"


IMAP_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def imap_date_time(when: float) -> str:
    """INTERNALDATE's form, in UTC: "02-Dec-2026 21:55:00 +0000"."""
    t = time.gmtime(when)
    return f"{t.tm_mday:02d}-{IMAP_MONTHS[t.tm_mon - 1]}-{t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def imap_parse_date(token: Any, with_time: bool = False) -> int:
    """A date (SEARCH: "1-Feb-2026") or an APPEND date-time, as Unix time."""
    text = imap_text(token, "a date").strip()
    pattern = (r"( ?[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
               if with_time else r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
    match = re.fullmatch(pattern, text)
    months = [m.lower() for m in IMAP_MONTHS]
    if not match or match.group(2).lower() not in months:
        raise imap_bad(f"not a date: {text[:40]!r}")
    day, month, year = int(match.group(1)), months.index(match.group(2).lower()) + 1, int(match.group(3))
    try:
        if not with_time:
            return calendar.timegm((year, month, day, 0, 0, 0))
        hour, minute, second = (int(match.group(n)) for n in (4, 5, 6))
        offset = (int(match.group(8)) * 60 + int(match.group(9))) * 60 * (1 if match.group(7) == "+" else -1)
        datetime_check = time.strptime(f"{year}-{month}-{day} {hour}:{minute}:{second}", "%Y-%m-%d %H:%M:%S")
        return calendar.timegm(datetime_check) - offset
    except (ValueError, OverflowError):
        raise imap_bad(f"not a date: {text[:40]!r}") from None


class MimeEntity:
    """One entity of a message as IMAP addresses it (RFC 3501 6.4.5, 7.4.2):
    its header and body bytes, exactly as served, and its children: the
    parts of a multipart, the message inside a message/rfc822."""

    def __init__(self, raw: bytes, default_type: str = "text/plain", depth: int = 0):
        import email.parser
        import email.policy
        end = raw.find(b"\r\n\r\n")
        if raw.startswith(b"\r\n"):
            end = -2                            # no header at all
        self.header, self.body = (raw[:end + 4], raw[end + 4:]) if end != -1 else (raw, b"")
        self.fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(self.header)
        if "content-type" not in self.fields:
            self.fields.set_default_type(default_type)
        self.type = self.fields.get_content_type()
        self.parts: list[MimeEntity] = []      # a multipart's children
        self.message: MimeEntity | None = None  # a message/rfc822's message
        if depth > IMAP_DEPTH:
            return                              # deeper than anyone nests: served as a leaf
        boundary = self.fields.get_boundary()
        if self.type.startswith("multipart/") and boundary:
            child_type = "message/rfc822" if self.type == "multipart/digest" else "text/plain"
            self.parts = [MimeEntity(p, child_type, depth + 1) for p in self._split(boundary)]
        elif self.type == "message/rfc822":
            self.message = MimeEntity(self.body, "text/plain", depth + 1)

    def _split(self, boundary: str) -> list[bytes]:
        """The parts between the delimiter lines (RFC 2046 5.1.1)."""
        delimiter = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary.encode("utf-8", "replace"))
                               + rb"(--)?[ \t]*(?:\r\n|$)")
        parts, start = [], None
        for match in delimiter.finditer(self.body):
            if start is not None:
                parts.append(self.body[start:match.start()])
            if match.group(1):
                break
            start = match.end()
        return parts

    @property
    def is_multipart(self) -> bool:
        return bool(self.parts)

    def part(self, path: Sequence[int]) -> "MimeEntity":
        """The entity a part number names (1.2.3): numbers inside a
        message/rfc822 count the parts of the message it holds."""
        entity: MimeEntity = self
        for n, number in enumerate(path):
            if n and entity.message is not None:
                entity = entity.message
            if entity.is_multipart and 1 <= number <= len(entity.parts):
                entity = entity.parts[number - 1]
            elif not entity.is_multipart and number == 1:
                pass                            # a one-part message's part 1 is its body
            else:
                raise imap_no("no such body part")
        return entity

    def section(self, path: Sequence[int], text: str, fields: Sequence[str]) -> bytes:
        """The bytes of BODY[section] (RFC 3501 6.4.5 FETCH)."""
        entity = self.part(path) if path else self
        if not text:
            return (entity.header + entity.body) if not path else entity.body
        if text == "MIME":
            return entity.header
        if path:                                # HEADER and TEXT of a part: of the message it holds
            if entity.message is None:
                raise imap_no(f"part {'.'.join(map(str, path))} is not a message")
            entity = entity.message
        if text == "TEXT":
            return entity.body
        if text == "HEADER":
            return entity.header
        wanted = {f.lower() for f in fields}
        keep = (lambda name: name in wanted) if text == "HEADER.FIELDS" else (lambda name: name not in wanted)
        return b"".join(field for name, field in entity.header_fields() if keep(name)) + b"\r\n"

    def header_fields(self) -> list[tuple[str, bytes]]:
        """Each header field with its continuation lines, and its lowercase name."""
        fields: list[tuple[str, bytes]] = []
        for line in self.header.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            elif b":" in line:
                fields.append((line.split(b":", 1)[0].strip().decode("ascii", "replace").lower(), line))
        return fields

    # -- BODYSTRUCTURE and ENVELOPE (RFC 3501 7.4.2) ------------------------------

    def structure(self, extended: bool = True) -> bytes:
        if self.is_multipart:
            out = b"".join(p.structure(extended) for p in self.parts)
            out += b" " + imap_string(self.type.partition("/")[2])
            if extended:
                out += b" " + self._params() + b" " + self._disposition() + b" NIL"
            return b"(" + out + b")"
        maintype, _, subtype = self.type.partition("/")
        fields = [imap_string(maintype), imap_string(subtype), self._params(),
                  imap_string(self._field("content-id")), imap_string(self._field("content-description")),
                  imap_string((self._field("content-transfer-encoding") or "7bit").lower()),
                  str(len(self.body)).encode()]
        if self.type == "message/rfc822" and self.message is not None:
            fields += [self.message.envelope(), self.message.structure(extended),
                       str(self.body.count(b"\n")).encode()]
        elif maintype == "text":
            fields.append(str(self.body.count(b"\n")).encode())
        if extended:
            fields += [b"NIL", self._disposition(), b"NIL"]
        return b"(" + b" ".join(fields) + b")"

    def _field(self, name: str) -> str | None:
        value = self.fields.get(name)
        return None if value is None else re.sub(r"\r?\n[ \t]*", " ", str(value)).strip()

    def _params(self) -> bytes:
        params = self.fields.get_params(header="content-type") or []
        return imap_list([imap_string(str(k)) + b" " + imap_string(email_param(v)) for k, v in params[1:]])

    def _disposition(self) -> bytes:
        params = self.fields.get_params(header="content-disposition")
        if not params:
            return b"NIL"
        kind = params[0][0]
        rest = imap_list([imap_string(str(k)) + b" " + imap_string(email_param(v)) for k, v in params[1:]])
        return b"(" + imap_string(kind) + b" " + rest + b")"

    def envelope(self) -> bytes:
        def addresses(name: str, default: str | None = None) -> bytes:
            import email.utils
            values = self.fields.get_all(name) or ([] if default is None else self.fields.get_all(default) or [])
            pairs = email.utils.getaddresses([re.sub(r"\r?\n[ \t]*", " ", str(v)) for v in values])
            items = []
            for display, address in pairs:
                if not address:
                    continue
                mailbox, at, host = address.rpartition("@")
                items.append(imap_list([imap_string(display or None), b"NIL",
                                        imap_string(mailbox if at else address), imap_string(host if at else None)]))
            return imap_list(items)
        return imap_list([imap_string(self._field("date")), imap_string(self._field("subject")),
                          addresses("from"), addresses("sender", "from"), addresses("reply-to", "from"),
                          addresses("to"), addresses("cc"), addresses("bcc"),
                          imap_string(self._field("in-reply-to")), imap_string(self._field("message-id"))])


def email_param(value: Any) -> str:
    """A header parameter's value as text (RFC 2231 values come as a tuple)."""
    import email.utils
    return email.utils.collapse_rfc2231_value(value) if isinstance(value, tuple) else str(value)


@dataclasses.dataclass(frozen=True)
class FolderMessage:
    """One message of a folder as a session sees it: where it is stored
    (store, key), its UID, flags and INTERNALDATE."""
    uid: int
    store: str                                  # "inbox", "outbox" or "folders"
    key: str
    flags: frozenset
    date: int


class Folders:
    """A user's IMAP folders over the node's stores (Appendix B).  INBOX is
    the user's part of the inbox store, Sent their part of the outbox (what
    they sent from any client or the CLI), and every folder also holds the
    messages clients appended or copied there (the `folders` store, which
    also keeps each folder's UIDVALIDITY and next UID).  A mail's UID and
    flags live in its inbox or outbox entry, so every client and `secral.py
    inbox` share them: \\Seen is the entry's `unread` turned round."""

    def __init__(self, shell: "NodeShell", user: str):
        self.shell, self.user = shell, user
        self.rendered: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()

    @property
    def stores(self) -> Stores:
        return self.shell.stores

    @staticmethod
    def name(folder: str) -> str | None:
        """The folder's own spelling (INBOX is case-insensitive), or None."""
        if folder.upper() == "INBOX":
            return "INBOX"
        return folder if folder in IMAP_FOLDERS else None

    def meta(self, folder: str) -> dict:
        """The folder's UIDVALIDITY and next UID, made on first use."""
        key = f"{self.user}/{folder}"
        meta = self.stores.folders.get(key)
        if meta is None:
            meta = {"uidvalidity": int(time.time()) & 0x7FFFFFFF or 1, "uidnext": 1}
            self.stores.folders[key] = meta
        return meta

    def messages(self, folder: str) -> list[FolderMessage]:
        """The folder's messages by UID; mail new to IMAP gets its UID now.
        Call with the shell's lock held."""
        meta = self.meta(folder)
        found: list[FolderMessage] = []
        fresh: list[tuple[tuple, str, str, dict]] = []
        for store, key, entry in self._entries(folder):
            if "uid" in entry:
                found.append(self._message(store, key, entry))
            else:
                fresh.append(((entry.get("received", entry.get("created", 0)), key), store, key, entry))
        if fresh:
            with self.stores.group():
                for _, store, key, entry in sorted(fresh):
                    entry["uid"], meta["uidnext"] = meta["uidnext"], meta["uidnext"] + 1
                    getattr(self.stores, store)[key] = entry
                    found.append(self._message(store, key, entry))
                self.stores.folders[f"{self.user}/{folder}"] = meta
        return sorted(found, key=lambda m: m.uid)

    def _entries(self, folder: str) -> Iterator[tuple[str, str, dict]]:
        if folder == "INBOX":
            yield from (("inbox", k, e) for k, e in self.stores.inbox.items() if e.get("user") == self.user)
        elif folder == "Sent":
            yield from (("outbox", k, e) for k, e in self.stores.outbox.items()
                        if not e.get("hidden") and parse_address(e["from"]).user.lower() == self.user)
        prefix = f"{self.user}/{folder}/"
        yield from (("folders", k, e) for k, e in self.stores.folders.items() if k.startswith(prefix))

    @staticmethod
    def _message(store: str, key: str, entry: dict) -> FolderMessage:
        flags = set(entry.get("flags", ["\\Seen"] if store == "outbox" else []))
        if store == "inbox":
            flags.discard("\\Seen")
            if not entry.get("unread"):
                flags.add("\\Seen")
        date = entry.get("date", entry.get("received", entry.get("created", 0)))
        return FolderMessage(entry["uid"], store, key, frozenset(flags), int(date))

    def changed(self) -> None:
        """Wake every session in IDLE: this one changed a mailbox."""
        self.shell.generation += 1
        self.shell.changed.notify_all()

    # -- the messages' bytes -----------------------------------------------------

    def raw(self, message: FolderMessage) -> bytes:
        """A message's bytes, the same every time (message_of)."""
        cache_key = (message.store, message.key)
        if cache_key in self.rendered:
            self.rendered.move_to_end(cache_key)
            return self.rendered[cache_key]
        with self.shell.lock:
            entry = getattr(self.stores, message.store).get(message.key)
            contacts = {parse_address(c["address"]).key: c["name"] for c in self.stores.contacts.values()}
            replied = replied_domain(self.stores, self.shell.identity.domain, entry) if entry else None
        if entry is None:
            raise imap_no("the message was deleted meanwhile")
        if message.store == "folders":
            data = base64.b64decode(entry["raw"])
        elif message.store == "inbox":
            data = message_of(entry, from_name=contacts.get(Address(*entry["from"].split("@")).key),
                              replied=replied)
        else:                                   # (the names the sender's client wrote come first)
            data = message_of(entry, to_name=entry.get("to_name") or contacts.get(
                Address(*entry["to"].split("@")).key), replied=replied)
        self.rendered[cache_key] = data
        while len(self.rendered) > 1 and sum(map(len, self.rendered.values())) > IMAP_RENDERED:
            self.rendered.popitem(last=False)
        return data

    # -- changes -----------------------------------------------------------------

    def store_flags(self, message: FolderMessage, mode: str, flags: frozenset) -> FolderMessage:
        """Change a message's flags as STORE says ("" sets them, "+" adds,
        "-" removes) on the entry as it is now, the shell's lock held:
        another session or the CLI may have changed it since the caller
        looked.  Keywords are not kept."""
        store = getattr(self.stores, message.store)
        entry = store.get(message.key)
        if entry is None:
            return message
        now = self._message(message.store, message.key, entry).flags
        flags = {"": flags, "+": now | flags, "-": now - flags}[mode]
        kept = sorted(f for f in flags if f in IMAP_FLAGS)
        if message.store == "inbox":
            entry["unread"] = "\\Seen" not in kept
            kept.remove("\\Seen") if "\\Seen" in kept else None
        entry["flags"] = kept
        store[message.key] = entry
        return self._message(message.store, message.key, entry)

    def holds(self, message: FolderMessage) -> bool:
        """Whether the message is still there (the shell's lock held)."""
        entry = getattr(self.stores, message.store).get(message.key)
        return entry is not None and not entry.get("hidden")

    def expunge(self, message: FolderMessage) -> None:
        """Remove one message (the shell's lock held).  A received mail goes
        as `inbox_delete` takes it (its ack stays, 7.4); a sent one leaves
        Sent, and the outbox too once nothing waits for its ack."""
        if message.store == "outbox":
            entry = self.stores.outbox.get(message.key)
            if entry is not None and entry["status"] in OUTBOX_WAITING:
                entry["hidden"] = True
                self.stores.outbox[message.key] = entry
                return
        getattr(self.stores, message.store).pop(message.key, None)

    def append(self, folder: str, data: bytes, flags: frozenset, date: int) -> int:
        """Add a message a client appended or copied (the shell's lock held).
        A client's copy of what it just sent through SMTP is the mail in Sent
        already (by its Message-ID): it is not kept twice."""
        if folder == "Sent":
            sent = self._sent_copy(data)
            if sent is not None:
                return sent
        meta = self.meta(folder)
        uid, meta["uidnext"] = meta["uidnext"], meta["uidnext"] + 1
        with self.stores.group():
            self.stores.folders[f"{self.user}/{folder}/{uid}"] = {
                "uid": uid, "raw": b64e(data), "flags": sorted(f for f in flags if f in IMAP_FLAGS), "date": date}
            self.stores.folders[f"{self.user}/{folder}"] = meta
        return uid

    def _sent_copy(self, data: bytes) -> int | None:
        match = re.search(rb"^message-id:[ \t]*(<[^>\r\n]{1,995}>)", data.split(b"\r\n\r\n", 1)[0],
                          re.IGNORECASE | re.MULTILINE)
        if match is None:
            return None
        wanted = match.group(1).decode("utf-8", "replace")
        for message in self.messages("Sent"):
            entry = self.stores.outbox.get(message.key) if message.store == "outbox" else None
            if entry is not None and wanted in (entry.get("message_id"),
                                                message_id(entry["id"], self.shell.identity.domain)):
                return message.uid
        return None


class SearchCandidate:
    """One message as SEARCH looks at it; its bytes are rendered only if a key needs them."""

    def __init__(self, seq: int, message: FolderMessage, folders: Folders):
        self.seq, self.message, self.folders = seq, message, folders

    @functools.cached_property
    def raw(self) -> bytes:
        return self.folders.raw(self.message)

    @functools.cached_property
    def parsed(self) -> Any:
        """The message as the email package reads it; one it cannot read is
        searched as an empty message, never an error for the whole folder."""
        import email.message
        import email.parser
        import email.policy
        try:
            return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.raw)
        except Exception:
            return email.message.EmailMessage()

    def header(self, name: str) -> str:
        with contextlib.suppress(Exception):    # (a header the parser cannot read matches nothing)
            return " ".join(str(v) for v in self.parsed.get_all(name, []))
        return ""

    @functools.cached_property
    def text(self) -> str:
        texts = []
        with contextlib.suppress(Exception):    # (a tree the parser cannot walk has no text)
            for leaf in mime_leaves(self.parsed):
                if leaf.get_content_maintype() == "text":
                    with contextlib.suppress(Exception):
                        texts.append(leaf.get_content())
        return "\n".join(texts)

    def sent(self) -> int:
        import email.utils
        with contextlib.suppress(Exception):
            return int(email.utils.parsedate_to_datetime(self.header("date")).timestamp())
        return self.message.date


Test = Callable[[SearchCandidate], bool]


class ImapSearch:
    """The search keys of RFC 3501 6.4.4, parsed once into one test."""

    FLAG_KEYS = {"ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True), "DRAFT": ("\\Draft", True),
                 "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True), "UNANSWERED": ("\\Answered", False),
                 "UNDELETED": ("\\Deleted", False), "UNDRAFT": ("\\Draft", False),
                 "UNFLAGGED": ("\\Flagged", False), "UNSEEN": ("\\Seen", False)}
    HEADER_KEYS = ("BCC", "CC", "FROM", "SUBJECT", "TO")
    DAY = 86400

    def __init__(self, tokens: list, largest_seq: int, largest_uid: int):
        self.tokens, self.largest_seq, self.largest_uid = list(tokens), largest_seq, largest_uid
        self.depth = 0                          # NOT, OR and parentheses inside each other
        self.test = self.all_of(self.tokens)

    def nested(self, parse: Callable[[], Test]) -> Test:
        self.depth += 1
        if self.depth > 4 * IMAP_DEPTH:
            raise imap_bad("the search is nested too deeply")
        try:
            return parse()
        finally:
            self.depth -= 1

    def all_of(self, tokens: list) -> Test:
        if not tokens:
            raise imap_bad("a search needs a key")
        queue = collections.deque(tokens)
        tests = []
        while queue:
            tests.append(self.key(queue))
        return lambda c: all(t(c) for t in tests)

    def key(self, queue: collections.deque) -> Test:
        token = queue.popleft()
        if isinstance(token, list):
            return self.nested(lambda: self.all_of(token))
        if isinstance(token, Atom) and SEQUENCE_SET.fullmatch(token):
            ranges = sequence_set(token)
            return lambda c: in_sequence_set(ranges, c.seq, self.largest_seq)
        word = imap_atom(token, "a search key")
        arg = (lambda what: self._arg(queue, what))
        if word in ("ALL", "OLD"):
            return lambda c: True
        if word in ("NEW", "RECENT"):           # nothing is \Recent here
            return lambda c: False
        if word in self.FLAG_KEYS:
            flag, wanted = self.FLAG_KEYS[word]
            return lambda c: (flag in c.message.flags) == wanted
        if word in ("KEYWORD", "UNKEYWORD"):    # no keyword is ever kept
            arg("a keyword")
            return lambda c: word == "UNKEYWORD"
        if word in self.HEADER_KEYS:
            needle = imap_text(arg("a string"), word).lower()
            return lambda c: needle in c.header(word).lower()
        if word == "HEADER":
            name, needle = imap_text(arg("a field name"), word), imap_text(arg("a string"), word).lower()
            return lambda c: (name.lower() in (str(k).lower() for k in c.parsed.keys())
                              and needle in c.header(name).lower())
        if word == "BODY":
            needle = imap_text(arg("a string"), word).lower()
            return lambda c: needle in c.text.lower()
        if word == "TEXT":
            needle = imap_text(arg("a string"), word).lower()
            return lambda c: needle in c.text.lower() or needle in c.raw.decode("utf-8", "replace").lower()
        if word in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
            return self._date(word, imap_parse_date(arg("a date")))
        if word in ("LARGER", "SMALLER"):
            size = arg("a number")
            if not (isinstance(size, Atom) and re.fullmatch(r"[0-9]{1,10}", size)):
                raise imap_bad(f"{word} needs a number")
            return (lambda c: len(c.raw) > int(size)) if word == "LARGER" else (lambda c: len(c.raw) < int(size))
        if word == "UID":
            ranges = sequence_set(arg("a UID set"))
            return lambda c: in_sequence_set(ranges, c.message.uid, self.largest_uid)
        if word == "NOT":
            if not queue:
                raise imap_bad("NOT needs a key")
            inner = self.nested(lambda: self.key(queue))
            return lambda c: not inner(c)
        if word == "OR":
            if len(queue) < 2:
                raise imap_bad("OR needs two keys")
            first = self.nested(lambda: self.key(queue))
            if not queue:
                raise imap_bad("OR needs two keys")
            second = self.nested(lambda: self.key(queue))
            return lambda c: first(c) or second(c)
        raise imap_bad(f"unknown search key {word[:20]}")

    @staticmethod
    def _arg(queue: collections.deque, what: str) -> Any:
        if not queue:
            raise imap_bad(f"the search key needs {what}")
        return queue.popleft()

    def _date(self, word: str, day: int) -> Test:
        when = (lambda c: c.sent()) if word.startswith("SENT") else (lambda c: c.message.date)
        if word.endswith("BEFORE"):
            return lambda c: when(c) < day
        if word.endswith("ON"):
            return lambda c: day <= when(c) < day + self.DAY
        return lambda c: when(c) >= day


FETCH_MACROS = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
                "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
                "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}
FETCH_PLAIN = ("FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY",
               "RFC822", "RFC822.HEADER", "RFC822.TEXT")
FETCH_SECTION = re.compile(r"(BODY|BODY\.PEEK)\[([^\]]*)\](?:<([0-9]{1,10})\.([0-9]{1,10})>)?", re.IGNORECASE)


@dataclasses.dataclass
class FetchItem:
    """One data item of a FETCH: its name in the reply and how to make it."""
    label: str                                  # as it appears in the reply
    kind: str                                   # FETCH_PLAIN's name, or "SECTION"
    path: tuple = ()
    text: str = ""                              # HEADER, HEADER.FIELDS[.NOT], TEXT, MIME or ""
    fields: tuple = ()
    partial: tuple[int, int] | None = None
    sets_seen: bool = False


def fetch_items(token: Any, uid: bool) -> list[FetchItem]:
    """The data items a FETCH asks for (RFC 3501 6.4.5); UID FETCH always answers UID."""
    names = FETCH_MACROS.get(token.upper(), [token]) if isinstance(token, Atom) else token
    if not isinstance(names, list) or not names:
        raise imap_bad("FETCH needs data items")
    items = [fetch_item(name) for name in names]
    if uid and not any(i.kind == "UID" for i in items):
        items.insert(0, FetchItem("UID", "UID"))
    return items


def fetch_item(token: Any) -> FetchItem:
    if not isinstance(token, Atom):
        raise imap_bad("a FETCH data item is an atom")
    word = token.upper()
    if word in FETCH_PLAIN:
        return FetchItem(word, word, sets_seen=word in ("RFC822", "RFC822.TEXT"))
    match = FETCH_SECTION.fullmatch(token)
    if match is None:
        raise imap_bad(f"unknown FETCH data item {token[:40]}")
    path, text, fields = parse_section(match.group(2))
    partial = (int(match.group(3)), int(match.group(4))) if match.group(3) is not None else None
    label = f"BODY[{match.group(2)}]" + (f"<{partial[0]}>" if partial else "")
    return FetchItem(label, "SECTION", tuple(path), text, tuple(fields), partial,
                     sets_seen=match.group(1).upper() == "BODY")


def parse_section(spec: str) -> tuple[list[int], str, list[str]]:
    """A section spec: part numbers, then HEADER, HEADER.FIELDS (...), TEXT or MIME."""
    head, _, rest = spec.partition(" ")
    words = head.split(".") if head else []
    path = []
    while words and re.fullmatch(r"[1-9][0-9]{0,5}", words[0]):
        path.append(int(words.pop(0)))
    text = ".".join(words).upper()
    if text not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME") or (
            text == "MIME" and not path):
        raise imap_bad(f"not a section: {spec[:60]}")
    if not text.startswith("HEADER.FIELDS"):
        if rest:
            raise imap_bad(f"not a section: {spec[:60]}")
        return path, text, []
    tokens = imap_tokens([rest.encode()])
    if len(tokens) != 1 or not isinstance(tokens[0], list) or not tokens[0]:
        raise imap_bad("HEADER.FIELDS needs a list of field names")
    fields = [imap_text(n, "a field name") for n in tokens[0]]
    if not all(re.fullmatch(r"[!-9;-~]+", f) for f in fields):
        raise imap_bad("not a field name")
    return path, text, fields


class ImapSelected:
    """The commands of IMAP's selected state (RFC 3501 6.4) and how a session
    keeps its view of the selected folder: `view` holds the UIDs by message
    sequence number, `known` the flags last reported.  Changes made by other
    sessions, the CLI or new mail are reported by sync(): EXISTS and flag
    changes at any command, EXPUNGE only where RFC 3501 7.4.1 allows it."""

    folders: Folders
    selected: str | None
    readonly: bool
    view: list[int]
    known: dict[int, FolderMessage]
    shell: "NodeShell"
    send: Callable[[str], None]
    wfile: Any

    def sync(self, expunges: bool = True) -> None:
        with self.shell.lock:
            current = {m.uid: m for m in self.folders.messages(self.selected)}
        if expunges:
            for seq in range(len(self.view), 0, -1):
                if self.view[seq - 1] not in current:
                    self.known.pop(self.view.pop(seq - 1), None)
                    self.send(f"* {seq} EXPUNGE")
        top = self.view[-1] if self.view else 0
        new = sorted(uid for uid in current if uid > top)
        if new:
            self.view += new
            self.send(f"* {len(self.view)} EXISTS")
        for seq, uid in enumerate(self.view, 1):
            message = current.get(uid)
            if message is None:
                continue
            if uid in self.known and self.known[uid].flags != message.flags:
                self.send(f"* {seq} FETCH (UID {uid} FLAGS ({' '.join(sorted(message.flags))}))")
            self.known[uid] = message

    def targets(self, token: Any, uid: bool) -> list[tuple[int, FolderMessage]]:
        """The messages a sequence set names, with their sequence numbers.
        A message another session expunged meanwhile is left out."""
        ranges = sequence_set(token)
        with self.shell.lock:
            current = {m.uid: m for m in self.folders.messages(self.selected)}
        if uid:
            largest = self.view[-1] if self.view else 0
            return [(seq, current[u]) for seq, u in enumerate(self.view, 1)
                    if u in current and in_sequence_set(ranges, u, largest)]
        if any(n is not None and n > len(self.view) for pair in ranges for n in pair) or not self.view:
            raise imap_bad("no such message")
        return [(seq, current[u]) for seq, u in enumerate(self.view, 1)
                if u in current and in_sequence_set(ranges, seq, len(self.view))]

    # -- FETCH (6.4.5) --------------------------------------------------------------

    def fetch(self, args: list, uid: bool) -> str:
        if len(args) != 2:
            raise imap_bad("FETCH needs a sequence set and data items")
        items = fetch_items(args[1], uid)
        for seq, message in self.targets(args[0], uid):
            if any(i.sets_seen for i in items) and not self.readonly and "\\Seen" not in message.flags:
                with self.shell.lock:
                    message = self.folders.store_flags(message, "+", frozenset({"\\Seen"}))
                    self.folders.changed()
                self.known[message.uid] = message
                if not any(i.kind == "FLAGS" for i in items):
                    items = items + [FetchItem("FLAGS", "FLAGS")]
            entity = None
            values = []
            for item in items:
                if item.kind in ("ENVELOPE", "BODYSTRUCTURE", "BODY", "SECTION", "RFC822.HEADER",
                                 "RFC822.TEXT") and entity is None:
                    entity = MimeEntity(self.folders.raw(message))
                values.append(item.label.encode() + b" " + self.fetch_value(item, message, entity))
            self.wfile.write(f"* {seq} FETCH (".encode() + b" ".join(values) + b")\r\n")
        return "FETCH completed"

    def fetch_value(self, item: FetchItem, message: FolderMessage, entity: MimeEntity | None) -> bytes:
        if item.kind == "FLAGS":
            return f"({' '.join(sorted(message.flags))})".encode()
        if item.kind == "UID":
            return str(message.uid).encode()
        if item.kind == "INTERNALDATE":
            return imap_string(imap_date_time(message.date))
        if item.kind in ("RFC822.SIZE", "RFC822"):
            raw = self.folders.raw(message)
            return str(len(raw)).encode() if item.kind == "RFC822.SIZE" else imap_string(raw)
        assert entity is not None
        if item.kind == "ENVELOPE":
            return entity.envelope()
        if item.kind in ("BODYSTRUCTURE", "BODY"):
            return entity.structure(extended=item.kind == "BODYSTRUCTURE")
        if item.kind == "RFC822.HEADER":
            return imap_string(entity.header)
        if item.kind == "RFC822.TEXT":
            return imap_string(entity.body)
        data = entity.section(item.path, item.text, item.fields)
        if item.partial is not None:
            data = data[item.partial[0]:item.partial[0] + item.partial[1]]
        return imap_string(bytes(data))

    # -- STORE, SEARCH, COPY and MOVE, EXPUNGE (6.4) --------------------------------

    def store(self, args: list, uid: bool) -> str:
        if len(args) != 3:
            raise imap_bad("STORE needs a sequence set, an item and flags")
        mode = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", imap_atom(args[1], "a STORE item"))
        if mode is None:
            raise imap_bad("STORE takes FLAGS, +FLAGS or -FLAGS (.SILENT)")
        flags = imap_flags(args[2])
        if self.readonly:
            raise imap_no("[READ-ONLY] the folder was opened with EXAMINE")
        targets = self.targets(args[0], uid)
        with self.shell.lock:
            for n, (seq, message) in enumerate(targets):
                targets[n] = (seq, self.folders.store_flags(message, mode.group(1), frozenset(flags)))
                self.known[message.uid] = targets[n][1]
            self.folders.changed()
        if not mode.group(2):
            for seq, message in targets:
                self.send(f"* {seq} FETCH ({f'UID {message.uid} ' if uid else ''}"
                          f"FLAGS ({' '.join(sorted(message.flags))}))")
        return "STORE completed"

    def search(self, args: list, uid: bool) -> str:
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if imap_text(args[1], "a charset").upper() not in ("UTF-8", "US-ASCII"):
                raise imap_no("[BADCHARSET (UTF-8 US-ASCII)] only UTF-8 is searched")
            args = args[2:]
        largest = self.view[-1] if self.view else 0
        test = ImapSearch(args, len(self.view), largest).test
        with self.shell.lock:
            current = {m.uid: m for m in self.folders.messages(self.selected)}
        found = [str(u if uid else seq) for seq, u in enumerate(self.view, 1)
                 if u in current and test(SearchCandidate(seq, current[u], self.folders))]
        self.send(" ".join(["* SEARCH"] + found))
        return "SEARCH completed"

    def copy(self, args: list, uid: bool, move: bool = False) -> str:
        if len(args) != 2:
            raise imap_bad("COPY needs a sequence set and a folder")
        folder = Folders.name(imap_text(args[1], "a folder"))
        if folder is None:
            raise imap_no("[TRYCREATE] no such folder")
        if move and self.readonly:
            raise imap_no("[READ-ONLY] the folder was opened with EXAMINE")
        targets = self.targets(args[0], uid)
        copies = [(message, self.folders.raw(message)) for _, message in targets]
        with self.shell.lock:                   # (another session may have moved some meanwhile)
            copies = [(message, raw) for message, raw in copies if self.folders.holds(message)]
            new = [self.folders.append(folder, raw, message.flags, message.date) for message, raw in copies]
            validity = self.folders.meta(folder)["uidvalidity"]
            if move:
                for (message, _), uid_there in zip(copies, new):
                    if (folder, uid_there) != (self.selected, message.uid):   # not onto itself
                        self.folders.expunge(message)
            self.folders.changed()
        code = (f"[COPYUID {validity} {','.join(str(m.uid) for m, _ in copies)} {','.join(map(str, new))}]"
                if copies else "")
        if move:
            if code:
                self.send(f"* OK {code}")
            self.sync(expunges=True)
            return "MOVE completed"
        return f"{code} COPY completed".strip()

    def expunge(self, only: set[int] | None = None) -> None:
        """Remove the messages flagged \\Deleted (of `only`, for UID EXPUNGE)."""
        if self.readonly:
            raise imap_no("[READ-ONLY] the folder was opened with EXAMINE")
        with self.shell.lock:
            for message in self.folders.messages(self.selected):
                if "\\Deleted" in message.flags and (only is None or message.uid in only):
                    self.folders.expunge(message)
            self.folders.changed()


def imap_flags(token: Any) -> frozenset:
    """A flag list: the system flags, spelled as RFC 3501 does; keywords are
    allowed and not kept (PERMANENTFLAGS says which are)."""
    tokens = token if isinstance(token, list) else [token]
    flags = set()
    for flag in tokens:
        if not isinstance(flag, Atom):
            raise imap_bad("a flag is an atom")
        spelled = {f.lower(): f for f in IMAP_FLAGS}.get(flag.lower())
        if flag.startswith("\\") and spelled is None:
            raise imap_bad(f"not a flag that can be stored: {flag[:20]}")
        if spelled:
            flags.add(spelled)
    return frozenset(flags)


IMAP_TAG = re.compile(r"[!#$&',\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]{1,64}")


class ImapHandler(ImapSelected, MailClientHandler):
    """IMAP4rev1 (RFC 3501) with IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE
    (RFC 6851), UNSELECT (RFC 3691), SPECIAL-USE (RFC 6154) and SASL-IR
    (RFC 4959): one session.  COMMANDS says which state allows what, and is
    the one place that refuses a command out of turn.  Any number of
    sessions may have a folder open; each sees what the others change."""

    timeout = IMAP_TIMEOUT

    def handle(self) -> None:
        self.state, self.user, self.selected, self.readonly = "not_authenticated", None, None, False
        self.view, self.known = [], {}
        self.folders: Folders = None            # type: ignore[assignment]   (set at login)
        self.shell = self.server.shell
        reader = ImapReader(self.rfile, self.send, lambda: self.state != "not_authenticated")
        self.connection.settimeout(IMAP_LOGIN_TIMEOUT)
        try:
            self.send(f"* OK [CAPABILITY {IMAP_CAPABILITIES}] Secral IMAP4rev1 ready")
            while True:
                try:
                    pieces = reader.read()
                except ImapError as exc:        # a literal too large, refused before it came
                    self.send(f"{exc.tag} {exc.status} {exc.text}")
                    continue
                if pieces is None or self.command(pieces) is False:
                    return
        except (OSError, ValueError, ConnectionError):
            pass                                # the client went away, or broke the line limit

    def command(self, pieces: list) -> bool | None:
        """Parse and run one command; any error is answered, never raised."""
        first = pieces[0].split(b" ", 1)[0].decode("ascii", "replace") if pieces else ""
        tag = first if IMAP_TAG.fullmatch(first) else "*"     # (for a command that does not parse)
        try:
            tokens = imap_tokens(pieces)
            if not tokens or not isinstance(tokens[0], Atom) or not IMAP_TAG.fullmatch(tokens[0]):
                raise imap_bad("a command starts with a tag")
            tag = tokens[0]
            if len(tokens) < 2 or not isinstance(tokens[1], Atom):
                raise imap_bad("a command name follows the tag")
            name, args = tokens[1].upper(), tokens[2:]
            if name == "UID":
                if not args or not isinstance(args[0], Atom) or args[0].upper() not in self.UID_COMMANDS:
                    raise imap_bad("UID takes FETCH, STORE, SEARCH, COPY, MOVE or EXPUNGE")
                name, args = "UID " + args[0].upper(), args[1:]
            if name not in self.COMMANDS:
                raise imap_bad(f"unknown command {name[:20]}")
            handler, states = self.COMMANDS[name]
            if self.state not in states:
                raise imap_bad(f"{name} is not allowed {self.STATE_WORDS[self.state]}")
            self.send(f"{tag} OK {handler(self, args)}")
            if self.state == "logout":
                return False
        except ImapError as exc:
            self.send(f"{tag} {exc.status} {exc.text}")
        except SecralError as exc:
            self.send(f"{tag} NO {exc.message}")
        except (OSError, ConnectionError):
            raise
        except Exception:                       # a bug here must cost one command, not the session
            log.exception("IMAP: unexpected error in a command")
            self.send(f"{tag} NO [SERVERBUG] the command failed; the node's log says why")
        return None

    # -- any state (6.1) -------------------------------------------------------------

    def imap_capability(self, args: list) -> str:
        self.send(f"* CAPABILITY {IMAP_CAPABILITIES}")
        return "CAPABILITY completed"

    def imap_noop(self, args: list) -> str:
        if self.state == "selected":
            self.sync()
        return "NOOP completed"

    def imap_logout(self, args: list) -> str:
        self.send("* BYE Secral IMAP4rev1 logging out")
        self.state = "logout"                   # the tagged OK, then the end (RFC 3501 6.1.3)
        return "LOGOUT completed"

    # -- not authenticated (6.2) ----------------------------------------------------

    def imap_login(self, args: list) -> str:
        if len(args) != 2:
            raise imap_bad("LOGIN needs a user name and a password")
        return self.logged_in(self.login(imap_text(args[0], "the user name"), imap_text(args[1], "the password")))

    def imap_authenticate(self, args: list) -> str:
        if not args or imap_atom(args[0], "a mechanism") != "PLAIN" or len(args) > 2:
            raise imap_no("only AUTHENTICATE PLAIN is supported")
        initial = imap_text(args[1], "the initial response") if len(args) == 2 else None
        if initial is None:
            self.send("+ ")
            initial = (self.rfile.readline(IMAP_LINE + 1) or b"").decode("utf-8", "replace").strip()
        if initial == "*":
            raise imap_bad("AUTHENTICATE cancelled")
        try:
            decoded = base64.b64decode("" if initial == "=" else initial, validate=True).decode("utf-8")
            authorize, name, password = decoded.split("\0")
        except (ValueError, binascii.Error):
            raise imap_bad("not a PLAIN response (RFC 4616)") from None
        if authorize and authorize != name:
            raise imap_no("[AUTHORIZATIONFAILED] one may log in only as oneself")
        return self.logged_in(self.login(name, password))

    def logged_in(self, user: str | None) -> str:
        if user is None:
            raise imap_no("[AUTHENTICATIONFAILED] invalid user name or password")
        self.user, self.state, self.folders = user, "authenticated", Folders(self.shell, user)
        self.connection.settimeout(IMAP_TIMEOUT)
        return f"[CAPABILITY {IMAP_CAPABILITIES}] logged in"

    # -- authenticated (6.3) ---------------------------------------------------------

    def imap_enable(self, args: list) -> str:
        self.send("* ENABLED")                  # (nothing this server offers needs enabling)
        return "ENABLE completed"

    def imap_select(self, args: list, readonly: bool = False) -> str:
        if len(args) != 1:
            raise imap_bad("SELECT needs one folder")
        folder = Folders.name(imap_text(args[0], "a folder"))
        self.state, self.selected, self.view, self.known = "authenticated", None, [], {}
        if folder is None:
            raise imap_no("[NONEXISTENT] no such folder")
        self.selected, self.readonly, self.state = folder, readonly, "selected"
        with self.shell.lock:
            messages = self.folders.messages(folder)
            meta = self.folders.meta(folder)
        self.view, self.known = [m.uid for m in messages], {m.uid: m for m in messages}
        flags = " ".join(IMAP_FLAGS)
        self.send(f"* FLAGS ({flags})")
        self.send(f"* OK [PERMANENTFLAGS ({flags})] all flags are kept")
        self.send(f"* {len(messages)} EXISTS")
        self.send("* 0 RECENT")
        unseen = [n for n, m in enumerate(messages, 1) if "\\Seen" not in m.flags]
        if unseen:
            self.send(f"* OK [UNSEEN {unseen[0]}] the first unseen message")
        self.send(f"* OK [UIDVALIDITY {meta['uidvalidity']}] UIDs valid")
        self.send(f"* OK [UIDNEXT {meta['uidnext']}] the next UID")
        return f"[{'READ-ONLY' if readonly else 'READ-WRITE'}] {'EXAMINE' if readonly else 'SELECT'} completed"

    def imap_examine(self, args: list) -> str:
        return self.imap_select(args, readonly=True)

    def imap_list(self, args: list, lsub: bool = False) -> str:
        if args and isinstance(args[0], list) and not lsub:      # LIST (SPECIAL-USE) "" "*" (RFC 5258)
            args = args[1:]
        if len(args) >= 4 and isinstance(args[2], Atom) and args[2].upper() == "RETURN":
            args = args[:2]
        if len(args) != 2:
            raise imap_bad("LIST needs a reference and a pattern")
        pattern = imap_text(args[0], "a reference") + imap_text(args[1], "a pattern")
        if not pattern:
            self.send('* LIST (\\Noselect) "/" ""')
            return "LIST completed"
        for folder, use in IMAP_FOLDERS.items():
            if imap_pattern_matches(pattern, folder):
                attributes = " ".join(["\\HasNoChildren"] + ([use] if use and not lsub else []))
                self.send(f'* {"LSUB" if lsub else "LIST"} ({attributes}) "/" {folder}')
        return f"{'LSUB' if lsub else 'LIST'} completed"

    def imap_lsub(self, args: list) -> str:
        return self.imap_list(args, lsub=True)

    def imap_subscribe(self, args: list) -> str:
        if len(args) != 1 or Folders.name(imap_text(args[0], "a folder")) is None:
            raise imap_no("[NONEXISTENT] no such folder")
        return "every folder is subscribed"

    def imap_create(self, args: list) -> str:
        if len(args) == 1 and Folders.name(imap_text(args[0], "a folder").rstrip("/")) is not None:
            raise imap_no("[ALREADYEXISTS] that folder exists")
        raise imap_no(f"[CANNOT] the folders are fixed: {', '.join(IMAP_FOLDERS)}")

    def imap_status(self, args: list) -> str:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise imap_bad("STATUS needs a folder and a list of items")
        folder = Folders.name(imap_text(args[0], "a folder"))
        if folder is None:
            raise imap_no("[NONEXISTENT] no such folder")
        with self.shell.lock:
            messages = self.folders.messages(folder)
            meta = self.folders.meta(folder)
        values = {"MESSAGES": len(messages), "RECENT": 0, "UIDNEXT": meta["uidnext"],
                  "UIDVALIDITY": meta["uidvalidity"], "UNSEEN": sum("\\Seen" not in m.flags for m in messages)}
        asked = [imap_atom(item, "a STATUS item") for item in args[1]]
        if any(item not in values for item in asked):
            raise imap_bad(f"STATUS items are {', '.join(values)}")
        self.send(f"* STATUS {folder} ({' '.join(f'{item} {values[item]}' for item in asked)})")
        return "STATUS completed"

    def imap_append(self, args: list) -> str:
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise imap_bad("APPEND needs a folder and the message as a literal")
        folder = Folders.name(imap_text(args[0], "a folder"))
        flags, date = frozenset(), int(time.time())
        for extra in args[1:-1]:
            if isinstance(extra, list):
                flags = imap_flags(extra)
            else:
                date = imap_parse_date(extra, with_time=True)
        if folder is None:
            raise imap_no("[TRYCREATE] no such folder")
        if not args[-1]:
            raise imap_no("an empty message")
        with self.shell.lock:
            uid = self.folders.append(folder, args[-1], flags, date)
            validity = self.folders.meta(folder)["uidvalidity"]
            self.folders.changed()
        if folder == self.selected:
            self.sync(expunges=False)
        return f"[APPENDUID {validity} {uid}] APPEND completed"

    def imap_idle(self, args: list) -> str:
        """RFC 2177: report changes as they happen, until the client says DONE."""
        self.send("+ idling")
        seen, polls, deadline = None, 0, time.monotonic() + IMAP_TIMEOUT   # (RFC 2177: 29 minutes)
        while not self.shell.stopping.is_set():
            if time.monotonic() > deadline:
                raise ConnectionError("IDLE past the session's timeout")
            if self.pending_input() or select.select([self.connection], [], [], IMAP_IDLE_POLL)[0]:
                line = self.rfile.readline(IMAP_LINE + 1)
                if not line:
                    raise ConnectionError("the client hung up during IDLE")
                if line.strip().upper() != b"DONE":
                    raise imap_bad("IDLE ends with DONE")
                break
            polls += 1
            if self.state == "selected" and (seen != self.shell.generation or polls % 8 == 0):
                seen = self.shell.generation
                self.sync()
        return "IDLE terminated"

    def pending_input(self) -> bool:
        """Whether bytes wait in the read buffer already (a DONE that came
        with IDLE), which select() on the socket cannot see."""
        timeout = self.connection.gettimeout()
        self.connection.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:                         # nothing buffered, nothing arrived
            return False
        finally:
            self.connection.settimeout(timeout)

    # -- selected (6.4) ---------------------------------------------------------------

    def imap_check(self, args: list) -> str:
        self.sync()
        return "CHECK completed"

    def imap_close(self, args: list) -> str:
        if not self.readonly:
            self.expunge()
        self.state, self.selected, self.view, self.known = "authenticated", None, [], {}
        return "CLOSE completed"

    def imap_unselect(self, args: list) -> str:
        self.state, self.selected, self.view, self.known = "authenticated", None, [], {}
        return "UNSELECT completed"

    def imap_expunge(self, args: list, uids: set[int] | None = None) -> str:
        self.expunge(uids)
        self.sync()
        return "EXPUNGE completed"

    def imap_uid_expunge(self, args: list) -> str:
        if len(args) != 1:
            raise imap_bad("UID EXPUNGE needs a UID set")
        largest = self.view[-1] if self.view else 0
        ranges = sequence_set(args[0])
        return self.imap_expunge([], {u for u in self.view if in_sequence_set(ranges, u, largest)})

    def imap_fetch(self, args: list) -> str:
        self.sync(expunges=False)
        return self.fetch(args, uid=False)

    def imap_uid_fetch(self, args: list) -> str:
        self.sync()
        return "UID " + self.fetch(args, uid=True)

    def imap_store(self, args: list) -> str:
        return self.store(args, uid=False)

    def imap_uid_store(self, args: list) -> str:
        self.sync()
        return "UID " + self.store(args, uid=True)

    def imap_search(self, args: list) -> str:
        self.sync(expunges=False)
        return self.search(args, uid=False)

    def imap_uid_search(self, args: list) -> str:
        self.sync()
        return "UID " + self.search(args, uid=True)

    def imap_copy(self, args: list) -> str:
        return self.copy(args, uid=False)

    def imap_uid_copy(self, args: list) -> str:
        self.sync()
        return self.copy(args, uid=True)

    def imap_move(self, args: list) -> str:
        return self.copy(args, uid=False, move=True)

    def imap_uid_move(self, args: list) -> str:
        self.sync()
        return self.copy(args, uid=True, move=True)

    ANY = ("not_authenticated", "authenticated", "selected")
    IN = ("authenticated", "selected")
    STATE_WORDS = {"not_authenticated": "before LOGIN", "authenticated": "without a selected folder",
                   "selected": "now"}
    COMMANDS: dict[str, tuple[Callable, tuple[str, ...]]] = {
        # command        handler              states it is allowed in (RFC 3501 3)
        "CAPABILITY":    (imap_capability,    ANY),
        "NOOP":          (imap_noop,          ANY),
        "LOGOUT":        (imap_logout,        ANY),
        "LOGIN":         (imap_login,         ("not_authenticated",)),
        "AUTHENTICATE":  (imap_authenticate,  ("not_authenticated",)),
        "ENABLE":        (imap_enable,        IN),
        "SELECT":        (imap_select,        IN),
        "EXAMINE":       (imap_examine,       IN),
        "LIST":          (imap_list,          IN),
        "LSUB":          (imap_lsub,          IN),
        "SUBSCRIBE":     (imap_subscribe,     IN),
        "UNSUBSCRIBE":   (imap_subscribe,     IN),
        "CREATE":        (imap_create,        IN),
        "DELETE":        (imap_create,        IN),
        "RENAME":        (imap_create,        IN),
        "STATUS":        (imap_status,        IN),
        "APPEND":        (imap_append,        IN),
        "IDLE":          (imap_idle,          IN),
        "CHECK":         (imap_check,         ("selected",)),
        "CLOSE":         (imap_close,         ("selected",)),
        "UNSELECT":      (imap_unselect,      ("selected",)),
        "EXPUNGE":       (imap_expunge,       ("selected",)),
        "FETCH":         (imap_fetch,         ("selected",)),
        "STORE":         (imap_store,         ("selected",)),
        "SEARCH":        (imap_search,        ("selected",)),
        "COPY":          (imap_copy,          ("selected",)),
        "MOVE":          (imap_move,          ("selected",)),
        "UID FETCH":     (imap_uid_fetch,     ("selected",)),
        "UID STORE":     (imap_uid_store,     ("selected",)),
        "UID SEARCH":    (imap_uid_search,    ("selected",)),
        "UID COPY":      (imap_uid_copy,      ("selected",)),
        "UID MOVE":      (imap_uid_move,      ("selected",)),
        "UID EXPUNGE":   (imap_uid_expunge,   ("selected",)),
    }
    UID_COMMANDS = ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE")


class MailClientServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, shell: "NodeShell"):
        self.shell = shell
        self.locked: set[str] = set()
        self.locked_guard = threading.Lock()
        self.clients = threading.BoundedSemaphore(MAIL_CLIENTS)
        self.admitted: set[int] = set()         # the requests holding a slot
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.clients.acquire(blocking=False):
            return False                        # refused when too many
        with self.locked_guard:
            self.admitted.add(id(request))
        return True

    def shutdown_request(self, request: Any) -> None:
        """Called for refused connections too: only an admitted one frees a slot."""
        super().shutdown_request(request)
        with self.locked_guard:
            admitted = id(request) in self.admitted
            self.admitted.discard(id(request))
        if admitted:
            self.clients.release()

    def lock_user(self, user: str) -> bool:
        """RFC 1939: one POP3 session per mailbox at a time."""
        with self.locked_guard:
            if user in self.locked:
                return False
            self.locked.add(user)
            return True

    def unlock_user(self, user: str) -> None:
        with self.locked_guard:
            self.locked.discard(user)

# =============================================================================
# Command line
# =============================================================================
# python3 secral.py node | send | inbox | read | outbox | peers | status |
# whoami | nis lookup | users | contacts | passwd | demo | bench.  --data-dir,
# --json and -v may stand anywhere on the line, with one meaning; all but
# node, whoami, demo and bench talk to the node running on that directory.

EXIT_STATUS = {
    # status  meaning (README: "Exit status")
    0:   "success",
    1:   "refused: the request is invalid or not allowed (every other error code)",
    2:   "usage: the command line is wrong",
    3:   "not_running: no node is running for the data directory",
    4:   "not_found: no such mail, user, contact or NIS record",
    5:   "unauthorized: the control token is wrong (another user's node?)",
    6:   "send --wait: the mail was rejected, expired or withdrawn",
    7:   "send --wait: not delivered yet when the wait ended (the node keeps trying)",
    130: "interrupted (Ctrl-C)",
}
EXIT_FOR_CODE = {"not_running": 3, "not_found": 4, "unauthorized": 5}
TABLE_WIDTH = 100               # columns a table may use


def default_data_dir() -> str:
    return os.environ.get("SECRAL_HOME") or os.path.join(os.path.expanduser("~"), ".secral")


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or HOST alone (default port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text.strip())
    if not match:
        raise LocalError("refused", f"{text!r} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or default_port)
    if not 0 < port < 65536:
        raise LocalError("refused", f"port {port} is out of range 1-65535")
    return host, port


def call_node(data_dir: str, cmd: str, args: dict | None = None, timeout: float = 30) -> Any:
    """Send one command to the node running on `data_dir`; `timeout` is how
    long the command itself may take (send --wait, nis lookup)."""
    path = os.path.join(data_dir, CONTROL_FILE)
    hint = f"no node is running for {data_dir} (start one with: python3 secral.py node --data-dir {data_dir})"
    try:
        with open(path) as f:
            info = json.load(f)
        sock = socket.create_connection(("127.0.0.1", info["port"]), timeout=5)
    except (OSError, ValueError, KeyError, TypeError):
        raise LocalError("not_running", hint)
    with sock:
        sock.settimeout(timeout + 30)
        sock.sendall(json.dumps({"token": info["token"], "cmd": cmd, "args": args or {}}).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise LocalError("not_running", hint)
    response = json.loads(line)
    if not response["ok"]:
        raise LocalError(response["code"] if response["code"] in ERROR_CODES else "refused",
                         response["message"])
    return response["result"]


def when(t: int | None) -> str:
    """A time for people: local, to the minute, with its zone."""
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(t))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def print_table(rows: list[list[Any]], header: list[str], width: int = TABLE_WIDTH,
                notes: list[str] | None = None) -> None:
    """Columns that fit `width`: the widest column gives way first, its cells
    cut with an ellipsis (ids and times are short and stay whole).  A row's
    note, if any, goes whole on an indented line of its own below it."""
    rows = [[LINE_BREAKERS.sub(" ", str(c)) for c in row] for row in rows]    # one line per row
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1

    def cut(text: str, w: int) -> str:
        return text if len(text) <= w else text[:w - 1] + "\u2026"
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row, note in zip(rows, notes or [""] * len(rows)):
        print("  ".join(cut(c, w).ljust(w) for c, w in zip(row, widths)).rstrip())
        if note:
            print(cut("    " + note, width))


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 meaning any free one."""
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0 or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value
    return parse


def say(text: str) -> None:
    print(f"secral: {text}", file=sys.stderr, flush=True)


# -- node ---------------------------------------------------------------------

def node_config(args: argparse.Namespace) -> Config:
    """Config from the node command's options, checked as peers would check
    our record: an advertised host nobody can dial is refused here (5.3)."""
    if args.advertise:
        host, port = parse_hostport(args.advertise)
        try:
            check_host(host, "--advertise")
        except RemoteError:
            raise LocalError("refused", f"--advertise {args.advertise}: {host} is not an address "
                             "peers can dial (a host name or a unicast IP address)")
    elif args.no_listen:
        host, port = None, 0
    else:
        host, port = (None if args.host in ("0.0.0.0", "::", "") else args.host), 0
    config = Config(host=host, port=port, bootstrap=tuple(parse_hostport(p) for p in args.peer),
                    target_outbound=args.target_outbound,
                    relay_max_items=args.store_max_items, relay_max_bytes=args.store_max_mb << 20,
                    origin_max_items=args.origin_max_items, origin_max_bytes=args.origin_max_mb << 20)
    if args.rate:
        config.rate, config.burst = args.rate, int(args.rate * 2)
    if args.send_rate:
        config.send_rate = args.send_rate
    return config


def node_banner(shell: NodeShell, args: argparse.Namespace) -> None:
    """What the operator needs to know, once the node runs; with --json, one
    JSON line a program can read (tests and the benchmark do)."""
    record, domain = shell.core.record, shell.identity.domain
    users = [CORE_USER] + sorted(u["name"] for u in shell.stores.users.values())
    mail = {name: list(server.server_address[:2]) for name, server in shell.mail_servers.items()}
    if args.json:
        print(json.dumps({"domain": domain, "addresses": [f"{u}@{domain}" for u in users],
                          "listen": [args.host, shell.port] if shell.port else None,
                          "advertised": [record["host"], record["port"]] if record["host"] else None,
                          "mail_clients": mail, "data_dir": shell.data_dir, "pid": os.getpid()}), flush=True)
        return
    print(f"Secral node {domain}")
    for user in users:
        print(f"  address  {user}@{domain}")
    if shell.port:
        print(f"  listening on {args.host}:{shell.port}"
              + (f", advertised as {record['host']}:{record['port']}" if record["host"] else
                 " (not advertised: use --advertise HOST:PORT so others can dial you)"))
    else:
        print("  not listening (reachable through relays only)")
    for name, (host, port) in mail.items():
        print(f"  {name.upper()} for mail clients on {host}:{port}")
    print(f"  data in {shell.data_dir}; stop with Ctrl-C", flush=True)


def mail_key_pool(directory: str) -> Callable[[int, MailKeys], Identity]:
    """Testing (node --test-key-pool): mail keys read from the PEM files in
    `directory` instead of made, epoch e trying file e mod their number
    first, and never a key the node has used; a fresh key when all have been."""
    names = sorted(name for name in os.listdir(directory) if name.endswith(".pem"))

    def take(epoch: int, keys: MailKeys) -> Identity:
        for k in range(len(names)):
            identity = load_identity(os.path.join(directory, names[(epoch + k) % len(names)]), create=False)
            key_id = mail_key_id(identity.public_b64)
            if key_id not in keys.epoch_by_id and key_id not in keys.retired:
                return identity
        return Identity.generate()
    return take


def run_node(args: argparse.Namespace) -> int:
    """python3 secral.py node: run in the foreground until Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    os.umask(0o077)                             # mail, keys and password hashes: ours alone
    config = node_config(args)
    listen = None if args.no_listen else (args.host, args.port)
    mail_address = {name: (args.mail_host, port) if port is not None else None
                    for name, port in (("smtp", args.smtp_port), ("pop3", args.pop3_port),
                                       ("imap", args.imap_port))}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    source = mail_key_pool(args.test_key_pool) if args.test_key_pool else None
    shell = NodeShell(args.data_dir, config, listen, Clock(args.clock_file), announce=say,
                      smtp=mail_address["smtp"], pop3=mail_address["pop3"], imap=mail_address["imap"],
                      mail_key_source=source)
    shell.start()
    node_banner(shell, args)
    stop.wait()
    log.info("stopping")
    shell.stop()
    return 0


# -- client commands ------------------------------------------------------------
# Each takes the parsed arguments and returns (result, show): the JSON-able
# result, and how to print it for people.

def cli_whoami(args: argparse.Namespace) -> tuple[Any, Callable]:
    """whoami works without a running node: it creates the identity if needed,
    and says so, since a mistyped --data-dir would otherwise pass unnoticed."""
    try:
        result = call_node(args.data_dir, "whoami")
    except LocalError as exc:
        if exc.code != "not_running":
            raise
        path = os.path.join(args.data_dir, "node.key")
        existed = os.path.exists(path)
        identity = load_identity(path, announce=say)
        if not existed:
            say(f"created a new identity in {args.data_dir}")
        result = {"domain": identity.domain, "addresses": [f"{CORE_USER}@{identity.domain}",
                                                           f"{DEFAULT_USER}@{identity.domain}"]}

    def show(r: dict) -> None:
        print(r["domain"])
        for a in r["addresses"]:
            print(f"  {a}")
    return result, show


def show_sent(e: dict) -> None:
    if e["status"] == "delivered":
        print(f"delivered {e['id']} to {e['to']}")
    elif e["status"] == "rejected":
        print(f"rejected {e['id']} by {e['to'].split('@')[1]}: {e['reason']}")
    else:
        print(f"{e['status']} {e['id']} to {e['to']}: {e['note']}")


def attachment(path: str) -> dict:
    """A file as a mail part (6.1): its media type guessed from its name."""
    import mimetypes
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PLAINTEXT + 1)
    except OSError as exc:
        raise LocalError("not_found", f"cannot read {path}: {exc.strerror}")
    media_type = (mimetypes.guess_type(path)[0] or "application/octet-stream").lower()
    return {"type": media_type, "name": os.path.basename(path), "data": b64e(data)}


def cli_send(args: argparse.Namespace) -> tuple[Any, Callable]:
    body = args.body if args.body is not None else sys.stdin.read()
    entry = call_node(args.data_dir, "send", {"to": args.to, "subject": args.subject, "body": body,
                                              "user": args.sender, "ttl": args.ttl,
                                              "parts": [attachment(path) for path in args.attach],
                                              "in_reply_to": args.reply_to}, NIS_TIMEOUT + 5)
    if args.wait:
        entry = call_node(args.data_dir, "wait", {"id": entry["id"], "timeout": args.wait}, args.wait)
        if entry["status"] != "delivered":
            raise Unfinished(entry, show_sent, 6 if entry["status"] in OUTBOX_FINAL else 7)
    return entry, show_sent


def show_mail_rows(rows: list[dict]) -> None:
    print_table([[r["id"][:12], "*" if r["unread"] else " ", when(r["received"]),
                  r["contact"] or r["from"], r["subject"]] for r in rows],
                ["ID", "NEW", "RECEIVED", "FROM", "SUBJECT"])


def cli_inbox(args: argparse.Namespace) -> tuple[Any, Callable]:
    if args.action == "delete":
        result = call_node(args.data_dir, "inbox_delete", {"id": args.id})
        return result, lambda r: print(f"deleted {r['id']} from {r['contact'] or r['from']}")
    return call_node(args.data_dir, "inbox", {"user": args.user}), show_mail_rows


def save_parts(parts: list[dict], directory: str) -> list[str]:
    """Write a mail's parts as files in `directory`; never over an existing one."""
    os.makedirs(directory, exist_ok=True)
    saved = []
    for n, part in enumerate(parts, 1):
        name = part.get("name") or f"part-{n}"
        path = os.path.join(directory, name)
        try:
            with open(path, "xb") as f:         # (names are checked: no directories, 6.1)
                f.write(base64.b64decode(part["data"]))
        except FileExistsError:
            raise LocalError("refused", f"{path} exists; not overwritten")
        saved.append(path)
    return saved


def cli_read(args: argparse.Namespace) -> tuple[Any, Callable]:
    def show(r: dict) -> None:
        if r["folder"] == "sent":
            head = (f"From:    {r['from']}\nTo:      {r['to']}\nDate:    {when(r['created'])}\n"
                    f"Subject: {r['subject']}\nId:      {r['id']}\nStatus:  {r['status']} ({r['note']})")
        else:
            sender = r["from"] + (f" ({r['contact']})" if r["contact"] else " (not in your contacts)")
            head = (f"From:    {sender}\nTo:      {r['to']}\nDate:    {when(r['created'])}\n"
                    f"Subject: {r['subject']}\nId:      {r['id']}")
        if r["in_reply_to"]:
            head += f"\nReplies: {r['in_reply_to']}"
        for part in r["parts"]:
            size = len(base64.b64decode(part["data"]))
            head += f"\nPart:    {part.get('name', '(unnamed)')} ({part['type']}, {size} bytes)"
        print(f"{head}\n\n{r['body']}")
        for path in saved:
            print(f"saved {path}")
    result = call_node(args.data_dir, "read", {"id": args.id})
    saved = save_parts(result["parts"], args.save_to) if args.save_to else []
    return result, show


def cli_outbox(args: argparse.Namespace) -> tuple[Any, Callable]:
    if args.action == "cancel":
        result = call_node(args.data_dir, "outbox_cancel", {"id": args.id})
        return result, lambda r: print(f"withdrew {r['id']} to {r['to']}: {r['note']}")

    def show(rows: list[dict]) -> None:
        print_table([[r["id"][:12], r["status"], when(r["created"]), r["contact"] or r["to"], r["subject"]]
                     for r in rows], ["ID", "STATUS", "CREATED", "TO", "SUBJECT"],
                    notes=[r["note"] for r in rows])
    return call_node(args.data_dir, "outbox"), show


def cli_status(args: argparse.Namespace) -> tuple[Any, Callable]:
    def show(r: dict) -> None:
        print(f"node {r['domain']}: {plural(r['peers'], 'peer')} ({plural(r['connections'], 'connection')})")
        print(f"inbox {plural(r['inbox'], 'mail')}; outbox " +
              (", ".join(f"{n} {k}" for k, n in r["outbox"].items()) or "empty"))
        print(f"holding for others: {plural(r['relay']['mail'], 'mail')}, {plural(r['relay']['ack'], 'ack')}, "
              f"{plural(r['relay']['bytes'], 'byte')}")
        print(f"NIS map {plural(r['nis_records'], 'record')}; {plural(r['known_peers'], 'known peer')}; "
              f"{r['banned']} banned")
    return call_node(args.data_dir, "status"), show


def cli_peers(args: argparse.Namespace) -> tuple[Any, Callable]:
    if args.banned:
        def show(rows: list[dict]) -> None:
            print_table([[r["subject"], when(r["until"]), r["bans"]] for r in rows],
                        ["BANNED", "UNTIL", "BANS"])
    else:
        def show(rows: list[dict]) -> None:
            print_table([[r["domain"], r["host"] or "-", r["port"] or "-", r["direction"], r["score"]]
                         for r in rows], ["DOMAIN", "HOST", "PORT", "DIRECTION", "SCORE"])
    return call_node(args.data_dir, "peers", {"banned": args.banned}), show


def cli_nis(args: argparse.Namespace) -> tuple[Any, Callable]:
    def show(r: dict) -> None:
        print(f"domain   {r['domain']}\nhost     {r['host'] or '- (reachable through relays)'}\n"
              f"port     {r['port'] or '-'}\nkey      {r['fingerprint']}\n"
              f"seq      {r['seq']}\nexpires  {when(r['expires'])}")
    record = call_node(args.data_dir, "nis_lookup", {"domain": args.domain, "timeout": args.timeout},
                       args.timeout)
    fingerprint = "sha256:" + hashlib.sha256(base64.b64decode(record["key"])).hexdigest()
    return record | {"fingerprint": fingerprint}, show


def cli_users(args: argparse.Namespace) -> tuple[Any, Callable]:
    if args.action == "list":
        def show(rows: list[dict]) -> None:
            print_table([[r["name"], r["address"], r["mails"]] for r in rows], ["USER", "ADDRESS", "MAILS"])
        return call_node(args.data_dir, "users_list"), show
    if args.action == "add":
        return call_node(args.data_dir, "users_add", {"name": args.name}), lambda r: print(f"added {r['address']}")
    result = call_node(args.data_dir, "users_remove", {"name": args.name, "force": args.force})
    return result, lambda r: print(f"removed {r['name']} ({plural(r['removed_mails'], 'mail')})")


def cli_passwd(args: argparse.Namespace) -> tuple[Any, Callable]:
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass(f"New password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise LocalError("refused", "the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    result = call_node(args.data_dir, "passwd", {"user": args.user, "password": password})
    return result, lambda r: print(f"password set for {r['user']}")


def cli_contacts(args: argparse.Namespace) -> tuple[Any, Callable]:
    if args.action == "list":
        def show(rows: list[dict]) -> None:
            print_table([[r["name"], r["address"]] for r in rows], ["NAME", "ADDRESS"])
        return call_node(args.data_dir, "contacts_list"), show
    if args.action == "add":
        result = call_node(args.data_dir, "contacts_add", {"name": args.name, "address": args.address})
        return result, lambda r: print(f"added {r['name']} = {r['address']}")
    result = call_node(args.data_dir, "contacts_remove", {"name": args.name})
    return result, lambda r: print(f"removed {r['name']}")


class Unfinished(Exception):
    """A command that ran but did not get what was asked (send --wait without
    a delivery): its result is printed as usual, then it exits `status`."""

    def __init__(self, result: Any, show: Callable, status: int):
        super().__init__(status)
        self.result, self.show, self.status = result, show, status


CLIENT_COMMANDS: dict[str, Callable[[argparse.Namespace], tuple[Any, Callable]]] = {
    "whoami": cli_whoami, "send": cli_send, "inbox": cli_inbox, "read": cli_read,
    "outbox": cli_outbox, "status": cli_status, "peers": cli_peers, "nis": cli_nis,
    "users": cli_users, "passwd": cli_passwd, "contacts": cli_contacts,
}


# -- the parser ---------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line rather than the usage block."""

    def error(self, message: str) -> None:      # (argparse's own hook)
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--data-dir, --json and -v, on every (sub)parser.  Their defaults are
    SUPPRESS, so an option given before the command is not overwritten by a
    sub-parser's default; main() fills in the real defaults once."""
    group = parser.add_argument_group("options accepted anywhere on the line")
    group.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                       help="the node's directory (default: $SECRAL_HOME or ~/.secral)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output; errors as {\"error\": {\"code\", \"message\"}}")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="more detail (node: debug logging)")
    return parser


def add_node_parser(sub: Any) -> None:
    p = add_common(sub.add_parser("node", help="run a node in the foreground",
                                  description="Run a node in the foreground; Ctrl-C or SIGTERM stops it."))
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a node to connect to (repeatable)")
    p.add_argument("--advertise", metavar="HOST:PORT", help="address to publish in the NIS record")
    p.add_argument("--no-listen", action="store_true", help="behind NAT: accept no connections")
    p.add_argument("--target-outbound", type=positive(int), default=8, help="outbound connections to keep")
    p.add_argument("--rate", type=positive(float), help=f"frames/s a peer may send us (default {RATE_PER_SECOND})")
    p.add_argument("--send-rate", type=positive(float),
                   help=f"frames/s we send on one connection (default {SEND_RATE}; keep it below "
                        "the peers' --rate)")
    quota = Config()
    p.add_argument("--store-max-items", type=positive(int), default=quota.relay_max_items,
                   help="mails and acks kept for others, in total (default %(default)s)")
    p.add_argument("--store-max-mb", type=positive(int), default=quota.relay_max_bytes >> 20,
                   help="megabytes kept for others, in total (default %(default)s)")
    p.add_argument("--origin-max-items", type=positive(int), default=quota.origin_max_items,
                   help="mails kept for others, per sending node (default %(default)s)")
    p.add_argument("--origin-max-mb", type=positive(int), default=quota.origin_max_bytes >> 20,
                   help="megabytes kept for others, per sending node (default %(default)s)")
    p.add_argument("--smtp-port", type=port_number, metavar="P", help="serve SMTP submission for mail clients")
    p.add_argument("--pop3-port", type=port_number, metavar="P", help="serve POP3 for mail clients")
    p.add_argument("--imap-port", type=port_number, metavar="P",
                   help="serve IMAP for mail clients (Thunderbird, phones: INBOX, Sent, Drafts, Trash)")
    p.add_argument("--mail-host", default="127.0.0.1",
                   help="address for SMTP/POP3/IMAP (default 127.0.0.1: this machine only)")
    p.add_argument("--clock-file", help="testing: add the seconds written in this file to the clock")
    p.add_argument("--test-key-pool", metavar="DIR",
                   help="testing: take mail keys from the PEM files in DIR instead of generating them")


def add_mail_parsers(sub: Any) -> None:
    p = add_common(sub.add_parser("send", help="send a mail"))
    p.add_argument("to", help="the recipient: user@node-... or a contact name")
    p.add_argument("--subject", "-s", required=True, help="the subject (one line)")
    p.add_argument("--body", "-b", help="the text (default: read standard input)")
    p.add_argument("--from", dest="sender", default=DEFAULT_USER, help="local user (default Default)")
    p.add_argument("--attach", "-a", action="append", default=[], metavar="FILE",
                   help="attach a file (repeatable; all of a mail together: about 140 KiB)")
    p.add_argument("--reply-to", metavar="ID", help="the id of the mail this answers (for threading)")
    p.add_argument("--ttl", type=positive(int), default=MAX_TTL,
                   help="seconds the mail lives and is retried (default and most: 7 days)")
    p.add_argument("--wait", type=positive(float), metavar="SECONDS",
                   help="wait this long for the ack; exit 6 if rejected or expired, 7 if still on its way")
    p = add_common(sub.add_parser("inbox", help="list received mail, or delete one"))
    p.add_argument("--user", "-u", help="only this local user's mail")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add_common(actions.add_parser("list", help="list received mail (the default)"))
    add_common(actions.add_parser("delete", help="delete one received mail")).add_argument(
        "id", help="the mail id (a unique prefix of 4 or more digits will do)")
    p = add_common(sub.add_parser("read", help="show one mail, received or sent"))
    p.add_argument("id", help="the mail id (a unique prefix of 4 or more digits will do)")
    p.add_argument("--save-to", metavar="DIR", help="save the mail's attachments in DIR")
    p = add_common(sub.add_parser("outbox", help="list sent mail and why it is where it is, or withdraw one"))
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add_common(actions.add_parser("list", help="list sent mail (the default)"))
    add_common(actions.add_parser("cancel", help="withdraw a mail not yet delivered")).add_argument(
        "id", help="the mail id (a unique prefix of 4 or more digits will do)")


def add_admin_parsers(sub: Any) -> None:
    add_common(sub.add_parser("status", help="what the node holds and who it talks to"))
    p = add_common(sub.add_parser("peers", help="list connected peers"))
    p.add_argument("--banned", action="store_true", help="list banned peers instead")
    add_common(sub.add_parser("whoami", help="show this node's domain and addresses (creates them if needed)"))
    p = add_common(sub.add_parser("nis", help="NIS name lookups"))
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = add_common(actions.add_parser("lookup", help="find a node's NIS record through the network"))
    q.add_argument("domain", help="the node's domain, node-...")
    q.add_argument("--timeout", type=positive(float), default=NIS_TIMEOUT,
                   help="seconds to wait for an answer (default %(default)s)")
    p = add_common(sub.add_parser("users", help="manage local users"))
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_common(actions.add_parser("list", help="list local users and their mail"))
    add_common(actions.add_parser("add", help="add a local user")).add_argument("name", help="the user name")
    q = add_common(actions.add_parser("remove", help="remove a local user"))
    q.add_argument("name", help="the user name")
    q.add_argument("--force", action="store_true", help="also delete the user's mail")
    p = add_common(sub.add_parser("passwd", help="set a user's password for mail clients"))
    p.add_argument("user", help="the local user (reads the password from standard input if not a terminal)")
    p = add_common(sub.add_parser("contacts", help="manage the address book"))
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_common(actions.add_parser("list", help="list contacts"))
    q = add_common(actions.add_parser("add", help="add a contact"))
    q.add_argument("name", help="the name you will write instead of the address")
    q.add_argument("address", help="user@node-...")
    add_common(actions.add_parser("remove", help="remove a contact")).add_argument("name", help="the contact")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status:\n" + "\n".join(f"  {n:<4} {text}" for n, text in EXIT_STATUS.items())
    parser = add_common(Parser(
        prog="secral.py", description="Secral: end-to-end encrypted peer-to-peer mail.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--version", action="version", version=AGENT)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_node_parser(sub)
    add_mail_parsers(sub)
    add_admin_parsers(sub)
    add_common(sub.add_parser("demo", help="watch seven nodes on this machine exchange mail"))
    p = add_common(sub.add_parser("bench", help="measure this machine (processes on 127.0.0.1)"))
    p.add_argument("--mails", type=positive(int), default=300, help="end-to-end mails (default %(default)s)")
    p.add_argument("--relay-mails", type=positive(int), default=1000,
                   help="relay-only mails (default %(default)s)")
    p.add_argument("--stored", type=int, default=100_000,
                   help="mails a relay holds for the memory figure; 0 skips it (default %(default)s)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    args.data_dir = os.path.abspath(os.path.expanduser(getattr(args, "data_dir", default_data_dir())))
    args.json = getattr(args, "json", False)
    args.verbose = getattr(args, "verbose", False)
    if getattr(args, "action", None) is None:
        args.action = "list"
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        parser.exit(2, f"secral: --data-dir {args.data_dir} is a file, not a directory\n")
    return args


def report_error(args: argparse.Namespace, exc: SecralError) -> int:
    """One line on stderr, or a JSON error object on stdout; a distinct status."""
    if args.json:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}, ensure_ascii=False))
    else:
        print(f"secral: {exc.message}", file=sys.stderr)
    return EXIT_FOR_CODE.get(exc.code, 1)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):     # a stored text no terminal can show must not crash us
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    args = parse_args(argv)
    try:
        if args.command == "node":
            return run_node(args)
        if args.command == "demo":
            return run_demo(args)
        if args.command == "bench":
            return run_bench(args)
        result, show = CLIENT_COMMANDS[args.command](args)
        status = 0
    except SecralError as exc:
        return report_error(args, exc)
    except Unfinished as unfinished:
        result, show, status = unfinished.result, unfinished.show, unfinished.status
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        show(result)
    return status


# =============================================================================
# Tools: demo and benchmark
# =============================================================================
# Not part of the protocol, and last so that they stay out of its reading
# path.  `secral.py demo` shows the whole story on one machine in well under a
# minute; `secral.py bench` measures this machine against the cost of the
# RSA operations that bound it.  Both use real sockets on
# 127.0.0.1 and temporary directories they remove.

SEED_EDGES = ((5, 1), (1, 6), (6, 7), (1, 2), (7, 3), (2, 6), (7, 5), (4, 2), (4, 3), (2, 3), (7, 1), (2, 5))


def leaf_record(identity: Identity, mail_key: Identity, now: int) -> dict:
    """The record of a tool's peer that listens nowhere (8.4): it lives an
    hour, or to the end of the epoch if that comes first, with one mail key."""
    return make_record(identity, None, 0, now, min(now + 3600, (epoch_of(now) + 1) * MAIL_KEY_EPOCH),
                       [{"epoch": epoch_of(now), "key": mail_key.public_b64}])


class WirePeer:
    """A bare peer on a socket, for the demo, the benchmark and the tests: TLS,
    the handshake and JSON lines, nothing else (examples/raw_peer.py does the
    same without secral.py).  One thread may read while another writes: TLS
    is a TlsLink, as in the shell."""

    def __init__(self, port: int, identity: Identity | None, source: str = "127.0.0.1",
                 mail_key: Identity | None = None):
        self._identity = identity
        self.mail_key = mail_key                # its record's one mail key (made if not given)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        self.link = TlsLink(tls_dialler_context(), server_side=False)
        self.link.handshake(self.sock)
        self.listener = domain_of_key(certificate_key(self.link.certificate() or b""))
        self.lines = LineBuffer()
        self.ready: collections.deque[bytes] = collections.deque(self.lines.split(self.link.receive(b"") or b"")[0])
        self.sending = threading.Lock()

    @property
    def identity(self) -> Identity:
        return self._identity

    def send(self, frame: dict) -> None:
        self.send_bytes(encode_frame(frame))

    def send_bytes(self, data: bytes) -> None:
        """Bytes inside TLS, as they are: a line, or what a hostile peer sends."""
        with self.sending:                      # records leave in the order TLS made them
            self.sock.sendall(self.link.encrypt(data))

    def recv(self) -> dict | None:
        """The next frame, or None when the link ends."""
        while not self.ready:
            data = self.sock.recv(RECV_SIZE)
            plain = self.link.receive(data) if data else None
            if plain is None:
                return None
            lines, oversize = self.lines.split(plain)
            if oversize:
                raise RemoteError("too_large", f"a line longer than {MAX_LINE} bytes")
            self.ready.extend(lines)
        return parse_json(self.ready.popleft())

    def handshake(self, now: int | None = None) -> dict:
        """Dial (8.1): check the listener's hello against its certificate, send
        ours and our auth, and ping: the pong says the link is open.  Returns
        the listener's record.  `now` is the time to claim (a moved clock's)."""
        now = int(time.time()) if now is None else now
        hello = self.recv()
        if hello is None or hello.get("type") != "hello":
            raise RemoteError("refused", f"no hello but {hello}")
        record = verify_record(hello["record"], now)
        if record["domain"] != self.listener:
            raise RemoteError("wrong_peer", "the hello's record is not the certificate's key")
        self.mail_key = self.mail_key or Identity.generate()
        mine = leaf_record(self.identity, self.mail_key, now)
        self.send(make_hello(mine, os.urandom(HELLO_NONCE)))
        self.send(make_auth(self.identity, hello["nonce"], self.listener))
        self.send({"type": "ping"})
        while (frame := self.recv()) is not None and frame["type"] != "pong":
            if frame["type"] == "error":
                raise RemoteError("refused" if frame["code"] not in ERROR_CODES else frame["code"],
                                  frame["message"])
        if frame is None:
            raise RemoteError("refused", "the listener closed the link")
        return record

    def close(self) -> None:
        """Hang up; a thread blocked in recv() wakes and gets None."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class Demo:
    """python3 secral.py demo: the seed's seven-node network, narrated, one
    method per step.  Every wait and every read has a deadline."""

    STEPS = 6

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.say = functools.partial(print, flush=True)
        self.step = iter(range(1, self.STEPS + 1))
        self.base = tempfile.mkdtemp(prefix="secral-demo-")
        self.nodes: dict[int, NodeShell] = {}
        self.identities: dict[int, Identity] = {}

    def header(self, text: str) -> None:
        self.say(f"\n[{next(self.step)}/{self.STEPS}] {text}")

    def wait(self, predicate: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise LocalError("refused", "the demo timed out: " + (predicate.__doc__ or ""))
            time.sleep(0.05)
        return value

    def name(self, domain: str) -> str:
        return next((f"node {i}" for i, n in self.nodes.items() if n.identity.domain == domain), domain)

    def start(self, i: int, peers: list[int]) -> NodeShell:
        config = Config(host=None, bootstrap=tuple(("127.0.0.1", self.nodes[j].port) for j in peers))
        first = self.mail_keys[i]               # this week's, made with the rest; later ones the node makes

        def source(epoch: int, keys: MailKeys) -> Identity:
            return first if not keys.keys else Identity.generate()
        shell = NodeShell(os.path.join(self.base, f"node{i}"), config, ("127.0.0.1", 0),
                          identity=self.identities[i], mail_key_source=source)
        shell.start()
        self.nodes[i] = shell
        return shell

    def control(self, i: int, cmd: str, **kwargs: Any) -> Any:
        return getattr(self.nodes[i].control.control, f"cmd_{cmd}")(**kwargs)

    def run(self) -> int:
        logging.basicConfig(level=logging.ERROR, format="      (log) %(message)s")
        try:
            self.say("Secral demo: end-to-end encrypted mail over a peer-to-peer network, on 127.0.0.1.")
            self.start_the_network()
            seen = self.mail_across()
            self.what_an_eavesdropper_sees(seen)
            self.mail_to_an_offline_node()
            self.a_misbehaving_peer()
            self.say(f"\nDone in {time.monotonic() - self.started:.1f} s.")
            return 0
        except OSError as exc:                  # a read past its deadline, a refused connection
            raise LocalError("refused", f"the demo failed: {exc}")
        finally:
            for shell in self.nodes.values():
                shell.stop()
            shutil.rmtree(self.base, ignore_errors=True)
            self.say(f"Temporary data in {self.base} removed.")

    def start_the_network(self) -> None:
        say, nodes = self.say, self.nodes
        self.header("Seven nodes, as in the picture. Each needs an RSA-3072 node key and a mail key for the week\n"
                    "      (a second or so each, on every core at once).")
        keys = make_keys(18)
        self.identities = dict(enumerate(keys[:9], 1))
        self.mail_keys = dict(enumerate(keys[9:], 1))   # nodes 1-7, and the tool peers 8 and 9
        for i in range(1, 8):
            self.start(i, [j for x, y in SEED_EDGES for j in (x, y) if i in (x, y) and j != i and j in nodes])
            say(f"      node {i}  {nodes[i].identity.domain}  listening on 127.0.0.1:{nodes[i].port}")
        self.header("Linking them: " + ", ".join(f"{x}–{y}" for x, y in SEED_EDGES) + ".")
        say("      No node publishes its address, so nobody can dial around the picture:")
        say("      mail between nodes that are not linked must be relayed.")
        for x, y in SEED_EDGES:
            self.wait(lambda: nodes[y].identity.domain in nodes[x].core.open)
        say(f"      all {len(SEED_EDGES)} links are up.")

    def mail_across(self) -> dict:
        """Node 5 mails node 3 with an eavesdropper linked to node 5; returns
        the mail frame the eavesdropper received."""
        say, nodes, identities = self.say, self.nodes, self.identities
        self.header("Node 5 mails node 3. They are not linked.")
        wiretap = WirePeer(nodes[5].port, identities[8], mail_key=self.mail_keys[8])
        wiretap.handshake()
        wiretap.sock.settimeout(10)
        self.wait(lambda: identities[8].domain in nodes[5].core.open)
        say(f"      (an eavesdropper, {identities[8].domain}, has joined node 5 as an ordinary peer)")
        say("      Node 5 asks its peers for node 3's NIS record (it needs node 3's key), seals the mail")
        say("      with AES-256-GCM under a key only node 3 can unwrap, signs it, and hands it on.")
        t0 = time.monotonic()
        entry = self.control(5, "send", to=f"Default@{nodes[3].identity.domain}",
                             subject="Meet at the harbour", body="Six o'clock, by the lighthouse. Bring the map.")
        done = self.wait(lambda: (e := nodes[5].stores.outbox.get(entry["id"]))
                         and e["status"] == "delivered" and e)
        key = mail_key(nodes[5].identity.domain, entry["id"])
        relays = [f"node {i}" for i in (1, 2, 6, 7, 4) if key in nodes[i].core.seen]
        say(f"      delivered in {time.monotonic() - t0:.2f} s; carried by {', '.join(relays)}.")
        say(f"      Node 3's Core signed an ack; it travelled back and node 5's outbox says \"{done['status']}\".")
        [inbox] = self.control(3, "inbox")
        read = self.control(3, "read", id=inbox["id"])
        say(f"      Node 3 reads: \"{read['subject']}\" — \"{read['body']}\"")
        try:
            while (frame := wiretap.recv()) is not None and frame["type"] != "mail":
                pass
        finally:
            wiretap.close()
        if frame is None:
            raise LocalError("refused", "the demo failed: the eavesdropper never saw the mail")
        return frame["mail"]

    def what_an_eavesdropper_sees(self, seen: dict) -> None:
        say = self.say
        self.header("What an eavesdropper sees.")
        say(f"      from     {seen['from']}\n      to       {seen['to']}")
        say(f"      size     {len(b64d(seen['ct'], 'ct'))} bytes of ciphertext: {seen['ct'][:44]}…")
        try:
            open_mail(self.identities[8], MailKeys(), seen)
        except RemoteError as exc:
            say(f"      opening it with its own key fails: {exc.code} ({exc.message}).")
        try:
            unwrap_key(self.identities[8].key, b64d(seen["key"], "key"))
        except RemoteError as exc:
            say(f"      and unwrapping the AES key by force fails too: {exc.code}.")
        say("      It learns who wrote to whom, when and how much — never the subject or the text.")

    def mail_to_an_offline_node(self) -> None:
        say, nodes = self.say, self.nodes
        self.header("Node 6 goes offline; node 4 writes to it anyway.")
        nodes[6].stop()
        entry = self.control(4, "send", to=f"Default@{nodes[6].identity.domain}",
                             subject="While you were away", body="The relays kept this for you.")
        holders = self.wait(lambda: [f"node {i}" for i in (1, 2, 7)
                                     if any(k.startswith("mail/") for k in nodes[i].core.items)])
        say(f"      node 6 is unreachable; {', '.join(holders)} {'keeps' if len(holders) == 1 else 'keep'} "
            "the sealed mail for it "
            f"(outbox: {nodes[4].stores.outbox[entry['id']]['status']}).")
        say("      (they would keep it for up to 7 days; here node 6 comes back at once)")
        self.start(6, [1, 7, 2])
        self.wait(lambda: self.control(6, "inbox"))
        say(f"      node 6 is back and receives: \"{self.control(6, 'inbox')[0]['subject']}\"")
        self.wait(lambda: nodes[4].stores.outbox[entry["id"]]["status"] == "delivered")
        say("      the ack reaches node 4: \"delivered\"; the relays drop their copies.")

    def a_misbehaving_peer(self) -> None:
        say, nodes, identities = self.say, self.nodes, self.identities
        self.header("A misbehaving peer connects to node 1.")
        rogue = WirePeer(nodes[1].port, identities[9], source="127.0.0.66", mail_key=self.mail_keys[9])
        rogue.handshake()
        rogue.sock.settimeout(10)
        self.wait(lambda: identities[9].domain in nodes[1].core.open)
        say(f"      {identities[9].domain} completes the handshake, then sends forged mail:")
        mail = seal_mail(identities[9], Address(DEFAULT_USER, identities[9].domain),
                         Address(DEFAULT_USER, nodes[1].identity.domain), nodes[1].core.record,
                         "forged", "x", int(time.time()))
        with contextlib.suppress(OSError):
            for n in range(4):                  # each is tampered after signing: -25 each (9.1)
                rogue.send({"type": "mail", "hops": 8, "mail": {**mail, "id": f"{n:032x}"}})
        while (frame := rogue.recv()) is not None:
            if frame["type"] == "error":
                say(f"      node 1 says: error \"{frame['code']}\": {frame['message']}")
        rogue.close()
        bans = self.control(1, "peers", banned=True)
        say("      and bans it: " + "; ".join(f"{b['subject']} until {when(b['until'])}" for b in bans))
        honest = self.control(1, "peers")
        say("      its honest peers are untouched: " +
            ", ".join(f"{self.name(p['domain'])} (score {p['score']})" for p in honest))


def run_demo(args: argparse.Namespace) -> int:
    """python3 secral.py demo."""
    return Demo().run()


BENCH_KEY_POOL = "mail-key-pool"    # made once per run: nodes measured do not spend it making keys


def _generate_pem(_: int) -> bytes:
    return Identity.generate().to_pem()


def make_keys(count: int) -> list[Identity]:
    """`count` fresh RSA-3072 keys, made on every core."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        return [Identity.from_pem(pem) for pem in pool.map(_generate_pem, range(count))]


def bench_keys(base: str, count: int) -> list[Identity]:
    """`count` fresh keys for the tool peers, and the mail-key pool of the
    benchmark's nodes (node --test-key-pool): as many keys as a node makes
    ahead (every epoch up to MAIL_KEYS_AHEAD), so that the run measures
    mail, not the key generation a node does in the background (timed on
    its own)."""
    ahead = epoch_of(MAIL_KEYS_AHEAD) + 2
    keys = make_keys(count + ahead)
    os.makedirs(os.path.join(base, BENCH_KEY_POOL), mode=0o700)
    for n, key in enumerate(keys[count:]):
        save_identity(key, os.path.join(base, BENCH_KEY_POOL, f"{n}.pem"))
    return keys[:count]


class BenchNode:
    """`secral.py node` in a subprocess, for the benchmark."""

    def __init__(self, base: str, name: str, *args: str):
        self.data_dir = os.path.join(base, name)
        os.makedirs(self.data_dir, exist_ok=True)
        import subprocess
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "node", "--json", "--data-dir", self.data_dir,
             "--host", "127.0.0.1", "--port", "0", "--rate", "1000000", "--send-rate", "1000000",
             "--test-key-pool", os.path.join(base, BENCH_KEY_POOL), *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        banner = json.loads(self.proc.stdout.readline())     # node --json: one line once it runs
        self.domain, self.port = banner["domain"], banner["listen"][1] if banner["listen"] else None
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def __call__(self, cmd: str, **args: Any) -> Any:
        return call_node(self.data_dir, cmd, args, timeout=120)

    def rss_kib(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open(f"/proc/{self.proc.pid}/status") as f:
                return int(next(line for line in f if line.startswith("VmRSS")).split()[1])
        return None

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=30)


def _seal_batch(job: tuple[bytes, dict, int, int]) -> list[dict]:
    """Seal `count` 1 KiB mails (a worker process: signing is the slow part)."""
    pem, record, count, now = job
    identity = Identity.from_pem(pem)
    sender, recipient = Address(DEFAULT_USER, identity.domain), Address(DEFAULT_USER, record["domain"])
    return [seal_mail(identity, sender, recipient, record, f"bench {n}", "x" * 1024, now)
            for n in range(count)]


def seal_many(identity: Identity, record: dict, count: int) -> list[dict]:
    import multiprocessing
    workers = max(1, min(os.cpu_count() or 1, 8))
    share = [count // workers + (i < count % workers) for i in range(workers)]
    jobs = [(identity.to_pem(), record, n, int(time.time())) for n in share if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        return [mail for batch in pool.map(_seal_batch, jobs) for mail in batch]


def _timed(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def bench_crypto(base: str) -> dict:
    """The operations that bound a node, on this machine -- and a
    durable commit, which bounds a relay once verification is this cheap."""
    started = time.perf_counter()
    identity = Identity.generate()              # what each epoch costs a node, ahead of time
    t_generate = time.perf_counter() - started
    message = os.urandom(1500)
    signature = sign(identity.key, message)
    wrapped = wrap_key(identity.key.public_key(), os.urandom(32))
    public = identity.key.public_key()
    RSA_MEMO.size = 0                           # time the operations, not the memo
    t_sign = _timed(lambda: sign(identity.key, message), 60)
    t_unwrap = _timed(lambda: unwrap_key(identity.key, wrapped), 60)
    t_verify = _timed(lambda: verify_signature(public, message, signature), 600)
    t_wrap = _timed(lambda: wrap_key(public, os.urandom(32)), 300)
    RSA_MEMO.size = 4096
    store = SqliteMapping(os.path.join(base, "commit.db"), "FULL")
    value, counter = os.urandom(2000), iter(range(10**9))
    t_commit = _timed(lambda: store.__setitem__(str(next(counter)).encode(), value), 300)
    store.close()
    cores = os.cpu_count() or 1
    now = int(time.time())                      # a fresh 30-day record lists 5 or 6 mail keys
    record = make_record(identity, "203.0.113.7", DEFAULT_PORT, now, now + RECORD_LIFETIME,
                         [{"epoch": epoch_of(now) + n, "key": identity.public_b64} for n in range(5)])
    return {"mail_key_generation_s": t_generate, "record_bytes": len(canonical_json(record)),
            "record_bytes_without_mail_keys": len(canonical_json({k: v for k, v in record.items()
                                                                  if k != "mail_keys"})),
            "sign_ms": t_sign * 1e3, "unwrap_ms": t_unwrap * 1e3, "verify_ms": t_verify * 1e3,
            "wrap_ms": t_wrap * 1e3, "commit_ms": t_commit * 1e3, "cores": cores,
            # a delivered mail's private-key work: the sender's signature, the
            # recipient's unwrap and its signature on the ack, on every core
            "machine_bound": cores / (2 * t_sign + t_unwrap),
            "recipient_bound": 1 / (t_unwrap + t_sign), "relay_bound": 1 / (2 * t_verify),
            "durable_relay_bound": 1 / (2 * t_verify + 2 * t_commit),
            # every RSA operation one mail costs on its way, with its ack: sign and
            # wrap (sender); verify (relay, recipient); unwrap and sign (recipient);
            # the ack verified by the relay and the sender
            "idle_crypto_ms": (2 * t_sign + t_unwrap + t_wrap + 4 * t_verify) * 1e3}


IDLE_MAILS = 50                 # mails sent one at a time for the idle latency
E2E_CLIENTS = 4                 # clients submitting at once: one alone waits for each reply,
                                # and its node would seal on one core at a time
BENCH_IDENTITIES: list[Identity] = []   # the tool peers' keys and mail keys (bench_keys)


def bench_end_to_end(base: str, mails: int) -> dict:
    """sender -> relay -> recipient, three processes: mails/s and latency."""
    relay = BenchNode(base, "relay")
    recipient = BenchNode(base, "recipient", "--no-listen", "--peer", f"127.0.0.1:{relay.port}")
    sender = BenchNode(base, "sender", "--peer", f"127.0.0.1:{relay.port}")
    try:
        deadline = time.monotonic() + 60
        while len(relay("peers")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        to = f"{DEFAULT_USER}@{recipient.domain}"
        first = sender("send", to=to, subject="warm-up", body="x")        # NIS lookup, links warm
        sender("wait", id=first["id"], timeout=60)
        body = "x" * 1024
        with concurrent.futures.ThreadPoolExecutor(E2E_CLIENTS) as clients:
            ids = list(clients.map(lambda n: sender("send", to=to, subject=f"bench {n}", body=body)["id"],
                                   range(mails)))
        # Wait for each mail rather than poll the whole outbox: a poll decodes
        # every entry under the sender's lock while it works.
        deadline = time.monotonic() + 300
        for mail_id in ids:
            sender("wait", id=mail_id, timeout=max(1.0, deadline - time.monotonic()))
        entries = {e["id"]: e for e in sender("outbox")}
        done = [entries[i] for i in ids if entries[i]["status"] == "delivered"]
        outbox = sender.data_dir
        latencies = sorted(e["done_ms"] - e["submitted_ms"] for e in _full_outbox(outbox, ids))
        span = (max(e["done_ms"] for e in _full_outbox(outbox, ids)) -
                min(e["submitted_ms"] for e in _full_outbox(outbox, ids))) / 1000
        idle = []                               # one mail at a time: latency with nothing queued
        for n in range(IDLE_MAILS):
            entry = sender("send", to=to, subject=f"idle {n}", body=body)
            sender("wait", id=entry["id"], timeout=60)
            idle.append(entry["id"])
        idle_ms = sorted(e["done_ms"] - e["submitted_ms"] for e in _full_outbox(outbox, idle))
        return {"mails": mails, "clients": E2E_CLIENTS, "delivered": len(done), "seconds": span,
                "mails_per_s": len(done) / span if span else 0.0,
                "p50_ms": latencies[len(latencies) // 2] if latencies else None,
                "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
                "idle_latency_ms": idle_ms[len(idle_ms) // 2] if idle_ms else None}
    finally:
        for node in (sender, recipient, relay):
            node.stop()


def _full_outbox(data_dir: str, ids: list[str]) -> list[dict]:
    """Outbox entries with their millisecond stamps (the control port hides none of them)."""
    entries = {e["id"]: e for e in call_node(data_dir, "outbox")}
    return [entries[i] for i in ids if "done_ms" in entries[i]]


def bench_relay(base: str, mails: int) -> dict:
    """Pre-sealed mails pushed through one relay process, acks coming back:
    relayed mails/s against the bound of verifying one mail and one ack."""
    relay = BenchNode(base, "relay-only", "--origin-max-items", str(mails * 2))
    pusher_id, sink_id, mail_key = BENCH_IDENTITIES[:3]
    try:
        sealed = seal_many(pusher_id, leaf_record(sink_id, mail_key, int(time.time())), mails)
        now = int(time.time())
        acks = [make_ack(sink_id, m, "delivered", "", now) for m in sealed]
        pusher = WirePeer(relay.port, pusher_id, mail_key=mail_key)
        sink = WirePeer(relay.port, sink_id, source="127.0.0.2", mail_key=mail_key)
        pusher.handshake()
        sink.handshake()
        by_id = {a["id"]: a for a in acks}

        def answer() -> None:
            with contextlib.suppress(OSError):  # the sink is closed under it at the end
                while (frame := sink.recv()) is not None:
                    if frame["type"] == "mail":
                        sink.send({"type": "ack", "hops": MAX_HOPS, "ack": by_id[frame["mail"]["id"]]})
        threading.Thread(target=answer, daemon=True).start()
        start = time.perf_counter()
        threading.Thread(target=lambda: [pusher.send({"type": "mail", "hops": MAX_HOPS, "mail": m})
                                         for m in sealed], daemon=True).start()
        received = 0
        while received < mails and (frame := pusher.recv()) is not None:
            received += frame["type"] == "ack"
        elapsed = time.perf_counter() - start
        pusher.close()
        sink.close()
        return {"mails": mails, "relayed": received, "seconds": elapsed, "mails_per_s": received / elapsed}
    finally:
        relay.stop()


def bench_memory(base: str, stored: int) -> dict:
    """Resident memory of a relay holding `stored` mails for an absent node."""
    room = ("--origin-max-items", str(stored), "--store-max-items", str(stored * 2),
            "--origin-max-mb", str(stored // 100 + 64), "--store-max-mb", str(stored // 50 + 512))
    relay = BenchNode(base, "store", *room)        # (a padded 1 KiB mail takes about 4.6 KB)
    pusher_id, absent, mail_key = BENCH_IDENTITIES[3:6]
    try:
        idle = relay.rss_kib()
        sealed = seal_many(pusher_id, leaf_record(absent, mail_key, int(time.time())), stored)
        pusher = WirePeer(relay.port, pusher_id, mail_key=mail_key)
        pusher.handshake()
        for mail in sealed:
            pusher.send({"type": "mail", "hops": MAX_HOPS, "mail": mail})
        deadline = time.monotonic() + 60 + stored / 50
        while relay("status")["relay"]["mail"] < stored and time.monotonic() < deadline:
            time.sleep(0.5)
        held = relay("status")["relay"]
        pusher.close()
        rss = relay.rss_kib()
        relay.stop()
        started = time.perf_counter()           # a restart loads the index of every held item
        relay = BenchNode(base, "store", *room)
        restart_s = time.perf_counter() - started
        return {"stored": held["mail"], "stored_bytes": held["bytes"], "rss_idle_kib": idle,
                "rss_kib": rss, "restart_s": restart_s, "rss_after_restart_kib": relay.rss_kib()}
    finally:
        relay.stop()


def bench_summary(results: dict) -> dict:
    """The figures issue 17 set goals for, each a ratio from this one run."""
    c, e, r = results["crypto"], results["end_to_end"], results["relay"]
    summary = {
        "machine_bound": c["machine_bound"],
        "e2e_mails_per_s": e["mails_per_s"], "e2e_vs_machine_bound": e["mails_per_s"] / c["machine_bound"],
        "relay_mails_per_s": r["mails_per_s"], "relay_vs_verify_bound": r["ratio_to_relay_bound"],
        "relay_vs_durable_bound": r["ratio_to_durable_relay_bound"],
        "idle_latency_ms": e["idle_latency_ms"], "idle_crypto_ms": c["idle_crypto_ms"],
        "idle_latency_vs_crypto": (e["idle_latency_ms"] or 0) / c["idle_crypto_ms"],
    }
    if "memory" in results:
        m = results["memory"]
        summary.update(stored=m["stored"], restart_s=m["restart_s"],
                       rss_mib=(m["rss_after_restart_kib"] or 0) / 1024)
    return summary


def run_bench(args: argparse.Namespace) -> int:
    """python3 secral.py bench: this machine against its own RSA costs."""
    base = tempfile.mkdtemp(prefix="secral-bench-")
    say = functools.partial(print, flush=True, file=sys.stderr if args.json else sys.stdout)
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                            "platform": platform.platform(), "cpu": platform.processor()}}
    try:
        say(f"Secral benchmark on {os.cpu_count()} cores, Python {platform.python_version()}")
        say("  crypto bound ...")
        BENCH_IDENTITIES[:] = bench_keys(base, 6)
        c = results["crypto"] = bench_crypto(base)
        say("  end to end: sender -> relay -> recipient, three processes ...")
        e = results["end_to_end"] = bench_end_to_end(base, args.mails)
        e["ratio_to_recipient_bound"] = e["mails_per_s"] / c["recipient_bound"]
        say("  relay only ...")
        r = results["relay"] = bench_relay(base, args.relay_mails)
        r["ratio_to_relay_bound"] = r["mails_per_s"] / c["relay_bound"]
        r["ratio_to_durable_relay_bound"] = r["mails_per_s"] / c["durable_relay_bound"]
        if args.stored:
            say(f"  a relay holding {args.stored} mails, and its restart ...")
            results["memory"] = bench_memory(base, args.stored)
        results.update(bench_summary(results))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [
        ["RSA-3072 key generation", f"{c['mail_key_generation_s']:.2f} s",
         "one mail key a week, made ahead in the background"],
        ["NIS record with 5 mail keys", f"{c['record_bytes']} bytes",
         f"{c['record_bytes_without_mail_keys']} bytes without them"],
        ["RSA-3072 PSS sign", f"{c['sign_ms']:.2f} ms", ""],
        ["RSA-3072 OAEP unwrap", f"{c['unwrap_ms']:.2f} ms", ""],
        ["RSA-3072 PSS verify", f"{c['verify_ms']:.3f} ms", ""],
        ["SQLite commit, synchronous=FULL", f"{c['commit_ms']:.3f} ms", "one write, WAL"],
        ["machine bound: cores/(2 sign + unwrap)", f"{c['machine_bound']:.0f} mails/s",
         f"{c['cores']} cores, a delivered mail's private-key work"],
        ["recipient bound: 1/(unwrap+sign)", f"{c['recipient_bound']:.0f} mails/s", "one core"],
        ["relay bound: 1/(2 verify)", f"{c['relay_bound']:.0f} mails/s", "one core"],
        ["durable relay bound: 1/(2 verify + 2 commits)", f"{c['durable_relay_bound']:.0f} mails/s",
         "store the mail; store its ack and drop the mail"],
        [f"end to end, {e['delivered']}/{e['mails']} mails of 1 KiB, {e['clients']} clients",
         f"{e['mails_per_s']:.0f} mails/s",
         f"{results['e2e_vs_machine_bound']:.2f} of the machine bound, "
         f"{e['ratio_to_recipient_bound']:.2f} of the recipient bound"],
        ["  delivery latency p50 / p99", f"{e['p50_ms']} / {e['p99_ms']} ms", "submit to ack"],
        [f"  one mail at a time, p50 of {IDLE_MAILS}", f"{e['idle_latency_ms']} ms",
         f"{results['idle_latency_vs_crypto']:.1f} x its RSA work ({c['idle_crypto_ms']:.1f} ms)"],
        [f"relay only, {r['relayed']}/{r['mails']} mails + acks", f"{r['mails_per_s']:.0f} mails/s",
         f"{r['ratio_to_relay_bound']:.2f} of the relay bound, "
         f"{r['ratio_to_durable_relay_bound']:.2f} of the durable one"],
    ]
    if "memory" in results:
        m = results["memory"]
        rows.append([f"relay holding {m['stored']} mails", f"{(m['rss_kib'] or 0) / 1024:.0f} MiB RSS",
                     f"idle node {(m['rss_idle_kib'] or 0) / 1024:.0f} MiB; {m['stored_bytes'] >> 20} MiB on disk"])
        rows.append(["  its restart", f"{m['restart_s']:.1f} s",
                     f"{(m['rss_after_restart_kib'] or 0) / 1024:.0f} MiB RSS after it"])
    print()
    print_table(rows, ["MEASURE", "RESULT", "NOTE"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
