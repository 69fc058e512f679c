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
    """The test nodes by name, and their mail keys by name too ("bob-2976")."""
    with open(os.path.join(HERE, "keys.json")) as f:
        data = json.load(f)
    MAIL_KEYS.update((k["name"], k) for k in data["mail_keys"])
    OWNERS.update((k["domain"], k["name"]) for k in data["keys"])
    return {k["name"]: secral.Identity.from_pem(k["private_pem"]) for k in data["keys"] + data["mail_keys"]}, data


MAIL_KEYS: dict[str, dict] = {}     # keys.json's mail keys by name
OWNERS: dict[str, str] = {}         # test node names by domain


def ring_of(owner: str) -> secral.MailKeys:
    """A test node's mail keys as every vector assumes them (11): all of its
    keys in keys.json, but those marked "deleted", whose ids it remembers."""
    ring = secral.MailKeys()
    for k in MAIL_KEYS.values():
        if k["owner"] == owner and k.get("deleted"):
            ring.retired.add(k["id_hex"])
        elif k["owner"] == owner:
            ring.add(k["epoch"], secral.Identity.from_pem(k["private_pem"]))
    return ring


def make_record(identity, host, port, seq, expires, rng, first=None) -> dict:
    """A record listing its node's mail keys from epoch `first` (by default
    now's) to its expiry's (5.3)."""
    owner = OWNERS[identity.domain]
    first = secral.epoch_of(NOW) if first is None else first
    listed = [{"epoch": e, "key": MAIL_KEYS[f"{owner}-{e}"]["public"]}
              for e in range(first, secral.epoch_of(expires - 1) + 1)]
    return secral.make_record(identity, host, port, seq, expires, listed, rng)


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
        ("a lone surrogate escape is refused when the line is parsed", '{"type":"ping","s":"\\ud800"}'),
        ("a lone low surrogate escape", '{"type":"ping","s":"x\\udc00"}'),
        ("a surrogate pair in the wrong order", '{"type":"ping","s":"\\ude00\\ud83d"}'),
        ("a surrogate pair is one character, re-encoded as UTF-8", '{"type":"ping","s":"\\ud83d\\ude00"}'),
        ("grammar first: a fraction in a line that never closes", '{"type":"ping","n":1.5'),
        ("grammar first: a 400-digit integer in a line that never closes", '{"type":"ping","n":' + "9" * 400),
        ("grammar first: a duplicate member name in a line that never closes", '{"type":"ping","a":1,"a":2'),
        ("grammar first: 17 levels of nesting, then a syntax error", '{"type":"ping","x":' + "[" * 16 + "]" * 16 + ",}"),
        ("5000 levels of nesting, all closed: JSON, too deep", '{"type":"ping","x":' + "[" * 5000 + "]" * 5000 + "}"),
        ("5000 levels of nesting, never closed: not JSON", '{"type":"ping","x":' + "[" * 5000),
        ("5000 levels of nesting with a syntax error deep inside: not JSON",
         '{"type":"ping","x":' + "[" * 5000 + "1 2" + "]" * 5000 + "}"),
        ("a fraction and a duplicate name, both Secral rules: malformed", '{"type":"ping","n":1.5,"n":2}'),
        ("a frame is an object", '["ping"]'),
        ("type is required", '{"kind":"ping"}'),
        ("type must be a string", '{"type":1}'),
        ("truncated", '{"type":"ping"'),
        ("empty line", ''),
        ("a carriage return before the line feed is JSON whitespace", '{"type":"ping"}\r'),
    ]
    for comment, line in lines:
        line += "\n"                             # as read: the line feed included
        code, frame = outcome(secral.decode_frame, line.encode())
        entry = {"op": "decode_frame", "comment": comment, "line": line}
        if code == "ok":
            code, canonical = outcome(secral.canonical_json, frame)
            if code == "ok":
                entry["canonical"] = canonical.decode()
        entry["expect"] = code
        vectors.append(entry)
    for comment, raw in [("invalid UTF-8", b'{"type":"ping","s":"\xff"}\n'),
                         ("overlong UTF-8 encoding of '/'", b'{"type":"ping","s":"\xc0\xaf"}\n'),
                         ("invalid UTF-8 in a line that is not JSON either", b'{"type":"ping","s":"\xff\n')]:
        code, _ = outcome(secral.decode_frame, raw)
        vectors.append({"op": "decode_frame", "comment": comment, "line_hex": raw.hex(), "expect": code})
    prefix, suffix = '{"type":"ping","pad":"', '"}\n'
    fill = secral.MAX_LINE - len(prefix) - len(suffix)
    for comment, count in [("262,144 bytes with the line feed: exactly the limit", fill),
                           ("262,144 bytes and then the line feed: one byte over", fill + 1)]:
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
                           "the line exactly as read, its line feed included (given as text, as hex, or as "
                           "prefix + repeat*count + suffix; 'length' counts the line feed) is decoded in "
                           "the order of 3.2; if that succeeds, 'canonical' is its canonical JSON.",
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

