#!/usr/bin/env python3
"""Two Secral nodes in one process: one mail, end to end.

What it shows
-------------
* How to run a node from Python: a `secral.NodeShell` is the whole node
  (listener, dialler, timers, control port) around the sans-IO core.
  Here both nodes listen on 127.0.0.1 with port 0 (the OS picks a port) and
  keep their state in temporary data directories.
* How to drive a running node: `secral.call_node(data_dir, cmd, args)` is
  the control API the command line uses (`send`, `wait`, `inbox`, `read`,
  `outbox`, ...).  It talks to the node through DATA_DIR/control.json.
* A mail's life: Alice's node seals it for Bob's key (learned from Bob's
  NIS record during the handshake), Bob's node opens it, stores it in the
  inbox, and its Core signs an ack; Alice's outbox goes queued -> sent ->
  delivered (PROTOCOL.md 2, 7.4, 7.5).

Run:  python3 examples/two_nodes.py        (a few seconds; exits 0 on success)
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


def start_node(name: str, base: str, advertise: bool, peers: tuple = ()) -> secral.NodeShell:
    """A node with its own data directory under `base`.

    advertise=True puts 127.0.0.1 and the listening port into the node's NIS
    record (others may dial it); `peers` are bootstrap addresses (--peer).
    The first start creates the node's RSA-3072 key (about a second).
    """
    data_dir = os.path.join(base, name)
    config = secral.Config(host="127.0.0.1" if advertise else None, bootstrap=peers)
    shell = secral.NodeShell(data_dir, config, listen=("127.0.0.1", 0))
    shell.start()
    print(f"  {name:5} is {shell.identity.domain}, listening on 127.0.0.1:{shell.port}")
    return shell


def wait_until(shell: secral.NodeShell, predicate, timeout: float, what: str):
    value = shell.wait_for(predicate, timeout)
    if not value:
        raise ExampleFailed(f"timed out after {timeout} s waiting for {what}")
    return value


def main() -> int:
    base = tempfile.mkdtemp(prefix="secral-two-nodes-")
    shells: list[secral.NodeShell] = []
    try:
        print("Starting two nodes (each generates its RSA-3072 key):")
        alice = start_node("alice", base, advertise=True)
        shells.append(alice)
        bob = start_node("bob", base, advertise=True, peers=(("127.0.0.1", alice.port),))
        shells.append(bob)

        # Bob dials Alice (its bootstrap peer); both sides see the other open.
        wait_until(alice, lambda: bob.identity.domain in alice.core.open, 10,
                   "the handshake between alice and bob")
        print("Handshake done: alice and bob are peers.\n")

        alice_dir, bob_dir = alice.data_dir, bob.data_dir
        to = f"Default@{bob.identity.domain}"
        subject, body = "Lunch?", "Hello Bob,\nnoon at the usual place?\n-- Alice"

        # -- send, through the control API (what `secral.py send` does) --------
        entry = secral.call_node(alice_dir, "send", {"to": to, "subject": subject, "body": body})
        print(f"alice sends {entry['id']} to {to}")
        print(f"  outbox status right after send: {entry['status']}")

        # -- wait for the ack (what `secral.py send --wait 10` does) -----------
        entry = secral.call_node(alice_dir, "wait", {"id": entry["id"], "timeout": 10})
        print(f"  outbox status after wait:       {entry['status']}")
        if entry["status"] != "delivered":
            raise ExampleFailed(f"the mail was not delivered: {entry['status']} {entry['reason']}")

        # -- Bob's inbox (what `secral.py inbox` and `secral.py read` do) ------
        inbox = secral.call_node(bob_dir, "inbox")
        if len(inbox) != 1:
            raise ExampleFailed(f"bob's inbox has {len(inbox)} mails, expected 1")
        summary = inbox[0]
        mail = secral.call_node(bob_dir, "read", {"id": summary["id"]})
        print("\nbob's inbox:")
        print(f"  id:      {mail['id']}")
        print(f"  from:    {mail['from']}")
        print(f"  to:      {mail['to']}")
        print(f"  subject: {mail['subject']}")
        print("  body:")
        for line in mail["body"].splitlines():
            print(f"    | {line}")
        if (mail["subject"], mail["body"]) != (subject, body):
            raise ExampleFailed("the mail bob read is not the mail alice sent")
        if mail["from"] != f"Default@{alice.identity.domain}":
            raise ExampleFailed(f"unexpected sender {mail['from']}")
        print("\nOK: the mail went from alice to bob and alice holds bob's signed ack.")
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
