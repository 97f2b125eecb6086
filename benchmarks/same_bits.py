#!/usr/bin/env python
"""Bitwise before/after check of a change that must not move a bit.

Runs 320 random configurations of the layers and cells (LSTM and GRU, both
dtypes, stacked, bidirectional, reverse, lengths, initial state,
checkpointing, clipping, peepholes, ``input_forget``, classic GRU, no bias,
1 and 2 threads, fast and exact activations, one-step cells) with the
fastgates found on ``sys.path`` and writes one SHA-256 per configuration of
its outputs, final states, every gradient, ``gates()`` and
``training_memory``.  Run it on two trees and compare::

    PYTHONPATH=/path/to/old python benchmarks/same_bits.py old.json
    PYTHONPATH=/path/to/new python benchmarks/same_bits.py new.json
    python benchmarks/same_bits.py --compare old.json new.json

(``--compare`` prints the configurations that differ and exits 1 if any do.)
"""
import hashlib
import json
import sys

import numpy as np
import fastgates as fg

if sys.argv[1:2] == ["--compare"]:
    a, b = (json.load(open(p)) for p in sys.argv[2:4])
    differ = [c for c, x, y in zip(a["configs"], a["hashes"], b["hashes"]) if x != y]
    for c in differ:
        print(c)
    print(f"{len(differ)} of {len(a['hashes'])} configurations differ")
    sys.exit(1 if differ else 0)
out_path = sys.argv[1]
rng = np.random.default_rng(12345)
configs = []
shapes = [(5, 1, 3, 4), (40, 1, 8, 16), (100, 1, 32, 64), (20, 3, 5, 7), (33, 16, 24, 40),
          (12, 40, 16, 96), (7, 2, 70, 130), (64, 1, 16, 300)]
for i in range(320):
    cell = ["lstm", "gru"][i % 2]
    T, B, I, H = shapes[rng.integers(len(shapes))]
    c = dict(cell=cell, T=int(T), B=int(B), I=int(I), H=int(H),
             dtype=["float32", "float64"][int(rng.integers(2))],
             layers=int(rng.choice([1, 1, 2])), bidir=bool(rng.random() < 0.3),
             lengths=bool(rng.random() < 0.3), checkpoint=bool(rng.random() < 0.2),
             clip=bool(rng.random() < 0.15), bias=bool(rng.random() < 0.85),
             threads=int(rng.choice([1, 2])), mode=["fast", "exact"][int(rng.random() < 0.2)],
             state=bool(rng.random() < 0.4), single=bool(rng.random() < 0.1))
    if cell == "lstm":
        c["peephole"] = bool(rng.random() < 0.15); c["input_forget"] = bool(rng.random() < 0.1)
    else:
        c["reset_after"] = bool(rng.random() < 0.8)
    c["reverse"] = (not c["bidir"]) and bool(rng.random() < 0.1)
    configs.append(c)

def digest(h, obj):
    if obj is None:
        h.update(b"none"); return
    if isinstance(obj, dict):
        for k in sorted(obj): h.update(k.encode()); digest(h, obj[k]); return
    if isinstance(obj, (tuple, list)):
        for o in obj: digest(h, o); return
    a = np.ascontiguousarray(obj); h.update(str(a.shape).encode()); h.update(a.tobytes())

res = []
for c in configs:
    fg.set_num_threads(c["threads"], adaptive=False)
    fg.set_activation_mode(c["mode"])
    dt = np.float32 if c["dtype"] == "float32" else np.float64
    r = np.random.default_rng(7)
    h = hashlib.sha256()
    kw = dict(bias=c["bias"], dtype=dt, seed=3, clip=1.5 if c["clip"] else None)
    if c["cell"] == "lstm":
        kw.update(peephole=c["peephole"], input_forget=c["input_forget"])
    else:
        kw.update(reset_after=c["reset_after"])
    if c["single"]:
        cls = fg.LSTMCell if c["cell"] == "lstm" else fg.GRUCell
        m = cls(c["I"], c["H"], **kw)
        x = r.standard_normal((c["B"], c["I"])).astype(dt)
        st = None
        if c["state"]:
            st = tuple(r.standard_normal((c["B"], c["H"])).astype(dt) for _ in range(2 if c["cell"] == "lstm" else 1))
            st = st if c["cell"] == "lstm" else st[0]
        out, pb = m.vjp(x, st)
        dout = (tuple(r.standard_normal(o.shape).astype(dt) for o in out) if isinstance(out, tuple)
                else r.standard_normal(out.shape).astype(dt))
        digest(h, out); digest(h, pb(dout))
    else:
        cls = fg.LSTM if c["cell"] == "lstm" else fg.GRU
        m = cls(c["I"], c["H"], c["layers"], bidirectional=c["bidir"], reverse=c["reverse"], **kw)
        T, B = c["T"], c["B"]
        x = r.standard_normal((T, B, c["I"])).astype(dt)
        lengths = r.integers(1, T + 1, size=B) if c["lengths"] else None
        D = 2 if c["bidir"] else 1
        st = None
        if c["state"]:
            parts = tuple(r.standard_normal((c["layers"] * D, B, c["H"])).astype(dt) for _ in range(2 if c["cell"] == "lstm" else 1))
            st = parts if c["cell"] == "lstm" else parts[0]
        digest(h, m(x, st, lengths))
        (y, s), pb = m.vjp(x, st, lengths, checkpoint=(max(1, T // 3) if c["checkpoint"] else None))
        dy = r.standard_normal(y.shape).astype(dt)
        ds = (tuple(r.standard_normal(o.shape).astype(dt) for o in s) if isinstance(s, tuple)
              else r.standard_normal(s.shape).astype(dt))
        digest(h, (y, s)); digest(h, pb(dy, ds))
        digest(h, m.gates(x, st, lengths))
        digest(h, m.training_memory(T, B, checkpoint=5 if c["checkpoint"] else None, padded=c["lengths"]))
    res.append(h.hexdigest())
json.dump({"configs": configs, "hashes": res}, open(out_path, "w"))
print("done", len(res))