END_2976 = 2977 * secral.MAIL_KEY_EPOCH     # the end of now's epoch


def records_vectors(keys, data) -> dict:
    alice, bob = keys["alice"], keys["bob"]
    BAD_KEYS = [k["public"] for k in data["bad_keys"]]

    def record(identity, host, port, seq, expires, label):
        return make_record(identity, host, port, seq, expires, Script(det(label, 32)))

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
        ("checked a week later, its first mail key is for a past epoch: still valid", good, NOW + 7 * 86400),
        ("no mail_keys member", alice.sign({k: v for k, v in good.items() if k not in ("mail_keys", "sig")},
                                          Script(det("record-nomk", 32))), NOW),
        ("mail_keys is an object", alice.sign({**good, "mail_keys": good["mail_keys"][0]},
                                              Script(det("record-mkobj", 32))), NOW),
        ("mail_keys is empty", alice.sign({**good, "mail_keys": []}, Script(det("record-mk0", 32))), NOW),
        ("the mail keys stop before the record expires: a node offline until then could not be written to",
         alice.sign({**good, "mail_keys": good["mail_keys"][:-1]}, Script(det("record-mkshort", 32))), NOW),
        ("the mail keys start after now's epoch", alice.sign({**good, "mail_keys": good["mail_keys"][1:]},
                                                          Script(det("record-mklate", 32))), NOW),
        ("an epoch is missing between two keys",
         alice.sign({**good, "mail_keys": good["mail_keys"][:2] + [{**good["mail_keys"][3], "epoch": 2978}]
                     + good["mail_keys"][4:]}, Script(det("record-mkgap", 32))), NOW),
        ("one key listed for two epochs",
         alice.sign({**good, "mail_keys": [good["mail_keys"][0], {**good["mail_keys"][0], "epoch": 2977}]
                     + good["mail_keys"][2:]}, Script(det("record-mkdup", 32))), NOW),
        ("the node key listed as a mail key",
         alice.sign({**good, "mail_keys": [{"epoch": 2976, "key": alice.public_b64}] + good["mail_keys"][1:]},
                    Script(det("record-mknode", 32))), NOW),
        ("a mail key that is not RSA-3072", alice.sign(
            {**good, "mail_keys": [{"epoch": 2976, "key": BAD_KEYS[0]}] + good["mail_keys"][1:]},
            Script(det("record-mkbad", 32))), NOW),
        ("an epoch given as a string", alice.sign(
            {**good, "mail_keys": [{**good["mail_keys"][0], "epoch": "2976"}] + good["mail_keys"][1:]},
            Script(det("record-mkstr", 32))), NOW),
        ("seven mail keys", alice.sign({**good, "mail_keys": [{"epoch": 2975, "key": bob.public_b64}]
                                        + good["mail_keys"] + [{"epoch": 2981, "key": keys["bob-2976"].public_b64}]},
                                       Script(det("record-mk7", 32))), NOW),
        ("signed in the last hour of an epoch for 30 days: six mail keys, the most a record can need",
         make_record(alice, "198.51.100.7", 7700, 3, END_2976 - 3600 + 30 * 86400, Script(det("record-six", 32))),
         END_2976 - 3600),
        ("an element that is not an object", alice.sign({**good, "mail_keys": ["x"] + good["mail_keys"][1:]},
                                                       Script(det("record-mkx", 32))), NOW),
        ("an element with a member Secral does not define: ignored (it is signed with the rest)",
         alice.sign({**good, "mail_keys": [{**good["mail_keys"][0], "note": "x"}] + good["mail_keys"][1:]},
                    Script(det("record-mkextra", 32))), NOW),
        ("expires 50 s before its epoch ends but lists only the next epoch's key: checked 10 minutes before "
         "the end, the keys must cover the expiry's epoch, whatever the tolerance",
         bob.sign({**make_record(bob, None, 0, 4, END_2976 - 50, Script(det("record-min", 32))),
                   "mail_keys": [{"epoch": 2977, "key": keys["bob-2977"].public_b64}]},
                  Script(det("record-min/2", 32))), END_2976 - 600),
        ("a record whose clock is 20 minutes ahead lists from the next epoch: valid within the tolerance",
         make_record(bob, None, 0, 3, 2977 * secral.MAIL_KEY_EPOCH + 86400, Script(det("record-ahead", 32)),
                     first=2977), 2977 * secral.MAIL_KEY_EPOCH - 1200),
        ("the same record, 1 s earlier: the clocks differ by more than the tolerance",
         make_record(bob, None, 0, 3, 2977 * secral.MAIL_KEY_EPOCH + 86400, Script(det("record-ahead", 32)),
                     first=2977), 2977 * secral.MAIL_KEY_EPOCH - 1201),
    ]
    vectors = []
    for comment, rec, now in cases:
        code, _ = outcome(secral.verify_record, rec, now)
        vectors.append({"op": "verify_record", "comment": comment, "now": now, "record": rec, "expect": code})
    for k in MAIL_KEYS.values():
        vectors.append({"op": "mail_key_id", "comment": f"the id of {k['name']}, the mail key of "
                        f"{k['owner']} for epoch {k['epoch']}", "key": k["public"], "id_hex": k["id_hex"],
                        "expect": "ok"})
    newer = record(alice, "198.51.100.8", 7700, good["seq"] + 1, NOW + 30 * 86400, "record-newer")
    for comment, new, old in [("higher seq replaces", newer, good), ("lower seq does not", good, newer),
                              ("equal seq does not, even if different", {**good, "host": "x"}, good),
                              ("anything replaces nothing", good, None)]:
        vectors.append({"op": "record_supersedes", "comment": comment, "new": new, "old": old,
                        "result": secral.record_supersedes(new, old), "expect": "ok"})
    for comment, host in [
            ("a DNS name", "node.example.org"), ("IPv4", "198.51.100.7"), ("IPv6", "2001:db8::7"),
            ("loopback is a host like any other", "127.0.0.1"), ("a label may start with a digit", "7up.example"),
            ("leading zeros in IPv4", "198.051.100.7"), ("IPv4 with three parts", "198.51.100"),
            ("a name whose last label is all digits", "example.123"),
            ("a name whose last label is 0x and hex, in any case", "example.0XFF"),
            ("a name whose last label is 0x alone", "example.0x"), ("a last label 0xg is a name", "example.0xg"),
            ("the unspecified address", "0.0.0.0"), ("IPv6 unspecified", "::"),
            ("multicast", "224.0.0.1"), ("broadcast", "255.255.255.255"),
            ("broadcast as IPv4-mapped IPv6", "::ffff:255.255.255.255"),
            ("unspecified as IPv4-mapped IPv6", "::ffff:0.0.0.0"),
            ("an IPv6 zone id", "fe80::1%eth0"), ("an empty label", "a..b"), ("a label starting with -", "-a.b"),
            ("254 characters", "a." * 126 + "ab"), ("a space", "exa mple.org"), ("non-ASCII", "exämple.org"),
            ("an empty string", ""), ("a number, not a string", 7)]:
        code, _ = outcome(secral.check_host, host, "host")
        vectors.append({"op": "check_host", "comment": comment, "host": host, "expect": code})
    return {"description": "NIS records (5.3): verify_record checks a record at time 'now'; "
                           "mail_key_id is the id of a mail key (5.6); "
                           "record_supersedes says whether 'new' replaces 'old' in a NIS map (it needs no "
                           "time: both are verified records); check_host is the grammar of a record's host.",
            "vectors": vectors}


