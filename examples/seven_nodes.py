#!/usr/bin/env python3
"""The seed's seven-node network: mail relayed through intermediaries.

What it shows
-------------
Seven nodes connected exactly as in the project's seed picture:

    5-1  1-6  6-7  1-2  7-3  2-6  7-5  4-2  4-3  2-3  7-1  2-5

No node advertises a host in its NIS record (Config(host=None)), so the
only connections are the drawn ones (each node dials the neighbours that
were started before it) and nobody can dial around the picture.  Node 5 is
not a neighbour of node 3, nor node 4 of node 6: their mail must be relayed.

A sender that is not connected to the recipient and cannot dial it sends
the mail to all its peers; every relay checks it (PROTOCOL.md 6.2), keeps
it (7.6) and passes it on with one hop less, straight to the recipient if
it is connected to it, else to all its other peers (7.2).  The recipient's
signed ack travels back the same way and makes the relays drop their copies.

For each mail the example prints the intermediaries that relayed it (the
nodes whose seen set holds the mail's key "mail/<sender domain>/<id>",
7.1), those that also saw the ack, and the sender's outbox status.

Run:  python3 examples/seven_nodes.py      (about 10 s, mostly generating
                                            seven RSA-3072 keys; exits 0)
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

EDGES = [(5, 1), (1, 6), (6, 7), (1, 2), (7, 3), (2, 6), (7, 5), (4, 2), (4, 3), (2, 3), (7, 1), (2, 5)]
MAILS = [(5, 3, "meet me at the harbour"), (4, 6, "the key is under the mat")]
BODIES = {(src, dst): body for src, dst, body in MAILS}


class ExampleFailed(Exception):
    """Something the example expected did not happen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ExampleFailed(message)


def neighbours(i: int) -> set[int]:
    return {y if x == i else x for x, y in EDGES if i in (x, y)}


def settle(nodes: dict, keys: list[str], quiet: float = 1.0, timeout: float = 8.0) -> None:
    """Wait until no node's view of `keys` (seen set, held objects) has changed
    for `quiet` seconds."""
    def snapshot():
        view = []
        for shell in nodes.values():
            with shell.lock:
                view.append(tuple((k in shell.core.seen, k in shell.core.items) for k in keys))
        return view
    deadline = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def main() -> int:
    base = tempfile.mkdtemp(prefix="secral-seven-nodes-")
    nodes: dict[int, secral.NodeShell] = {}
    try:
        print("Starting seven nodes (each generates its RSA-3072 key):")
        for i in range(1, 8):
            # Node i dials its neighbours that already run; later ones dial it.
            earlier = sorted(j for j in neighbours(i) if j < i)
            config = secral.Config(host=None,
                                   bootstrap=tuple(("127.0.0.1", nodes[j].port) for j in earlier))
            shell = secral.NodeShell(os.path.join(base, f"node{i}"), config, ("127.0.0.1", 0))
            shell.start()
            nodes[i] = shell
            print(f"  node {i}  {shell.identity.domain}  port {shell.port}  "
                  f"dials {', '.join(map(str, earlier)) or '-'}")
        domain = {i: n.identity.domain for i, n in nodes.items()}
        number = {d: i for i, d in domain.items()}

        # Wait until every edge is open on both sides (each side opens on its own, 8.1).
        for i, shell in nodes.items():
            want = {domain[j] for j in neighbours(i)}
            if not shell.wait_for(lambda s=shell, w=want: w <= set(s.core.open), 15):
                raise ExampleFailed(f"node {i} did not connect to all its neighbours")
        print("\nConnections (each node's open peers):")
        for i, shell in nodes.items():
            with shell.lock:
                peers = sorted(number[d] for d in shell.core.open)
            print(f"  node {i}: {peers}")
            check(set(peers) == neighbours(i), f"node {i} has unexpected peers {peers}")

        # -- send both mails, then wait for their acks ---------------------------
        print()
        sent = {}
        for src, dst, body in MAILS:
            check(dst not in neighbours(src), f"{src} and {dst} should not be neighbours")
            entry = secral.call_node(nodes[src].data_dir, "send",
                                     {"to": f"Default@{domain[dst]}", "subject": f"from node {src}",
                                      "body": body})
            sent[src, dst] = entry["id"]
            print(f"node {src} -> node {dst}: mail {entry['id']} ({entry['status']})")

        status = {}
        for (src, dst), mail_id in sent.items():
            entry = secral.call_node(nodes[src].data_dir, "wait", {"id": mail_id, "timeout": 20})
            status[src, dst] = entry["status"]
            print(f"node {src} -> node {dst}: {entry['status']}")

        # The sender's outbox turns "delivered" as soon as the first copy is
        # acked, while other copies of the flood are still travelling.  Wait
        # until the network is quiet, so the report below is the final picture.
        keys = {}
        for (src, dst), mail_id in sent.items():
            keys[src, dst] = (secral.mail_key(domain[src], mail_id),
                              secral.ack_key(domain[src], mail_id, domain[dst]))
        settle(nodes, [k for pair in keys.values() for k in pair])

        lingering = False
        for (src, dst), mail_id in sent.items():
            mkey, akey = keys[src, dst]
            relayed, acked, holding = [], [], []
            for i, shell in nodes.items():
                if i in (src, dst):
                    continue
                with shell.lock:
                    if mkey in shell.core.seen:
                        relayed.append(i)
                    if akey in shell.core.seen:
                        acked.append(i)
                    if mkey in shell.core.items:
                        holding.append(i)
            print(f"\nmail {src} -> {dst} ({mkey}):")
            print(f"  {'relayed by nodes:':27}{relayed}")
            print(f"  {'ack relayed by nodes:':27}{acked}")
            print(f"  {'relays still holding mail:':27}{holding or 'none'}")
            print(f"  {f'outbox of node {src}:':27}{status[src, dst]}")
            lingering |= bool(holding)
            check(status[src, dst] == "delivered", f"mail {src}->{dst} is {status[src, dst]}")
            check(relayed, f"no intermediary relayed mail {src}->{dst}")

            inbox = [m for m in secral.call_node(nodes[dst].data_dir, "inbox") if m["id"] == mail_id]
            check(len(inbox) == 1, f"mail {mail_id} is not in node {dst}'s inbox")
            mail = secral.call_node(nodes[dst].data_dir, "read", {"id": mail_id})
            print(f"  {f'node {dst} reads:':27}{mail['subject']!r}: {mail['body']!r}")
            check(mail["body"] == BODIES[src, dst], f"node {dst} read the wrong body")
        if lingering:
            print("\nA relay that never sees the ack keeps its copy until the mail expires\n"
                  "(7.6): a relay connected to the sender passes the ack to the sender\n"
                  "only (7.2), so relays off the ack's path may not hear of it.")

        print("\nOK: both mails crossed the network through relays and were acknowledged.")
        return 0
    finally:
        for shell in reversed(list(nodes.values())):
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
