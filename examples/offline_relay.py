#!/usr/bin/env python3
"""A relay for offline friends: store and forward through a third node.

What it shows
-------------
Alice and Bob are each connected only to a relay node R.  Neither of them
advertises a host in its NIS record (Config(host=None): "behind a NAT"), so
nobody can dial them; R is the only node with an address.

1. Bob goes offline (his NodeShell is stopped).
2. Alice sends him a mail.  Her node does not know Bob's key yet, so it asks
   its peers with nis_query (PROTOCOL.md 5.4); R answers from its NIS map.
   Alice seals the mail and, unable to dial Bob, hands it to R (7.2).
3. R keeps the mail in its relay store (7.6).  Its `status` shows what it
   holds, and the raw bytes of R's *.db files show that it holds ciphertext
   only: the envelope (addresses, id, times) is visible to a relay, the
   subject and body are not (section 12).
4. Bob comes back: a new NodeShell on the same data directory dials R, and
   right after the handshake R hands over what it holds for him (7.6).
   Bob's Core acks it, R passes the ack to Alice and drops its copy of the
   mail, and Alice's outbox turns "delivered".

Run:  python3 examples/offline_relay.py     (about 5 s; exits 0 on success)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import secral  # noqa: E402


class ExampleFailed(Exception):
    """Something the example expected did not happen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ExampleFailed(message)


def wait_until(shell: secral.NodeShell, predicate, timeout: float, what: str):
    """Wait for a condition on a node's core (evaluated under the node's lock)."""
    value = shell.wait_for(predicate, timeout)
    check(bool(value), f"timed out after {timeout} s waiting for {what}")
    return value


def relay_summary(status: dict) -> str:
    relay = status["relay"]
    return f"{relay['mail']} mail, {relay['ack']} ack, {relay['bytes']} bytes"


def store_bytes(data_dir: str) -> tuple[list[str], bytes]:
    """Every byte of a node's SQLite stores.  The stores run in WAL mode, so
    recent writes may still sit in the *.db-wal files: read those too."""
    names = sorted(n for n in os.listdir(data_dir) if ".db" in n)
    data = b"".join(open(os.path.join(data_dir, n), "rb").read() for n in names)
    return names, data