# -- mail and acks ------------------------------------------------------------------

def randomness(label: str) -> dict:
    return {"id_hex": det(f"{label}/id", 16).hex(), "aes_key_hex": det(f"{label}/aes", 32).hex(),
            "nonce_hex": det(f"{label}/nonce", 12).hex(), "oaep_seed_hex": det(f"{label}/oaep", 32).hex(),
            "pss_salt_hex": det(f"{label}/salt", 32).hex()}


def script(r: dict) -> Script:
    return Script(*(bytes.fromhex(r[n]) for n in ("id_hex", "aes_key_hex", "nonce_hex", "oaep_seed_hex",
                                                 "pss_salt_hex")))


def pad_to_bucket(plain: dict) -> bytes:
    """What a sealer does (6.1): "pad" of "0"s up to the smallest bucket."""
    size = len(secral.canonical_json({**plain, "pad": ""}))
    bucket = min(b for b in secral.PAD_BUCKETS if b >= size)
    return secral.canonical_json({**plain, "pad": "0" * (bucket - size)})


def seal_raw(keys, label, sender, recipient, plaintext: bytes, created, ttl, key_of=None, named=None) -> dict:
    """A mail sealed around any plaintext bytes: what a faulty sender might
    seal (the checks a sealer makes are skipped).  The AES key is wrapped to
    the mail key `key_of` (by default the recipient's for the epoch of
    `created`), and the envelope names `named` (a mail key's name or an id;
    by default the same key)."""
    rng = script(randomness(label))
    s, t = keys[sender], keys[recipient]
    key_of = key_of or f"{recipient}-{secral.epoch_of(created)}"
    mail = {"kind": "mail", "id": rng(16).hex(), "from": s.domain, "to": t.domain,
            "from_key": s.public_b64, "created": created, "expires": created + ttl,
            "key_id": MAIL_KEYS[named]["id_hex"] if named in MAIL_KEYS else named or MAIL_KEYS[key_of]["id_hex"]}
    aes, nonce = rng(32), rng(12)
    mail["ct"] = secral.b64e(secral.seal_gcm(aes, nonce, plaintext, secral.envelope_of(mail)))
    mail["nonce"] = secral.b64e(nonce)
    mail["key"] = secral.b64e(secral.wrap_key(keys[key_of].key, aes, rng))
    return s.sign(mail, rng)


