#!/usr/bin/env python3
"""Regenerate the Secral test vectors in this directory.

    python3 spec/vectors/generate.py            # rewrite the *.json files
    python3 spec/vectors/generate.py --check    # exit 1 if any file would change

keys.json is the input: fixed, published test keys (never use them for a real
node).  Every other file is computed from it with secral.py and deterministic
"randomness" (each random value is SHA-256 of a label, cut to size), so the
output is byte-for-byte reproducible.  secral_test.py runs every vector and
checks that regeneration changes nothing.

Each file is {"description", "vectors": [...]}; each vector has an "op" from
the list in PROTOCOL.md section 11 and an "expect" that is "ok" or an error
code.  Binary values are base64 (as on the wire) unless a name ends in _hex.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import secral  # noqa: E402
from secral import Address, RemoteError  # noqa: E402

NOW = 1_800_000_000                 # "now" for every vector: 2027-01-15T08:00:00Z


def det(label: str, n: int) -> bytes:
    """Deterministic bytes for one named random value."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"secral-vectors/{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


class Script:
    """An rng that returns the given values in order (and checks their sizes)."""

    def __init__(self, *values: bytes):
        self.values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self.values.pop(0)
        assert len(value) == n, (len(value), n)
        return value


def load_keys() -> dict[str, secral.Identity]:
    with open(os.path.join(HERE, "keys.json")) as f:
        data = json.load(f)
    return {k["name"]: secral.Identity.from_pem(k["private_pem"]) for k in data["keys"]}, data


def outcome(fn, *args) -> tuple[str, object]:
    try:
        return "ok", fn(*args)
    except RemoteError as exc:
        return exc.code, None


# -- encoding -------------------------------------------------------------------

def encoding_vectors() -> dict:
    vectors = []
    lines = [
        ("simple frame", '{"type":"ping"}'),
        ("keys are sorted by code point, whitespace removed", '{ "type" : "ping", "b": 1, "a": [true, false, null] }'),
        ("non-ASCII text is kept as UTF-8", '{"type":"ping","text":"héllo ✉ 😀"}'),
        ("escapes in the input are decoded then re-encoded minimally", '{"type":"ping","text":"\\u00e9\\n\\t\\"\\\\\\u0001\\u007f\\u2028"}'),
        ("the largest exact integer", '{"type":"ping","n":9007199254740991,"m":-9007199254740991}'),
        ("nested objects are sorted too", '{"type":"ping","o":{"z":1,"y":{"b":2,"a":1}}}'),
        ("16 levels of nesting, the frame included", '{"type":"ping","x":' + "[" * 15 + "]" * 15 + "}"),
        ("17 levels of nesting", '{"type":"ping","x":' + "[" * 16 + "]" * 16 + "}"),
        ("2**53 is out of range", '{"type":"ping","n":9007199254740992}'),
        ("no fractions", '{"type":"ping","n":1.0}'),
        ("no exponents", '{"type":"ping","n":1e3}'),
        ("NaN is not JSON", '{"type":"ping","n":NaN}'),
        ("duplicate member names", '{"type":"ping","a":1,"a":2}'),
        ("non-ASCII member names", '{"type":"ping","é":1}'),
        ("a lone surrogate cannot be encoded", '{"type":"ping","s":"\\ud800"}'),
        ("a frame is an object", '["ping"]'),
        ("type is required", '{"kind":"ping"}'),
        ("type must be a string", '{"type":1}'),
        ("truncated", '{"type":"ping"'),
        ("empty line", ''),
    ]
    for comment, line in lines:
        code, frame = outcome(secral.decode_frame, line.encode())
        entry = {"op": "decode_frame", "comment": comment, "line": line}
        if code == "ok":
            code, canonical = outcome(secral.canonical_json, frame)
            if code == "ok":
                entry["canonical"] = canonical.decode()
        entry["expect"] = code
        vectors.append(entry)
    for comment, raw in [("invalid UTF-8", b'{"type":"ping","s":"\xff"}'),
                         ("overlong UTF-8 encoding of '/'", b'{"type":"ping","s":"\xc0\xaf"}')]:
        code, _ = outcome(secral.decode_frame, raw)
        vectors.append({"op": "decode_frame", "comment": comment, "line_hex": raw.hex(), "expect": code})
    prefix, suffix = '{"type":"ping","pad":"', '"}\n'
    fill = secral.MAX_LINE - len(prefix) - len(suffix)
    for comment, count in [("exactly the line limit, newline included", fill),
                           ("one byte over the line limit", fill + 1)]:
        line = (prefix + "a" * count + suffix).encode()
        code, _ = outcome(secral.decode_frame, line)
        vectors.append({"op": "decode_frame", "comment": comment, "line_prefix": prefix, "repeat": "a",
                        "count": count, "line_suffix": suffix, "length": len(line), "expect": code})
    for comment, text in [("canonical", "QUJD"), ("padding", "QQ=="), ("stray bits in the last character", "QR=="),
                          ("missing padding", "QQ"), ("URL-safe alphabet", "-_-_"), ("whitespace", "QU JD"),
                          ("empty", "")]:
        code, data = outcome(secral.b64d, text, "value")
        entry = {"op": "base64_decode", "comment": comment, "text": text}
        if code == "ok":
            entry["bytes_hex"] = data.hex()
        entry["expect"] = code
        vectors.append(entry)
    return {"description": "Frame decoding (3.1), canonical JSON (3.2) and base64 (3.3). decode_frame: "
                           "the line (given as text, as hex, or as prefix + repeat*count + suffix) is decoded; "
                           "if that succeeds, 'canonical' is its canonical JSON.",
            "vectors": vectors}


# -- names ----------------------------------------------------------------------

def names_vectors(keys, data) -> dict:
    vectors = []
    for k in data["keys"]:
        vectors.append({"op": "domain_of_key", "comment": f"test key {k['name']}", "key": k["public"],
                        "domain": k["domain"], "expect": "ok"})
    for bad in data["bad_keys"]:
        code, _ = outcome(secral.parse_public_key, bad["public"])
        vectors.append({"op": "domain_of_key", "comment": bad["comment"], "key": bad["public"], "expect": code})
    alice = keys["alice"].domain
    for comment, text in [
        ("the default user", f"Default@{alice}"), ("the system user", f"Core@{alice}"),
        ("dots, dashes, underscores", f"a.b-c_9@{alice}"), ("64 characters", "u" * 64 + f"@{alice}"),
        ("65 characters", "u" * 65 + f"@{alice}"), ("empty user", f"@{alice}"),
        ("user starts with a dot", f".alice@{alice}"), ("user with a space", f"al ice@{alice}"),
        ("two @", f"a@b@{alice}"), ("uppercase domain", f"Default@{alice.upper()}"),
        ("domain too short", f"Default@{alice[:-1]}"), ("domain with a non-base32 letter", f"Default@{alice[:-1]}1"),
        ("not node-", "Default@host-" + alice[5:]), ("no @", "Default"), ("non-ASCII user", f"Élise@{alice}"),
    ]:
        code, address = outcome(secral.parse_address, text)
        entry = {"op": "parse_address", "comment": comment, "address": text}
        if code == "ok":
            entry.update(user=address.user, domain=address.domain, folded=address.key)
        entry["expect"] = code
        vectors.append(entry)
    return {"description": "Domains derive from keys (5.1); addresses parse (5.2). 'folded' is the "
                           "form addresses compare by: the user part in ASCII lowercase.",
            "vectors": vectors}


# -- NIS records -----------------------------------------------------------------

def records_vectors(keys) -> dict:
    alice, bob = keys["alice"], keys["bob"]

    def record(identity, host, port, seq, expires, label):
        return secral.make_record(identity, host, port, seq, expires, Script(det(label, 32)))

    good = record(alice, "198.51.100.7", 7700, 1_800_000_000, NOW + 30 * 86400, "record-good")
    natted = record(bob, None, 0, 7, NOW + 86400, "record-natted")
    cases = [
        ("a record with a host", good, NOW),
        ("a record without a host (behind NAT)", natted, NOW),
        ("expired", good, NOW + 30 * 86400),
        ("the host was changed after signing", {**good, "host": "203.0.113.9"}, NOW),
        ("the domain is someone else's", {**good, "domain": bob.domain}, NOW),
        ("the key is someone else's", {**good, "key": bob.public_b64}, NOW),
        ("expires exactly 30 days and 20 minutes ahead: the longest allowed",
         record(alice, "198.51.100.7", 7700, 2, NOW + secral.MAX_RECORD_LIFETIME, "record-longest"), NOW),
        ("expires more than 30 days and 20 minutes ahead (clocks may differ by 2 x 10 min)",
         record(alice, "198.51.100.7", 7700, 2, NOW + secral.MAX_RECORD_LIFETIME + 1, "record-long"), NOW),
        ("port 0 with a host", alice.sign({**good, "port": 0}, Script(det("record-port0", 32))), NOW),
        ("a port without a host", alice.sign({**natted, "port": 7700, "domain": alice.domain,
                                              "key": alice.public_b64}, Script(det("record-noh", 32))), NOW),
        ("kind is not nis", alice.sign({**good, "kind": "mail"}, Script(det("record-kind", 32))), NOW),
        ("seq is a string", alice.sign({**good, "seq": "5"}, Script(det("record-seq", 32))), NOW),
        ("missing expires", {k: v for k, v in good.items() if k != "expires"}, NOW),
    ]
    vectors = []
    for comment, rec, now in cases:
        code, _ = outcome(secral.verify_record, rec, now)
        vectors.append({"op": "verify_record", "comment": comment, "now": now, "record": rec, "expect": code})
    newer = record(alice, "198.51.100.8", 7700, good["seq"] + 1, NOW + 30 * 86400, "record-newer")
    for comment, new, old in [("higher seq replaces", newer, good), ("lower seq does not", good, newer),
                              ("equal seq does not, even if different", {**good, "host": "x"}, good),
                              ("anything replaces nothing", good, None)]:
        vectors.append({"op": "record_supersedes", "comment": comment, "new": new, "old": old,
                        "result": secral.record_supersedes(new, old), "expect": "ok"})
    return {"description": "NIS records (5.3): verify_record checks a record at time 'now'; "
                           "record_supersedes says whether 'new' replaces 'old' in a NIS map.",
            "vectors": vectors}


# -- mail and acks ------------------------------------------------------------------

def randomness(label: str) -> dict:
    return {"id_hex": det(f"{label}/id", 16).hex(), "aes_key_hex": det(f"{label}/aes", 32).hex(),
            "nonce_hex": det(f"{label}/nonce", 12).hex(), "oaep_seed_hex": det(f"{label}/oaep", 32).hex(),
            "pss_salt_hex": det(f"{label}/salt", 32).hex()}


def seal(keys, label, sender, recipient, to_user, subject, body, created, ttl,
         key_of=None, plain_override=None) -> tuple[dict, dict]:
    r = randomness(label)
    rng = Script(*(bytes.fromhex(r[n]) for n in ("id_hex", "aes_key_hex", "nonce_hex", "oaep_seed_hex", "pss_salt_hex")))
    s, t = keys[sender], keys[recipient]
    wrap_for = keys[key_of] if key_of else t
    if plain_override is None:
        mail = secral.seal_mail(s, Address("Default", s.domain), Address(to_user, t.domain),
                                t.public_b64, subject, body, created, ttl, rng)
        return mail, r
    # Hand-built: what a faulty sender might seal (the checks a sealer makes are skipped).
    mail = {"kind": "mail", "id": rng(16).hex(), "from": f"Default@{s.domain}", "to": f"{to_user}@{t.domain}",
            "from_key": s.public_b64, "created": created, "expires": created + ttl}
    aes, nonce = rng(32), rng(12)
    mail["ct"] = secral.b64e(secral.seal_gcm(aes, nonce, plain_override, secral.envelope_of(mail)))
    mail["nonce"] = secral.b64e(nonce)
    mail["key"] = secral.b64e(secral.wrap_key(wrap_for.key, aes, rng))
    return s.sign(mail, rng), r


def mail_vectors(keys) -> dict:
    vectors = []
    created = NOW - 60
    good, r = seal(keys, "mail-basic", "alice", "bob", "Default", "Hello Bob", "Lunch at noon?\n— Alice",
                   created, 86400)
    vectors.append({"op": "seal_mail", "comment": "Alice's node seals a mail to Bob",
                    "sender": "alice", "from": good["from"], "to": good["to"], "recipient_key": "bob",
                    "subject": "Hello Bob", "body": "Lunch at noon?\n— Alice", "created": created, "ttl": 86400,
                    "random": r, "mail": good, "expect": "ok"})
    unicode_mail, r2 = seal(keys, "mail-unicode", "bob", "alice", "alice.w", "Ünïcødé ✉ 😀", "", created, 600)
    vectors.append({"op": "seal_mail", "comment": "empty body, non-ASCII subject, another user",
                    "sender": "bob", "from": unicode_mail["from"], "to": unicode_mail["to"],
                    "recipient_key": "alice", "subject": "Ünïcødé ✉ 😀", "body": "", "created": created,
                    "ttl": 600, "random": r2, "mail": unicode_mail, "expect": "ok"})

    def resign(mail, label, **change):
        return keys["alice"].sign({**mail, **change}, Script(det(label, 32)))

    relay_cases = [
        ("valid", good, NOW),
        ("valid up to its last second", good, good["expires"] - 1),
        ("expired", good, good["expires"]),
        ("created 20 minutes ahead of the relay's clock (two clocks, each 10 min off)",
         resign(good, "m-future-ok", created=NOW + 1200, expires=NOW + 3600), NOW),
        ("created more than 20 minutes ahead", resign(good, "m-future", created=NOW + 1201, expires=NOW + 3600), NOW),
        ("lives longer than 7 days", resign(good, "m-ttl", expires=created + 7 * 86400 + 1), NOW),
        ("expires before it is created", resign(good, "m-neg", expires=created - 1), NOW),
        ("a signature over other content (ciphertext tampered)",
         {**good, "ct": secral.b64e(bytes([secral.b64d(good["ct"], "ct")[0] ^ 1]) + secral.b64d(good["ct"], "ct")[1:])}, NOW),
        ("the recipient was changed", {**good, "to": f"Default@{keys['carol'].domain}"}, NOW),
        ("signed by another node's key that claims Alice's address",
         keys["carol"].sign({**good, "from_key": keys["carol"].public_b64}, Script(det("m-wrongkey", 32))), NOW),
        ("the signature is cut short", {**good, "sig": good["sig"][:-8]}, NOW),
        ("id is uppercase", resign(good, "m-id", id=good["id"].upper()), NOW),
        ("the nonce is 16 bytes", resign(good, "m-nonce", nonce=secral.b64e(b"\0" * 16)), NOW),
        ("the wrapped key is 2048 bits long", resign(good, "m-key", key=secral.b64e(b"\1" * 256)), NOW),
        ("kind is ack", resign(good, "m-kind", kind="ack"), NOW),
        ("created is a string", resign(good, "m-created", created=str(created)), NOW),
        ("the from address is not an address", resign(good, "m-from", **{"from": "alice"}), NOW),
        ("from Core, which never sends mail",
         resign(good, "m-core", **{"from": f"Core@{keys['alice'].domain}"}), NOW),
        ("missing sig", {k: v for k, v in good.items() if k != "sig"}, NOW),
    ]
    for comment, mail, now in relay_cases:
        code, _ = outcome(secral.verify_mail, mail, now)
        vectors.append({"op": "verify_mail", "comment": comment, "now": now, "mail": mail, "expect": code})

    def open_case(comment, mail, recipient, now=NOW):
        code, plain = outcome(lambda: secral.open_mail(keys[recipient], secral.verify_mail(mail, now)))
        entry = {"op": "open_mail", "comment": comment, "now": now, "recipient": recipient, "mail": mail}
        if code == "ok":
            entry["plaintext"] = plain
        entry["expect"] = code
        vectors.append(entry)

    open_case("Bob opens Alice's mail", good, "bob")
    open_case("Alice opens Bob's mail to alice.w", unicode_mail, "alice")
    open_case("Carol cannot: it is not addressed to her", good, "carol")
    wrong_key, _ = seal(keys, "mail-wrongkey", "alice", "bob", "Default", "s", "b", created, 3600, key_of="carol",
                        plain_override=secral.canonical_json({"from": f"Default@{keys['alice'].domain}",
                                                              "to": f"Default@{keys['bob'].domain}",
                                                              "subject": "s", "body": "b"}))
    open_case("the key was wrapped for Carol, the mail addressed to Bob", wrong_key, "bob")
    plain = {"from": f"Default@{keys['alice'].domain}", "to": f"Default@{keys['bob'].domain}", "subject": "s", "body": "b"}
    mismatch, _ = seal(keys, "mail-mismatch", "alice", "bob", "Default", "", "", created, 3600,
                       plain_override=secral.canonical_json({**plain, "to": f"Default@{keys['carol'].domain}"}))
    open_case("the sealed 'to' differs from the envelope's", mismatch, "bob")
    not_json, _ = seal(keys, "mail-notjson", "alice", "bob", "Default", "", "", created, 3600,
                       plain_override=b"Dear Bob")
    open_case("the sealed content is not JSON", not_json, "bob")
    long_subject, _ = seal(keys, "mail-subject", "alice", "bob", "Default", "", "", created, 3600,
                           plain_override=secral.canonical_json({**plain, "subject": "s" * 257}))
    open_case("a 257-character subject", long_subject, "bob")
    control, _ = seal(keys, "mail-control", "alice", "bob", "Default", "", "", created, 3600,
                      plain_override=secral.canonical_json({**plain, "subject": "a\r\nBcc: eve"}))
    open_case("a subject with a line break", control, "bob")
    for label, char, name in [("mail-u2028", "\u2028", "U+2028 LINE SEPARATOR"),
                              ("mail-u0085", "\u0085", "U+0085 NEXT LINE, a C1 control")]:
        breaker, _ = seal(keys, label, "alice", "bob", "Default", "", "", created, 3600,
                          plain_override=secral.canonical_json({**plain, "subject": f"one{char}two"}))
        open_case(f"a subject with {name}: it breaks lines in mail clients", breaker, "bob")
    missing, _ = seal(keys, "mail-missing", "alice", "bob", "Default", "", "", created, 3600,
                      plain_override=secral.canonical_json({k: v for k, v in plain.items() if k != "body"}))
    open_case("the sealed content has no body", missing, "bob")
    return {"description": "Mail (6): seal_mail with the given randomness gives exactly 'mail'; verify_mail "
                           "is what a relay checks at 'now'; open_mail is verify_mail plus what only the "
                           "recipient (a key from keys.json) can check.", "vectors": vectors}


def acks_vectors(keys) -> dict:
    mail = json.loads(json.dumps(mail_vectors(keys)["vectors"][0]["mail"]))
    vectors = []
    created = NOW

    def ack(status, reason, label, signer="bob"):
        return secral.make_ack(keys[signer], mail, status, reason, created, Script(det(label, 32)))

    delivered = ack("delivered", "", "ack-delivered")
    rejected = ack("rejected", "no_such_user", "ack-rejected")
    for comment, obj, salt in [("Bob's node acknowledges Alice's mail", delivered, "ack-delivered"),
                               ("a rejection says why", rejected, "ack-rejected")]:
        vectors.append({"op": "make_ack", "comment": comment, "signer": "bob", "mail": mail,
                        "status": obj["status"], "reason": obj["reason"], "created": created,
                        "pss_salt_hex": det(salt, 32).hex(), "ack": obj, "expect": "ok"})

    def resign(label, **change):
        return keys["bob"].sign({**delivered, **change}, Script(det(label, 32)))
    cases = [
        ("valid", delivered, NOW),
        ("valid rejection", rejected, NOW),
        ("as old as the oldest mail it could answer", delivered, created + secral.ack_lifetime() - 1),
        ("older than any mail it could answer", delivered, created + secral.ack_lifetime()),
        ("created more than 20 minutes ahead", resign("a-future", created=NOW + 1201), NOW),
        ("status changed after signing", {**delivered, "status": "rejected"}, NOW),
        ("an unknown status", resign("a-status", status="read"), NOW),
        ("not from Core", resign("a-user", **{"from": f"Default@{keys['bob'].domain}"}), NOW),
        ("not to Core", resign("a-to", to=f"Default@{keys['alice'].domain}"), NOW),
        ("signed by Carol in Bob's name",
         keys["carol"].sign({**delivered, "from_key": keys["carol"].public_b64}, Script(det("a-carol", 32))), NOW),
        ("a reason over 256 characters", resign("a-reason", reason="x" * 257), NOW),
        ("a reason with a line break", resign("a-reason-ctl", reason="no_such_user\nBcc: eve"), NOW),
        ("a reason with U+2029 PARAGRAPH SEPARATOR", resign("a-reason-u2029", reason="no\u2029such"), NOW),
        ("kind is mail", resign("a-kind", kind="mail"), NOW),
        ("a delivered ack with a reason", resign("a-delivered-reason", reason="read it twice"), NOW),
    ]
    for comment, obj, now in cases:
        code, _ = outcome(secral.verify_ack, obj, now)
        vectors.append({"op": "verify_ack", "comment": comment, "now": now, "ack": obj, "expect": code})
    return {"description": "Acks (7.3): make_ack for 'mail' with the given salt gives exactly 'ack'; "
                           "verify_ack checks an ack at 'now'.", "vectors": vectors}


# -- handshake and frames ------------------------------------------------------------------

def handshake_vectors(keys) -> dict:
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    alice_record = secral.make_record(alice, "198.51.100.7", 7700, 1, NOW + 86400, Script(det("hs-ra", 32)))
    bob_record = secral.make_record(bob, None, 0, 1, NOW + 86400, Script(det("hs-rb", 32)))
    carol_record = secral.make_record(carol, None, 0, 1, NOW + 86400, Script(det("hs-rc", 32)))
    alice_nonce, bob_nonce = secral.b64e(det("hs-alice-nonce", 16)), secral.b64e(det("hs-bob-nonce", 16))
    hello = secral.make_hello(alice_record, det("hs-alice-nonce", 16))
    hello["agent"] = "secral-vectors/1"
    # Alice dials Bob: her auth answers Bob's challenge and wraps her link secret for Bob.
    a_secret, b_secret = det("hs-alice-secret", 32), det("hs-bob-secret", 32)
    auth = secral.make_auth(alice, bob_record, bob_nonce, a_secret,
                            Script(det("hs-auth-oaep", 32), det("hs-auth-salt", 32)))
    reply = secral.make_auth(bob, alice_record, alice_nonce, b_secret,
                             Script(det("hs-reply-oaep", 32), det("hs-reply-salt", 32)))
    vectors = [
        {"op": "make_auth", "comment": "Alice (dialler) answers Bob's challenge",
         "signer": "alice", "peer_record": bob_record, "peer_nonce": bob_nonce,
         "link_secret_hex": a_secret.hex(), "oaep_seed_hex": det("hs-auth-oaep", 32).hex(),
         "pss_salt_hex": det("hs-auth-salt", 32).hex(),
         "statement": secral.canonical_json(secral.auth_statement(bob_nonce, alice.domain, bob.domain,
                                                                  auth["secret"])).decode(),
         "hello": hello, "auth": auth, "expect": "ok"},
        {"op": "make_auth", "comment": "Bob (listener) answers Alice's, once hers has verified",
         "signer": "bob", "peer_record": alice_record, "peer_nonce": alice_nonce,
         "link_secret_hex": b_secret.hex(), "oaep_seed_hex": det("hs-reply-oaep", 32).hex(),
         "pss_salt_hex": det("hs-reply-salt", 32).hex(),
         "statement": secral.canonical_json(secral.auth_statement(alice_nonce, bob.domain, alice.domain,
                                                                  reply["secret"])).decode(),
         "auth": reply, "expect": "ok"},
    ]
    other = secral.make_auth(alice, bob_record, bob_nonce, det("hs-other-secret", 32),
                             Script(det("hs-o-oaep", 32), det("hs-o-salt", 32)))
    cases = [
        ("Bob checks Alice's auth against the record in her hello", auth, alice_record, bob_nonce, bob.domain),
        ("a replay on a connection with another challenge", auth, alice_record,
         secral.b64e(det("hs-other", 16)), bob.domain),
        ("relayed to Carol: the auth names Bob", auth, alice_record, bob_nonce, carol.domain),
        ("someone else's record: Carol's record with Alice's signature", auth, carol_record, bob_nonce, bob.domain),
        ("the link secret swapped for another one", {**auth, "secret": other["secret"]}, alice_record,
         bob_nonce, bob.domain),
        ("the secret is not an RSA-3072 block", {**auth, "secret": secral.b64e(b"x" * 32)}, alice_record,
         bob_nonce, bob.domain),
    ]
    for comment, a, record, nonce, own in cases:
        code, _ = outcome(secral.verify_auth, a, record, nonce, own)
        vectors.append({"op": "verify_auth", "comment": comment, "auth": a, "record": record,
                        "own_nonce": nonce, "own_domain": own, "expect": code})
    for comment, frame, reader in [("Bob unwraps Alice's link secret", auth, "bob"),
                                   ("Carol cannot", auth, "carol")]:
        code, secret = outcome(secral.open_auth, keys[reader], frame)
        entry = {"op": "open_auth", "comment": comment, "reader": reader, "auth": frame}
        if code == "ok":
            entry["link_secret_hex"] = secret.hex()
        entry["expect"] = code
        vectors.append(entry)
    k_dl, k_ld = secral.link_keys(a_secret, b_secret, alice_nonce, bob_nonce)
    vectors.append({"op": "link_keys", "comment": "the MAC keys of Alice's link to Bob (Alice dialled)",
                    "dialler_secret_hex": a_secret.hex(), "listener_secret_hex": b_secret.hex(),
                    "dialler_nonce": alice_nonce, "listener_nonce": bob_nonce,
                    "dialler_to_listener_hex": k_dl.hex(), "listener_to_dialler_hex": k_ld.hex(),
                    "expect": "ok"})
    first = secral.add_mac(k_dl, 0, {"type": "getpeers"})
    second = secral.add_mac(k_dl, 1, {"type": "ping"})
    answer = secral.add_mac(k_ld, 0, {"type": "pong"})
    for comment, key_, seq, frame in [
        ("Alice's first frame after the handshake", k_dl, 0, first),
        ("her second", k_dl, 1, second),
        ("Bob's first frame, under the other key", k_ld, 0, answer),
        ("a frame replayed at another position", k_dl, 1, first),
        ("a frame sent with the wrong direction's key", k_ld, 1, second),
        ("a frame changed after its MAC", k_dl, 1, {**second, "type": "pong"}),
        ("a frame without a MAC", k_dl, 0, {"type": "getpeers"}),
    ]:
        code, _ = outcome(secral.check_mac, key_, seq, frame)
        vectors.append({"op": "check_mac", "comment": comment, "key_hex": key_.hex(), "seq": seq,
                        "frame": frame, "expect": code})
    return {"description": "The handshake (8.1) and link MACs (8.4). make_auth wraps 'link_secret_hex' for "
                           "the peer (OAEP seed given) and signs 'statement' (PSS salt given); verify_auth "
                           "checks an auth against the peer's record and our own nonce and domain; "
                           "open_auth unwraps the peer's link secret; link_keys derives the two MAC keys; "
                           "check_mac checks a frame's MAC for a key and sequence number.",
            "vectors": vectors}


def frames_vectors(keys) -> dict:
    d = keys["alice"].domain
    cases = [
        ("ping", {"type": "ping"}),
        ("unknown fields are ignored", {"type": "pong", "future": [1, 2]}),
        ("an unknown type", {"type": "teleport"}),
        ("mail with hops 8", {"type": "mail", "hops": 8, "mail": {}}),
        ("mail with hops 9", {"type": "mail", "hops": 9, "mail": {}}),
        ("mail with negative hops", {"type": "mail", "hops": -1, "mail": {}}),
        ("mail with hops as a string", {"type": "mail", "hops": "8", "mail": {}}),
        ("mail with hops as a boolean", {"type": "mail", "hops": True, "mail": {}}),
        ("mail without hops", {"type": "mail", "mail": {}}),
        ("mail whose mail is a string", {"type": "mail", "hops": 1, "mail": "x"}),
        ("ack", {"type": "ack", "hops": 0, "ack": {}}),
        ("nis_query", {"type": "nis_query", "qid": "0" * 32, "domain": d, "hops": 3}),
        ("nis_query with hops 4", {"type": "nis_query", "qid": "0" * 32, "domain": d, "hops": 4}),
        ("nis_query for a bad domain", {"type": "nis_query", "qid": "0" * 32, "domain": "node-x", "hops": 3}),
        ("nis_query with a short qid", {"type": "nis_query", "qid": "00", "domain": d, "hops": 3}),
        ("nis_answer", {"type": "nis_answer", "qid": "0" * 32, "record": {}}),
        ("getpeers", {"type": "getpeers"}),
        ("peers", {"type": "peers", "records": []}),
        ("peers with an object for records", {"type": "peers", "records": {}}),
        ("hello", {"type": "hello", "v": 1, "record": {}, "nonce": "", "agent": "x"}),
        ("hello with a long agent", {"type": "hello", "v": 1, "record": {}, "nonce": "", "agent": "x" * 129}),
        ("auth", {"type": "auth", "secret": "", "sig": ""}),
        ("auth without the link secret", {"type": "auth", "sig": ""}),
        ("error", {"type": "error", "code": "busy", "message": "too many connections"}),
        ("error refusing one object", {"type": "error", "code": "quota_exceeded", "message": "full", "ref": "0" * 32}),
        ("error without a message", {"type": "error", "code": "busy"}),
    ]
    vectors = []
    for comment, frame in cases:
        code, _ = outcome(secral.verify_frame, frame)
        vectors.append({"op": "verify_frame", "comment": comment, "frame": frame, "expect": code})
    return {"description": "The frame catalogue (8.2): verify_frame checks a decoded frame's type and the "
                           "types and ranges of its fields (the objects inside are checked separately).",
            "vectors": vectors}


# -- NIS lookups ------------------------------------------------------------------------------

def nis_vectors(keys) -> dict:
    bob, carol = keys["bob"], keys["carol"]

    def record(identity, seq, label, host="198.51.100.9", port=7700, expires=NOW + 86400, **change):
        rec = secral.make_record(identity, host, port, seq, expires, Script(det(label, 32)))
        return identity.sign({**rec, **change}, Script(det(label + "/2", 32))) if change else rec

    qid = det("nis-qid", 16).hex()
    bob1 = record(bob, 1_800_000_000, "nis-bob1")
    vectors = []
    for comment, answer, domain, expect_event in [
        ("the record asked for", bob1, bob.domain, None),
        ("a valid record, but for another domain", record(carol, 5, "nis-carol"), bob.domain, "forged_record"),
        ("Carol's signature on a record claiming Bob's domain",
         record(carol, 9, "nis-forged", domain=bob.domain), bob.domain, "forged_record"),
        ("Bob's record with Carol's key", {**bob1, "key": carol.public_b64}, bob.domain, "forged_record"),
        ("Bob's record, host changed by the answerer", {**bob1, "host": "203.0.113.66"}, bob.domain,
         "forged_record"),
        ("an expired record: stale, not forged", record(bob, 3, "nis-old", expires=NOW - 1), bob.domain, "expired"),
        ("not a record", {"kind": "nis"}, bob.domain, "malformed"),
    ]:
        frame = {"type": "nis_answer", "qid": qid, "record": answer}
        code, _ = outcome(secral.verify_nis_answer, frame, domain, NOW)
        event = None if code == "ok" else secral.forgery_event(RemoteError(code, ""))
        assert event == expect_event, (comment, code, event)
        vectors.append({"op": "verify_nis_answer", "comment": comment, "now": NOW, "query_domain": domain,
                        "answer": frame, "event": event, "expect": code})
    bob2 = record(bob, bob1["seq"] + 1, "nis-bob2", host="198.51.100.10")
    bob0 = record(bob, bob1["seq"] - 1, "nis-bob0", host="198.51.100.8")
    for comment, offers, result in [
        ("records fill an empty map", [bob1, record(carol, 1, "nis-c1")], None),
        ("a higher seq replaces", [bob1, bob2], None),
        ("a lower seq arriving later changes nothing", [bob2, bob0, bob1], None),
        ("an equal seq does not replace, even with another host", [bob1, {**bob1, "host": "x"}], None),
        ("a record that does not verify is never stored", [bob1, {**bob2, "host": "203.0.113.66"}], None),
    ]:
        nis_map: dict[str, dict] = {}
        for offer in offers:
            try:
                secral.verify_record(offer, NOW)
            except RemoteError:
                continue
            if secral.record_supersedes(offer, nis_map.get(offer["domain"])):
                nis_map[offer["domain"]] = offer
        vectors.append({"op": "nis_map", "comment": comment, "now": NOW, "offers": offers,
                        "map": {d: {"seq": r["seq"], "host": r["host"]} for d, r in sorted(nis_map.items())},
                        "expect": "ok"})
    return {"description": "NIS lookups (5.4): verify_nis_answer checks the record in an answer to a "
                           "query for 'query_domain'; 'event' is the reputation event the answerer earns "
                           "(9.1). nis_map offers records in order to an empty NIS map (verify, then keep "
                           "only a strictly higher seq) and shows the map at the end.",
            "vectors": vectors}


# -- driver -------------------------------------------------------------------------------------

def render(obj: dict) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    keys, data = load_keys()
    files = {
        "encoding.json": encoding_vectors(),
        "names.json": names_vectors(keys, data),
        "records.json": records_vectors(keys),
        "mail.json": mail_vectors(keys),
        "acks.json": acks_vectors(keys),
        "handshake.json": handshake_vectors(keys),
        "frames.json": frames_vectors(keys),
        "nis.json": nis_vectors(keys),
    }
    return {name: render({"file": name, **content}) for name, content in files.items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for name, text in build().items():
        path = os.path.join(HERE, name)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:
            changed.append(name)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if check and changed:
        print("would change: " + ", ".join(changed))
        return 1
    print(("changed: " + ", ".join(changed)) if changed else "all vectors up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