def main() -> int:
    base = tempfile.mkdtemp(prefix="secral-offline-relay-")
    shells: list[secral.NodeShell] = []
    try:
        relay_dir, alice_dir, bob_dir = (os.path.join(base, n) for n in ("relay", "alice", "bob"))

        # -- three nodes ------------------------------------------------------
        # R advertises 127.0.0.1:<its port>; Alice and Bob advertise nothing
        # ("host": null, "port": 0 in their records) and only know R.
        print("Starting R, Alice and Bob (each generates its RSA-3072 key):")
        relay = secral.NodeShell(relay_dir, secral.Config(host="127.0.0.1"), ("127.0.0.1", 0))
        relay.start()
        shells.append(relay)
        to_relay = (("127.0.0.1", relay.port),)
        alice = secral.NodeShell(alice_dir, secral.Config(host=None, bootstrap=to_relay),
                                 ("127.0.0.1", 0))
        alice.start()
        shells.append(alice)
        # Bob does not even listen: a node behind a NAT only dials out.
        bob = secral.NodeShell(bob_dir, secral.Config(host=None, bootstrap=to_relay), None)
        bob.start()
        shells.append(bob)
        R, A, B = relay.identity.domain, alice.identity.domain, bob.identity.domain
        print(f"  R     {R}  listening on 127.0.0.1:{relay.port}, advertised")
        print(f"  Alice {A}  not advertised")
        print(f"  Bob   {B}  not advertised, not listening")

        wait_until(relay, lambda: {A, B} <= set(relay.core.open), 10,
                   "Alice and Bob to connect to R")
        for shell in (alice, bob):      # each side opens on its own (8.1)
            wait_until(shell, lambda shell=shell: R in shell.core.open, 5, "the handshake with R")
        print(f"Alice's peers: {sorted(alice.core.open)}   Bob's peers: {sorted(bob.core.open)}")
        check(set(alice.core.open) == {R} and set(bob.core.open) == {R},
              "Alice and Bob should be connected to R only")
        with relay.lock:
            bob_record = relay.core.known_record(B, time.time())
        print(f"R's NIS record for Bob: host={bob_record['host']} port={bob_record['port']} "
              "(nobody can dial him)\n")

        # -- 1. Bob goes offline ------------------------------------------------
        bob.stop()
        shells.remove(bob)
        wait_until(relay, lambda: B not in relay.core.open, 5, "R to notice that Bob left")
        print("Bob goes offline.")

        # -- 2. Alice sends -----------------------------------------------------
        to = f"Default@{B}"
        subject = "Tickets for Saturday"
        body = "Bob, I got two tickets for the 8 pm show. Pay me back whenever. -- Alice"
        entry = secral.call_node(alice_dir, "send", {"to": to, "subject": subject, "body": body})
        mail_id = entry["id"]
        key = secral.mail_key(A, mail_id)
        print(f"Alice sends {mail_id} to {to} (status {entry['status']}: "
              "her node first asks its peers for Bob's NIS record)")

        # -- 3. the mail waits at R ---------------------------------------------
        wait_until(relay, lambda: key in relay.core.items, 10, "R to hold the mail")
        status = secral.call_node(relay_dir, "status")
        print(f"R holds it.  R's status: relay store {relay_summary(status)}; keys {status['relay']['keys']}")
        check(status["relay"]["mail"] == 1 and key in status["relay"]["keys"],
              "R's relay store should hold exactly Alice's mail")
        [waiting] = [e for e in secral.call_node(alice_dir, "outbox") if e["id"] == mail_id]
        print(f"Alice's outbox: {waiting['status']} (written to R, no ack yet)")
        check(waiting["status"] == "sent", f"expected 'sent', got {waiting['status']}")

        names, raw = store_bytes(relay_dir)
        stores = sorted({n.split(".db")[0] for n in names})
        print(f"R's store files: {len(names)} files ({len(stores)} stores: "
              f"<store>.db with its -wal and -shm), {len(raw)} bytes in all:")
        visible = {"Bob's address (envelope)": to.encode(), "the mail id (envelope)": mail_id.encode()}
        secret = {"the subject": subject.encode(), "the body": body.encode(),
                  "a phrase of the body": b"two tickets"}
        for what, needle in visible.items():
            print(f"  {what:26} {'present' if needle in raw else 'absent'}")
            check(needle in raw, f"{what} should be visible in R's relay store")
        for what, needle in secret.items():
            print(f"  {what:26} {'PRESENT' if needle in raw else 'absent'}")
            check(needle not in raw, f"{what} leaked into R's stores")
        print("  -> R keeps the sealed mail: it can route it, but not read it.\n")

        # -- 4. Bob comes back ----------------------------------------------------
        time.sleep(1)   # let the mail sit for a moment, for the story's sake
        bob = secral.NodeShell(bob_dir, secral.Config(host=None, bootstrap=to_relay), None)
        bob.start()
        shells.append(bob)
        print(f"Bob comes back online ({bob.identity.domain}, same data directory) and dials R.")
        check(bob.identity.domain == B, "Bob's identity changed across the restart")
        wait_until(bob, lambda: bob.stores.inbox.get(key), 10, "the mail to reach Bob's inbox")
        inbox = secral.call_node(bob_dir, "inbox")
        mail = secral.call_node(bob_dir, "read", {"id": inbox[0]["id"]})
        print(f"Bob's inbox: from {mail['from']}")
        print(f"  subject: {mail['subject']}")
        print(f"  body:    {mail['body']}")
        check((mail["subject"], mail["body"]) == (subject, body), "Bob read something else")

        entry = secral.call_node(alice_dir, "wait", {"id": mail_id, "timeout": 10})
        print(f"Alice's outbox: {entry['status']}")
        check(entry["status"] == "delivered", f"expected 'delivered', got {entry['status']}")
        wait_until(relay, lambda: key not in relay.core.items, 5, "R to drop its copy")
        status = secral.call_node(relay_dir, "status")
        print(f"R's relay store now: {relay_summary(status)} "
              "(the ack deleted the mail; R keeps the ack to answer repeats)")
        check(status["relay"]["mail"] == 0, "R should have dropped the mail after the ack")
        print("\nOK: R carried the mail while Bob was offline, without being able to read it.")
        return 0
    finally:
        for shell in reversed(shells):
            shell.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    started = time.monotonic()
    try:
        status = main()
    except (ExampleFailed, secral.SecralError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        status = 1
    print(f"({time.monotonic() - started:.1f} s)")
    sys.exit(status)