def seal_vector(keys, label, comment, sender, from_user, recipient, to_user, subject, body, created, ttl,
                parts=(), in_reply_to=None, record=None) -> dict:
    r = randomness(label)
    s, t = keys[sender], keys[recipient]
    record = record or make_record(t, None, 0, 1, NOW + 86400, Script(det(f"{label}/record", 32)))
    sender_address, recipient_address = Address(from_user, s.domain), Address(to_user, t.domain)
    mail = secral.seal_mail(s, sender_address, recipient_address, record, subject, body, created, ttl,
                            script(r), parts, in_reply_to)
    plaintext = secral.make_plaintext(sender_address, recipient_address, subject, body, parts, in_reply_to)
    entry = {"op": "seal_mail", "comment": comment, "sender_key": sender, "from": str(sender_address),
             "to": str(recipient_address), "recipient_record": record, "subject": subject, "body": body}
    if parts:
        entry["parts"] = list(parts)
    if in_reply_to:
        entry["in_reply_to"] = in_reply_to
    entry.update(created=created, ttl=ttl, random=r, plaintext_length=len(plaintext),
                 plaintext_sha256_hex=hashlib.sha256(plaintext).hexdigest(), mail=mail, expect="ok")
    return entry


def mail_vectors(keys) -> dict:
    created = NOW - 60
    alice, bob, carol = keys["alice"], keys["bob"], keys["carol"]
    png = bytes(range(256)) * 5
    vectors = [
        seal_vector(keys, "mail-basic", "Alice's node seals a mail to Bob: 1 KiB bucket", "alice", "Default",
                    "bob", "Default", "Hello Bob", "Lunch at noon?\n— Alice", created, 86400),
        seal_vector(keys, "mail-unicode", "empty body, non-ASCII subject, other users", "bob", "bob.k",
                    "alice", "alice.w", "Ünïcødé ✉ 😀", "", created, 600),
        seal_vector(keys, "mail-parts", "an HTML alternative and an attachment, in reply to the first mail: "
                    "the 4 KiB bucket", "alice", "Default", "bob", "Default", "Re: Hello Bob", "See the picture.",
                    created, 3600, parts=[{"type": "text/html", "data": secral.b64e(b"<p>See the <b>picture</b>.</p>")},
                                          {"type": "image/png", "name": "dot.png", "data": secral.b64e(png)}],
                    in_reply_to=det("mail-basic/id", 16).hex()),
        seal_vector(keys, "mail-epoch", "sealed 10 minutes before an epoch ends, to a record signed by a "
                    "clock already in the next epoch (10 minutes or more ahead of the sender's), whose first "
                    "mail key is the next epoch's: that key is used",
                    "alice", "Default", "bob", "Default", "Late", "Just in time.",
                    2977 * secral.MAIL_KEY_EPOCH - 600, 3600,
                    record=make_record(bob, None, 0, 2, 2977 * secral.MAIL_KEY_EPOCH + 86400,
                                       Script(det("mail-epoch/record", 32)), first=2977)),
        seal_vector(keys, "mail-week-later", "sealed a week after Bob signed his 30-day record of five keys: "
                    "to the key of the epoch the mail is sealed in, the second", "alice", "Default", "bob",
                    "Default", "A week on", "Still there?", NOW + 7 * 86400, 3600,
                    record=make_record(bob, None, 0, 5, NOW + 30 * 86400, Script(det("mail-week/record", 32)))),
    ]
    good = vectors[0]["mail"]
    unicode_mail = vectors[1]["mail"]
    with_parts = vectors[2]["mail"]

    for comment, parts, in_reply_to in [
            ("a part's media type in capitals", [{"type": "Image/PNG", "data": ""}], None),
            ("a part's media type with parameters", [{"type": "text/plain; charset=utf-8", "data": ""}], None),
            ("a file name with a directory", [{"type": "image/png", "name": "../dot.png", "data": ""}], None),
            ("a part whose data is not base64", [{"type": "image/png", "data": "!!"}], None),
            ("33 parts", [{"type": "text/plain", "data": ""}] * 33, None),
            ("in_reply_to is not a mail id", [], "Re: lunch"),
            ("a body and an attachment that cannot fit the largest bucket",
             [{"type": "application/octet-stream", "data": secral.b64e(b"\0" * 150_000)}], None)]:
        code, _ = outcome(secral.make_plaintext, Address("Default", alice.domain), Address("Default", bob.domain),
                          "s", "b", parts, in_reply_to)
        vectors.append({"op": "make_plaintext", "comment": comment, "from": f"Default@{alice.domain}",
                        "to": f"Default@{bob.domain}", "subject": "s", "body": "b", "parts": parts,
                        "in_reply_to": in_reply_to, "expect": code})

    def resign(mail, label, **change):
        return alice.sign({**mail, **change}, Script(det(label, 32)))

    unpadded = seal_raw(keys, "mail-unpadded", "alice", "bob", secral.canonical_json(
        {"from": f"Default@{alice.domain}", "to": f"Default@{bob.domain}", "subject": "s", "body": "b",
         "pad": ""}), created, 3600)
    relay_cases = [
        ("valid", good, NOW),
        ("valid, with parts", with_parts, NOW),
        ("valid up to its last second", good, good["expires"] - 1),
        ("expired", good, good["expires"]),
        ("created 20 minutes ahead of the relay's clock (two clocks, each 10 min off)",
         resign(good, "m-future-ok", created=NOW + 1200, expires=NOW + 3600), NOW),
        ("created more than 20 minutes ahead", resign(good, "m-future", created=NOW + 1201, expires=NOW + 3600), NOW),
        ("lives longer than 7 days", resign(good, "m-ttl", expires=created + 7 * 86400 + 1), NOW),
        ("expires before it is created", resign(good, "m-neg", expires=created - 1), NOW),
        ("a signature over other content (ciphertext tampered)",
         {**good, "ct": secral.b64e(bytes([secral.b64d(good["ct"], "ct")[0] ^ 1]) + secral.b64d(good["ct"], "ct")[1:])}, NOW),
        ("the recipient domain was changed", {**good, "to": carol.domain}, NOW),
        ("signed by another node's key that claims Alice's domain",
         carol.sign({**good, "from_key": carol.public_b64}, Script(det("m-wrongkey", 32))), NOW),
        ("the signature is cut short", {**good, "sig": good["sig"][:-8]}, NOW),
        ("id is uppercase", resign(good, "m-id", id=good["id"].upper()), NOW),
        ("the nonce is 16 bytes", resign(good, "m-nonce", nonce=secral.b64e(b"\0" * 16)), NOW),
        ("the wrapped key is 2048 bits long", resign(good, "m-key", key=secral.b64e(b"\1" * 256)), NOW),
        ("kind is ack", resign(good, "m-kind", kind="ack"), NOW),
        ("created is a string", resign(good, "m-created", created=str(created)), NOW),
        ("the envelope names a user: relays see domains only",
         resign(good, "m-from-user", **{"from": f"Default@{alice.domain}"}), NOW),
        ("from is not a domain", resign(good, "m-from", **{"from": "alice"}), NOW),
        ("to is a number: a wrong JSON type is malformed, everywhere", resign(good, "m-to-type", to=7), NOW),
        ("a sealed size that is not a bucket (the plaintext was not padded)", unpadded, NOW),
        ("missing sig", {k: v for k, v in good.items() if k != "sig"}, NOW),
    ]
    for comment, mail, now in relay_cases:
        code, _ = outcome(secral.verify_mail, mail, now)
        vectors.append({"op": "verify_mail", "comment": comment, "now": now, "mail": mail, "expect": code})

    def open_case(comment, mail, recipient, now=NOW):
        code, plain = outcome(lambda: secral.open_mail(keys[recipient], ring_of(recipient),
                                                       secral.verify_mail(mail, now)))
        entry = {"op": "open_mail", "comment": comment, "now": now, "recipient": recipient, "mail": mail}
        if code == "ok":
            entry["plaintext"] = plain
        entry["expect"] = code
        vectors.append(entry)

    open_case("Bob opens Alice's mail", good, "bob")
    open_case("Alice opens Bob's mail to alice.w", unicode_mail, "alice")
    open_case("Bob opens the mail with parts", with_parts, "bob")
    open_case("Carol cannot: it is not addressed to her", good, "carol")
    open_case("Bob opens the mail sealed to his next epoch's key, in that epoch", vectors[3]["mail"], "bob",
              2977 * secral.MAIL_KEY_EPOCH)
    plain = {"from": f"Default@{alice.domain}", "to": f"Default@{bob.domain}", "subject": "s", "body": "b"}

    def sealed(label, plaintext, key_of=None, named=None):
        return seal_raw(keys, label, "alice", "bob", plaintext, created, 3600, key_of, named)

    open_case("sealed to the mail key of epoch 2974, which Bob deleted at its time, 1,799,886,000 "
              "(a sender with a stale record and a fresh created)",
              sealed("mail-retired", pad_to_bucket(plain), key_of="bob-2974"), "bob")
    open_case("sealed to a key Bob never had: Carol's mail key",
              sealed("mail-unknown", pad_to_bucket(plain), key_of="carol-2976"), "bob")
    open_case("sealed to Bob's node key, which is not a mail key: the id is unknown, no other key is tried",
              seal_raw(keys, "mail-nodekey", "alice", "bob", pad_to_bucket(plain), created, 3600, key_of="bob",
                       named=secral.mail_key_id(keys["bob"].public_b64)), "bob")
    open_case("the envelope names Bob's mail key, the AES key was wrapped to Carol's",
              sealed("mail-wrongkey", pad_to_bucket(plain), key_of="carol-2976", named="bob-2976"), "bob")
    open_case("the sealed recipient is at another domain than the envelope's",
              sealed("mail-mismatch", pad_to_bucket({**plain, "to": f"Default@{carol.domain}"})), "bob")
    open_case("the sealed sender is at another domain than the envelope's",
              sealed("mail-mismatch-from", pad_to_bucket({**plain, "from": f"Default@{carol.domain}"})), "bob")
    open_case("sealed from Core, which never sends mail",
              sealed("mail-core", pad_to_bucket({**plain, "from": f"Core@{alice.domain}"})), "bob")
    open_case("the sealed recipient is not an address",
              sealed("mail-to-domain", pad_to_bucket({**plain, "to": bob.domain})), "bob")
    open_case("the sealed content is not JSON", sealed("mail-notjson", b"Dear Bob".ljust(1024, b" ")), "bob")
    open_case("the sealed content nests 3000 levels deep around a syntax error",
              sealed("mail-deep", (b"[" * 3000 + b"1 2" + b"]" * 3000).ljust(8192, b" ")), "bob")
    open_case("pad holds something other than \"0\"", sealed("mail-pad", pad_to_bucket(plain).replace(b'0"', b'x"', 1)), "bob")
    open_case("no pad member", sealed("mail-nopad", secral.canonical_json(plain).ljust(1024, b" ")), "bob")
    open_case("a 257-character subject", sealed("mail-subject", pad_to_bucket({**plain, "subject": "s" * 257})), "bob")
    open_case("a subject with a line break",
              sealed("mail-control", pad_to_bucket({**plain, "subject": "a\r\nBcc: eve"})), "bob")
    for label, char, name in [("mail-u2028", "\u2028", "U+2028 LINE SEPARATOR"),
                              ("mail-u0085", "\u0085", "U+0085 NEXT LINE, a C1 control")]:
        open_case(f"a subject with {name}: it breaks lines in mail clients",
                  sealed(label, pad_to_bucket({**plain, "subject": f"one{char}two"})), "bob")
    open_case("the sealed content has no body",
              sealed("mail-missing", pad_to_bucket({k: v for k, v in plain.items() if k != "body"})), "bob")
    open_case("a part without a media type",
              sealed("mail-part-type", pad_to_bucket({**plain, "parts": [{"data": ""}]})), "bob")
    return {"description": "Mail (6). seal_mail: the mail 'from' (an address of the node of 'sender_key') "
                           "seals for 'to' to the mail key (5.6) that 'recipient_record' lists for 'created', "
                           "with 'random' drawn in the order "
                           "of 6.1; the result is exactly 'mail', and the sealed plaintext (6.1, padded) has "
                           "'plaintext_length' bytes and that SHA-256. make_plaintext: the limits a sealer "
                           "checks. verify_mail is what a relay checks at 'now'; open_mail is verify_mail "
                           "plus what only the recipient (a node from keys.json, holding its mail keys from "
                           "keys.json but those marked deleted) can check, and gives "
                           "'plaintext'.", "vectors": vectors}


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
    alice_record = make_record(alice, "198.51.100.7", 7700, 1, NOW + 86400, Script(det("hs-ra", 32)))
    carol_record = make_record(carol, None, 0, 1, NOW + 86400, Script(det("hs-rc", 32)))
    bob_nonce = secral.b64e(det("hs-bob-nonce", 16))
    hello = secral.make_hello(alice_record, det("hs-alice-nonce", 16))
    hello["agent"] = "secral-vectors/2"
    vectors = []
    for name in ("alice", "bob"):
        der = secral.make_certificate(keys[name])
        vectors.append({"op": "make_certificate", "comment": f"the TLS certificate of {name}'s node key",
                        "key": name, "certificate": secral.b64e(der),
                        "certificate_sha256_hex": hashlib.sha256(der).hexdigest(),
                        "domain": keys[name].domain, "expect": "ok"})
    bob_cert = secral.make_certificate(bob)
    spki = bob.public_der
    for comment, der in [
            ("the key a dialler reads from Bob's certificate", bob_cert),
            ("a certificate whose key was altered (its signature is not checked; the key is not RSA-3072 "
             "e=65537 canonical DER)", bob_cert.replace(spki, spki[:-1] + bytes([spki[-1] ^ 2]))),
            ("not a certificate", b"\x30\x03\x02\x01\x01")]:
        code, key = outcome(secral.certificate_key, der)
        entry = {"op": "certificate_key", "comment": comment, "certificate": secral.b64e(der)}
        if code == "ok":
            entry.update(key=key, domain=secral.domain_of_key(key))
        entry["expect"] = code
        vectors.append(entry)
    # Alice dials Bob: TLS proved Bob's domain; her auth answers Bob's hello nonce and names him.
    auth = secral.make_auth(alice, bob_nonce, bob.domain, Script(det("hs-auth-salt", 32)))
    vectors.append({"op": "make_auth", "comment": "Alice (dialler) answers the nonce of Bob's hello",
                    "signer": "alice", "peer_nonce": bob_nonce, "peer_domain": bob.domain,
                    "pss_salt_hex": det("hs-auth-salt", 32).hex(),
                    "statement": secral.canonical_json(secral.auth_statement(bob_nonce, alice.domain,
                                                                             bob.domain)).decode(),
                    "hello": hello, "now": NOW, "auth": auth, "expect": "ok"})
    cases = [
        ("Bob checks Alice's auth against the record in her hello", auth, alice_record, bob_nonce, bob.domain),
        ("a replay on a connection with another challenge", auth, alice_record,
         secral.b64e(det("hs-other", 16)), bob.domain),
        ("relayed to Carol: the auth names Bob", auth, alice_record, bob_nonce, carol.domain),
        ("someone else's record: Carol's record with Alice's signature", auth, carol_record, bob_nonce, bob.domain),
        ("the signature cut short", {**auth, "sig": auth["sig"][:-8]}, alice_record, bob_nonce, bob.domain),
    ]
    for comment, a, record, nonce, own in cases:
        code, _ = outcome(secral.verify_auth, a, record, nonce, own)
        vectors.append({"op": "verify_auth", "comment": comment, "auth": a, "record": record,
                        "own_nonce": nonce, "own_domain": own, "expect": code})
    return {"description": "The link (8.1). make_certificate: a node key's one TLS certificate, DER. "
                           "certificate_key: the SubjectPublicKeyInfo a dialler reads from the listener's "
                           "certificate, checked as a NIS key (4.1), and the domain it derives. make_auth: "
                           "the dialler signs 'statement' (PSS salt given); verify_auth: the listener checks "
                           "an auth against the record of the dialler's hello and its own hello nonce and "
                           "domain.", "vectors": vectors}


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
        ("nis_query for a domain that is a number: the JSON type is checked first",
         {"type": "nis_query", "qid": "0" * 32, "domain": 7, "hops": 3}),
        ("nis_query with a short qid", {"type": "nis_query", "qid": "00", "domain": d, "hops": 3}),
        ("nis_answer", {"type": "nis_answer", "qid": "0" * 32, "record": {}}),
        ("getpeers", {"type": "getpeers"}),
        ("peers", {"type": "peers", "records": []}),
        ("peers with an object for records", {"type": "peers", "records": {}}),
        ("hello", {"type": "hello", "v": 2, "record": {}, "nonce": "", "agent": "x"}),
        ("a v1 hello has the same fields (the version is the handshake's to refuse)",
         {"type": "hello", "v": 1, "record": {}, "nonce": "", "agent": "x"}),
        ("hello with a long agent", {"type": "hello", "v": 2, "record": {}, "nonce": "", "agent": "x" * 129}),
        ("auth", {"type": "auth", "sig": ""}),
        ("a v1 auth with its link secret: unknown fields are ignored", {"type": "auth", "secret": "", "sig": ""}),
        ("auth without sig", {"type": "auth"}),
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
        rec = make_record(identity, host, port, seq, expires, Script(det(label, 32)))
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
        "records.json": records_vectors(keys, data),
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
