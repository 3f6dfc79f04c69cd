#!/usr/bin/env python3
"""One Markdown table from a `dmsrt eval` report (its --json-out, or `dmsrt eval --merge` of
several, kvpress's rows included): a line per policy with protocol a (streaming; cache CR at L),
protocol b (compress-then-continue; cache CR at C) and passkey accuracy (correct / trials per
probe length, greedy), grouped by the nearest target cache CR at L.

A row's CR at L is protocol a's; a row with protocol b only (another implementation's press)
is placed by the tokens it keeps: L / (C / CR at C). Lines are sorted by that target, then
dmsrt's policies before the other implementation's, in report order.

    python3 tools/quality_table.py merged.json [--targets 2,4,8]
"""
import argparse
import json
import math
from collections import OrderedDict


def nearest(x, targets):
    return min(targets, key=lambda t: abs(math.log(x) - math.log(t)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report")
    ap.add_argument("--targets", default="2,4,8")
    a = ap.parse_args()
    rep = json.load(open(a.report))
    L, C = rep["length"], rep["context"]
    targets = [1.0] + [float(x) for x in a.targets.split(",")]

    lines = OrderedDict()  # policy -> {"a": row, "b": row, "source": ...}
    for r in rep["rows"]:
        e = lines.setdefault(r["policy"], {"source": r.get("source", "dmsrt"), "kind": r["kind"]})
        e[r["protocol"]] = r
    lengths = sorted({p["length"] for p in rep.get("passkey", [])})
    pk = {}
    for p in rep.get("passkey", []):
        c = pk.setdefault(p["policy"], {}).setdefault(p["length"], [0, 0])
        c[0] += bool(p["correct"])
        c[1] += 1

    def cr_at_l(e):
        if "a" in e:
            return e["a"]["cache_cr"]
        return e["b"]["cache_cr"] * L / C

    order = sorted(lines.items(), key=lambda kv: (nearest(cr_at_l(kv[1]), targets), kv[1]["source"] != "dmsrt"))
    head = ["target", "policy", "a: CR at L", "a: ppl", "a: KL", "a: top-1", "b: CR at C", "b: ppl", "b: KL",
            "b: top-1"] + [f"passkey {n // 1024}K" if n % 1024 == 0 else f"passkey {n}" for n in lengths]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in order:
        t = nearest(cr_at_l(e), targets)
        cells = ["dense" if t == 1.0 else f"{t:g}x", f"`{name}`"]
        for proto in ("a", "b"):
            r = e.get(proto)
            if r is None:
                cells += ["", "", "", ""]
            else:
                streamed = (proto == "b" and r.get("source", "dmsrt") == "dmsrt" and r["kind"] != "none"
                            and not r.get("frozen_continuation", False))
                mark = " (b~)" if streamed else ""
                cells += [f"{r['cache_cr']:.2f}x{mark}", f"{r['perplexity']:.3f}", f"{r['kl']:.4f}",
                          f"{r['top1_agreement']:.4f}"]
        for n in lengths:
            c = pk.get(name, {}).get(n)
            cells.append(f"{c[0]}/{c[1]}" if c else "")
        out.append("| " + " | ".join(cells) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
