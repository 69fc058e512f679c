#!/usr/bin/env python3
"""Simulate a Secral network: many real node cores, one process, no sockets.

Each node is secral.Node -- the same sans-IO core a real node runs -- fed by
a discrete-event network with per-link latency and churn (nodes going
offline and coming back).  No node publishes an address, so every mail is
carried by relays (the hard case: a sender that can dial its recipient never
floods).  For each network size and topology it reports:

  delivered      mails acknowledged to their sender by the end
  frames/mail    mail and ack frames sent in the whole network, per mail
  copies/mail    nodes that stored a copy of a mail for someone else
  left over      copies still held at the end (acks should have cleared them)
  NIS frames     nis_query and nis_answer frames per lookup of a new recipient
  p50 / p90      seconds from submission to the ack, simulated time

    python3 examples/simulate.py                 # 10, 50 and 200 nodes
    python3 examples/simulate.py --sizes 10 50 --mails 30 --churn 0.1 --json

Keys: every node needs its own RSA-3072 key.  They are generated once (in
parallel) and cached in $XDG_CACHE_HOME/secral-sim (or ~/.cache/secral-sim).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import multiprocessing
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import secral  # noqa: E402
from secral import Close, Config, Dial, Identity, Node, Send, Stores  # noqa: E402

TICK = 5.0                  # seconds of simulated time between a node's ticks


# -- keys ---------------------------------------------------------------------

def _generate(_: int) -> bytes:
    return Identity.generate().to_pem()


def load_keys(count: int) -> list[Identity]:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "secral-sim")
    os.makedirs(cache, exist_ok=True)
    paths = [os.path.join(cache, f"key-{i:04d}.pem") for i in range(count)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"generating {len(missing)} RSA-3072 keys (once; cached in {cache}) ...", file=sys.stderr)
        with multiprocessing.Pool() as pool:
            for path, pem in zip(missing, pool.map(_generate, range(len(missing)))):
                with open(path, "wb") as f:
                    f.write(pem)
    return [secral.load_identity(p, create=False) for p in paths]


# -- topologies ---------------------------------------------------------------

def random_graph(n: int, degree: float, rng: random.Random) -> set[tuple[int, int]]:
    """Erdos-Renyi with the given mean degree, plus a ring so it is connected."""
    edges = {(i, (i + 1) % n) for i in range(n)} if n > 2 else {(0, 1)}
    p = max(0.0, (degree - 2) / (n - 1))
    edges |= {(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p}
    return {tuple(sorted(e)) for e in edges}


def scale_free_graph(n: int, m: int, rng: random.Random) -> set[tuple[int, int]]:
    """Barabasi-Albert: each new node links to m existing ones, preferring hubs."""
    edges = {(i, j) for i in range(m + 1) for j in range(i + 1, m + 1)}
    ends = [x for e in edges for x in e]
    for new in range(m + 1, n):
        targets: set[int] = set()
        while len(targets) < m:
            targets.add(rng.choice(ends))
        for t in targets:
            edges.add((t, new))
            ends += [t, new]
    return edges


# -- the simulated network ----------------------------------------------------

class CountingStore(secral.MemoryStore):
    """A relay store that remembers every key ever written to it."""

    def __init__(self):
        super().__init__()
        self.ever: set[str] = set()

    def __setitem__(self, key, value):
        self.ever.add(key)
        super().__setitem__(key, value)


class Network:
    def __init__(self, identities: list[Identity], edges: set[tuple[int, int]], seed: int,
                 mail_key: Identity, latency: tuple[float, float] = (0.005, 0.080)):
        self.rng = random.Random(seed)
        self.now = 1_800_000_000.0
        self.nodes: list[Node] = []
        for i, identity in enumerate(identities):
            stores = Stores.memory()
            stores.relay = CountingStore()
            rng = random.Random(seed * 1000 + i)
            keys = secral.MailKeys()            # one epoch is all a simulation lives; the nodes share
            keys.add(secral.epoch_of(self.now), mail_key)   # its key, which changes no route
            self.nodes.append(Node(identity, stores, Config(host=None, target_outbound=0),
                                   self.now, lambda n, r=rng: r.randbytes(n), keys))
        self.edges = edges
        self.latency = {e: self.rng.uniform(*latency) for e in edges}
        self.online = [True] * len(identities)
        self.links: dict[tuple[int, int], tuple[int, int]] = {}   # (node, conn) -> (node, conn)
        self.link_edge: dict[tuple[int, int], tuple[int, int]] = {}
        self.last_arrival: dict[tuple[int, int], float] = {}
        self.queue: list = []
        self.seq = 0
        self.next_conn = 1
        self.frames = collections.Counter()
        self.submitted: dict[tuple[int, str], float] = {}

    def at(self, when: float, *event) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (when, self.seq, event))

    def run_actions(self, i: int, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.frames[action.frame["type"]] += 1
                other = self.links.get((i, action.conn))
                if other is None:
                    continue
                edge = self.link_edge[(i, action.conn)]
                # FIFO per direction: a frame never overtakes an earlier one.
                arrive = max(self.now + self.latency[edge], self.last_arrival.get((i, action.conn), 0))
                self.last_arrival[(i, action.conn)] = arrive
                self.at(arrive, "line", other, secral.encode_frame(action.frame))
            elif isinstance(action, Close):
                other = self.links.pop((i, action.conn), None)
                if other is not None:
                    self.links.pop(other, None)
                    self.at(self.now + 0.001, "lost", other)
            elif isinstance(action, Dial):
                target = action.domain or f"{action.host}:{action.port}"     # (as the core keys a dial)
                self.run_actions(i, self.nodes[i].dial_failed(target, self.now))

    def connect(self, a: int, b: int) -> None:
        ca, cb = self.next_conn, self.next_conn + 1
        self.next_conn += 2
        self.links[(a, ca)], self.links[(b, cb)] = (b, cb), (a, ca)
        edge = tuple(sorted((a, b)))
        self.link_edge[(a, ca)] = self.link_edge[(b, cb)] = edge
        self.run_actions(b, self.nodes[b].connection_made(cb, f"sim-{a}", self.now))
        self.run_actions(a, self.nodes[a].connection_made(
            ca, f"sim-{b}", self.now, dialled=Dial(f"sim-{b}", 1, self.nodes[b].domain),
            certificate=self.nodes[b].identity.certificate))   # what TLS would have shown

    def go_offline(self, i: int) -> None:
        self.online[i] = False
        for (n, conn), other in list(self.links.items()):
            if n == i:
                del self.links[(n, conn)]
                self.links.pop(other, None)
                self.run_actions(i, self.nodes[i].connection_lost(conn, self.now))
                self.at(self.now + 0.001, "lost", other)

    def come_back(self, i: int) -> None:
        self.online[i] = True
        for a, b in self.edges:
            if i in (a, b):
                j = b if a == i else a
                if self.online[j]:
                    self.connect(i, j)

    def step_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            self.now, _, event = heapq.heappop(self.queue)
            kind = event[0]
            if kind == "line":
                (i, conn), line = event[1], event[2]
                if self.online[i]:
                    self.run_actions(i, self.nodes[i].line_received(conn, line, self.now))
            elif kind == "lost":
                i, conn = event[1]
                if self.online[i]:
                    self.run_actions(i, self.nodes[i].connection_lost(conn, self.now))
            elif kind == "tick":
                i = event[1]
                if self.online[i]:
                    self.run_actions(i, self.nodes[i].tick(self.now))
                self.at(self.now + TICK, "tick", i)
            elif kind == "churn":
                i = event[1]
                (self.come_back if not self.online[i] else self.go_offline)(i)
            elif kind == "mail":
                src, dst = event[1], event[2]
                mail_id, actions = self.nodes[src].submit(
                    "Default", f"Default@{self.nodes[dst].domain}", "simulated", "x" * 1024, self.now)
                self.submitted[(src, mail_id)] = self.now
                self.run_actions(src, actions)
        self.now = end


def simulate(identities: list[Identity], topology: str, mails: int, churn: float, minutes: float,
             seed: int) -> dict:
    """`identities`: one node each, and the last one more, the nodes' mail key."""
    n = len(identities) - 1
    rng = random.Random(seed)
    edges = random_graph(n, 4, rng) if topology == "random" else scale_free_graph(n, 2, rng)
    net = Network(identities[:n], edges, seed, identities[n])
    for a, b in sorted(edges):
        net.connect(a, b)
    net.step_until(net.now + 5)                          # handshakes settle
    start = net.now
    for i in range(n):
        net.at(start + rng.uniform(0, TICK), "tick", i)
    horizon = start + minutes * 60
    # Churn: each node, independently, spends a fraction `churn` of the time offline,
    # in spells of a few minutes (exponentially distributed).
    if churn > 0:
        for i in range(n):
            t = start + rng.expovariate(1 / (240 * (1 - churn) / churn))
            while t < horizon:
                net.at(t, "churn", i)                         # off
                t += rng.expovariate(1 / 240)
                net.at(t, "churn", i)                         # on again
                t += rng.expovariate(1 / (240 * (1 - churn) / churn))
    send_window = minutes * 60 / 3
    for _ in range(mails):
        src, dst = rng.sample(range(n), 2)
        net.at(start + rng.uniform(0, send_window), "mail", src, dst)
    frames_before = collections.Counter(net.frames)
    net.step_until(horizon)
    for i in range(n):                                        # the last ones come home
        if not net.online[i]:
            net.come_back(i)
    net.step_until(horizon + 600)

    delivered, latencies, lookups = 0, [], 0
    copies = []
    for (src, mail_id), t0 in net.submitted.items():
        entry = net.nodes[src].stores.outbox[mail_id]
        if entry["status"] == "delivered":
            delivered += 1
            latencies.append(entry["done_ms"] / 1000 - t0)
        key = secral.mail_key(net.nodes[src].domain, mail_id)
        copies.append(sum(key in node.stores.relay.ever for node in net.nodes))
    left = sum(1 for node in net.nodes for k in node.stores.relay.keys() if k.startswith("mail/"))
    frames = net.frames - frames_before
    pairs = {(s, net.nodes[s].stores.outbox[m]["to"]) for s, m in net.submitted}
    lookups = len(pairs)
    latencies.sort()
    return {
        "nodes": n, "topology": topology, "edges": len(edges), "mails": len(net.submitted), "churn": churn,
        "delivered": delivered / max(1, len(net.submitted)),
        "frames_per_mail": (frames["mail"] + frames["ack"]) / max(1, len(net.submitted)),
        "copies_per_mail": statistics.mean(copies) if copies else 0,
        "left_over": left,
        "nis_frames_per_lookup": (frames["nis_query"] + frames["nis_answer"]) / max(1, lookups),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "p90_s": latencies[int(len(latencies) * 0.9)] if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--topologies", nargs="+", default=["random", "scale-free"])
    parser.add_argument("--mails", type=int, default=40, help="mails per run (default %(default)s)")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="fraction of time each node is offline (default %(default)s)")
    parser.add_argument("--minutes", type=float, default=30, help="simulated minutes (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    identities = load_keys(max(args.sizes) + 1)
    results = []
    for size in args.sizes:
        for topology in args.topologies:
            started = time.monotonic()
            r = simulate(identities[:size] + identities[-1:], topology, args.mails, args.churn, args.minutes, args.seed)
            r["wall_s"] = time.monotonic() - started
            results.append(r)
            print(f"  {size:>4} nodes, {topology:<10} done in {r['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    header = ["NODES", "TOPOLOGY", "EDGES", "DELIVERED", "FRAMES/MAIL", "COPIES/MAIL", "LEFT OVER",
              "NIS FRAMES", "P50 S", "P90 S"]
    rows = [[r["nodes"], r["topology"], r["edges"], f"{r['delivered']:.0%}", f"{r['frames_per_mail']:.0f}",
             f"{r['copies_per_mail']:.1f}", r["left_over"], f"{r['nis_frames_per_lookup']:.1f}",
             f"{r['p50_s']:.2f}" if r["p50_s"] is not None else "-",
             f"{r['p90_s']:.1f}" if r["p90_s"] is not None else "-"] for r in results]
    print(f"{args.mails} mails per run, churn {args.churn:.0%}, {args.minutes:g} simulated minutes, seed {args.seed}")
    secral.print_table(rows, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
