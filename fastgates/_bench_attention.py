"""Forgetting attention against PyTorch's ``scaled_dot_product_attention`` with a float mask.

``python -m fastgates bench --attention`` (see :mod:`fastgates.bench`,
``docs/forgetting_attention.md``).  The peer is what a PyTorch user writes
for the Forgetting Transformer without a custom kernel: the bias
``c_i - c_j`` (``c`` the cumulative sum of ``log_f``) built as a float
``T x T`` mask with ``-inf`` above the diagonal, passed as ``attn_mask``::

    c = torch.cumsum(log_f, -1)
    mask = (c[..., :, None] - c[..., None, :]).masked_fill(upper, -inf)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

timed with the mask built inside each call (``log_f`` changes with every
input), forward under ``torch.inference_mode()`` and forward plus
``out.backward(dout)`` for training (gradients of ``q``, ``k``, ``v`` and
``log_f``).  The protocol is the benchmark's (:mod:`fastgates.bench`): the
answers compared first (a row whose answers disagree is not timed and the
run fails), the sides alternating after a warm-up, each side at every
thread count, medians of the timed runs, PyTorch's best setting kept.

Peak memory: each configuration, side and mode in a fresh process, the rise
of the peak resident set (``VmHWM``, reset just before the call) over the
resident set before it, so that every allocation counts, Numba's and
PyTorch's own included.  PyTorch's mask alone is ``B * H * T^2`` floats (2
GiB at B = 4, H = 8, T = 4096 in float32), and it holds a few such arrays:
a configuration whose estimate exceeds ``--memory-budget`` is not run for
PyTorch, and the report says so.

PyTorch is imported here, inside functions, only when the benchmark runs.
"""

import json
import sys
import textwrap

import numpy as np

import fastgates as fg

__all__ = ["run", "add_arguments", "torch_inputs", "torch_forward", "torch_training_step",
           "torch_bytes", "returned_bytes", "measure_memory"]

HEADS = 8
HEAD_DIM = 64
SEQ_LENGTHS = (256, 1024, 4096)
BATCHES = (1, 4)
MEMORY_BUDGET_GB = 12.0
# PyTorch's peak, in B*H*T^2-element arrays: measured here (torch 2.13,
# float32, B = 1, H = 8, T = 1024 and 2048) 2.06 for inference and 3.5-3.6
# for a training step; the estimate leaves room above both.
TORCH_T2_ARRAYS = {"infer": 2.5, "train": 4.5}
# Agreement (float32): max |fastgates - torch| / max(1, max |torch|).
# Measured at T = 4096: up to 1.5e-6 (out) and 3.9e-6 (dlog_f, a sum over
# up to T tiles); each side against fastgates in float64: fastgates 1.3e-6
# (out) and 3.4e-6 (dlog_f), PyTorch 7.7e-7 and 1.6e-6.  The gradients'
# bound leaves room for their growth with T.
AGREE_TOL = {"out": 1e-5, "grad": 1e-4}
GATE_LOGIT = (4.5, 1.0)     # the gates' pre-activations: mean and spread


def make_inputs(B, T, dtype=np.float32, seed=0):
    """``q, k, v, log_f, dout``: normal entries; ``log_f = log sigmoid(a)``, ``a ~ N(4.5, 1)``
    (gates of about 0.99: a memory of ~100 steps, no key's weight underflows)."""
    rng = np.random.default_rng(seed)
    shape = (B, HEADS, T, HEAD_DIM)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    a = rng.normal(GATE_LOGIT[0], GATE_LOGIT[1], (B, HEADS, T))
    log_f = (np.minimum(a, 0) - np.log1p(np.exp(-np.abs(a)))).astype(dtype)
    return q, k, v, log_f, dout


# ---------------------------------------------------------------------------
# the peer


def torch_mask(torch, log_f):
    """The float ``T x T`` mask: ``c_i - c_j`` on and below the diagonal, ``-inf`` above."""
    T = log_f.shape[-1]
    c = torch.cumsum(log_f, dim=-1)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    return (c[..., :, None] - c[..., None, :]).masked_fill(upper, float("-inf"))


def torch_inputs(torch, q, k, v, log_f):
    """The four arrays as leaf tensors that require gradients."""
    return tuple(torch.tensor(a, requires_grad=True) for a in (q, k, v, log_f))


def torch_forward(torch, tq, tk, tv, tl):
    """One inference call: the mask and the attention, under ``inference_mode``."""
    with torch.inference_mode():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv,
                                                                attn_mask=torch_mask(torch, tl))


def torch_training_step(torch, tq, tk, tv, tl, dout):
    """Forward and backward; returns ``out, dq, dk, dv, dlog_f`` as NumPy arrays."""
    for t in (tq, tk, tv, tl):
        t.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv,
                                                           attn_mask=torch_mask(torch, tl))
    out.backward(dout if isinstance(dout, torch.Tensor) else torch.tensor(dout))
    return tuple(t.detach().numpy() for t in (out, tq.grad, tk.grad, tv.grad, tl.grad))


def torch_bytes(B, T, mode, itemsize=4):
    """PyTorch's estimated peak (bytes) beyond its inputs: ``TORCH_T2_ARRAYS`` T x T arrays."""
    return TORCH_T2_ARRAYS[mode] * B * HEADS * T * T * itemsize


def returned_bytes(B, T, mode, itemsize=4):
    """What a call returns (bytes): the output; training also ``dq``, ``dk``,
    ``dv`` and ``dlog_f``."""
    unit = B * HEADS * T * HEAD_DIM * itemsize
    return unit if mode == "infer" else 4 * unit + B * HEADS * T * itemsize


# ---------------------------------------------------------------------------
# memory, in fresh processes


def measure_memory(spec):
    """Peak memory of one call in this (fresh) process; returns KiB or None.

    ``spec``: side ("fastgates" or "torch"), mode, B, T, threads.  A first
    call on a short sequence loads (or compiles) the code; then the rise of
    the peak resident set over the resident set before the timed call.
    """
    from .bench import _hwm_kb, _release_free_memory, _reset_peak_rss

    B, T, mode, side = spec["B"], spec["T"], spec["mode"], spec["side"]
    fg.set_num_threads(spec["threads"])
    q, k, v, log_f, dout = make_inputs(B, T)
    if side == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
        dout_t = torch.tensor(dout)

        def call(n):
            args = torch_inputs(torch, q[..., :n, :], k[..., :n, :], v[..., :n, :], log_f[..., :n])
            if mode == "infer":
                return torch_forward(torch, *args)
            return torch_training_step(torch, *args, dout_t[..., :n, :])
    else:
        def call(n):
            if mode == "infer":
                return fg.forgetting_attention(q[..., :n, :], k[..., :n, :], v[..., :n, :],
                                               log_f[..., :n])
            out, pullback = fg.forgetting_attention_vjp(q[..., :n, :], k[..., :n, :],
                                                        v[..., :n, :], log_f[..., :n])
            return out, pullback(dout[..., :n, :])

    call(min(T, 130))
    _release_free_memory()
    if not _reset_peak_rss() or _hwm_kb() is None:
        return None
    before = _hwm_kb()
    result = call(T)
    peak = _hwm_kb()
    del result
    return max(peak - before, 0)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from fastgates._bench_attention import measure_memory
    print(json.dumps(measure_memory(json.loads(sys.argv[1]))))
""")


# ---------------------------------------------------------------------------
# the run


def add_arguments(p):
    """The options of ``--attention`` (added to the benchmark's parser)."""
    g = p.add_argument_group("forgetting attention (--attention)")
    g.add_argument("--attention", action="store_true",
                   help="benchmark forgetting attention against PyTorch's "
                        "scaled_dot_product_attention with the forget-gate bias as a float "
                        "mask (forward and forward+backward, and peak memory), instead of "
                        "the recurrent matrix; uses --threads, --repeats, --min-run-time, "
                        "--out, --json")
    g.add_argument("--attention-lengths", type=int, nargs="+", default=list(SEQ_LENGTHS),
                   metavar="T", help="sequence lengths (default: 256 1024 4096)")
    g.add_argument("--attention-batches", type=int, nargs="+", default=list(BATCHES),
                   metavar="B", help=f"batch sizes, each with {HEADS} heads of {HEAD_DIM} "
                                     "(default: 1 4)")
    g.add_argument("--memory-budget", type=float, default=MEMORY_BUDGET_GB, metavar="GB",
                   help="skip PyTorch where its estimated peak exceeds this (default "
                        f"{MEMORY_BUDGET_GB:g})")
    g.add_argument("--no-attention-memory", action="store_true",
                   help="skip the peak-memory measurements")


def _scaled_error(mine, theirs):
    b = np.asarray(theirs, dtype=np.float64)
    return float(np.abs(np.asarray(mine, dtype=np.float64) - b).max()) / max(1.0, float(np.abs(b).max()))


def _agreement(mode, mine, theirs):
    """(worst error, its array, failures) of fastgates against PyTorch."""
    names = ("out",) if mode == "infer" else ("out", "dq", "dk", "dv", "dlog_f")
    worst, failures = (0.0, names[0]), []
    for name, a, b in zip(names, mine, theirs):
        if name == "dlog_f":
            # log_f[0] enters no score: fastgates says 0, PyTorch's sums leave rounding
            a, b = a[..., 1:], b[..., 1:]
        err = _scaled_error(a, b)
        tol = AGREE_TOL["out" if name == "out" else "grad"]
        if not err <= tol:
            failures.append(f"{name} differs by {err:.1e} (tolerance {tol:.0e})")
        if err >= worst[0]:
            worst = (err, name)
    return worst, failures


def run(args, log=None):
    """Run the forgetting-attention benchmark for parsed ``args``; return the exit code."""
    from . import bench

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = sorted(set(args.threads or [1, 2]))
    if args.repeats < 7:
        args._bench_parser.error("--repeats must be at least 7 (the protocol's minimum)")
    budget = args.memory_budget * 2**30
    try:
        import torch
    except ImportError:
        torch = None
        log("note: PyTorch is not installed: fastgates is timed alone")
    if torch is not None:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    setter = bench.ThreadSetter(torch)
    old = fg.get_num_threads()
    rows, memory_rows, notes, failed = [], [], [], False
    try:
        for T in args.attention_lengths:
            for B in args.attention_batches:
                q, k, v, log_f, dout = make_inputs(B, T)
                for mode in ("infer", "train"):
                    label = f"T={T} B={B} {mode}"
                    fits = torch is not None and torch_bytes(B, T, mode) <= budget
                    if torch is not None and not fits:
                        notes.append(f"{label}: PyTorch not run: its estimated peak "
                                     f"{torch_bytes(B, T, mode) / 2**30:.1f} GiB "
                                     f"({TORCH_T2_ARRAYS[mode]} x B*H*T^2 floats) exceeds "
                                     f"--memory-budget {args.memory_budget:g} GB")
                    sides, answers = _sides(torch if fits else None, setter, threads, mode,
                                            q, k, v, log_f, dout)
                    err, failures = (None, []) if not fits else _agreement(
                        mode, answers["fastgates"], answers["torch"])
                    if failures:
                        failed = True
                        notes.append(f"**{label}: answers disagree, not timed**: "
                                     + "; ".join(failures))
                        continue
                    log(f"timing {label} ({len(sides)} sides)")
                    samples = bench.time_alternating(sides, args.repeats, args.min_run_time)
                    for n in threads:
                        mine = samples[f"fastgates@{n}"].median
                        same = samples.get(f"torch@{n}")
                        best = min((samples[f"torch@{m}"].median, m) for m in range(1, n + 1)
                                   if f"torch@{m}" in samples) if fits else None
                        rows.append({"T": T, "B": B, "mode": mode, "threads": n,
                                     "fastgates_ms": mine * 1e3,
                                     "torch_ms": None if same is None else same.median * 1e3,
                                     "torch_best_ms": None if best is None else best[0] * 1e3,
                                     "torch_best_threads": None if best is None else best[1],
                                     "ratio": None if best is None else best[0] / mine,
                                     "max_error": None if err is None else err[0],
                                     "error_array": None if err is None else err[1]})
                        log(f"  thr={n}: fastgates {mine * 1e3:.2f} ms" + (
                            "" if best is None else
                            f", torch best {best[0] * 1e3:.2f} ms: {best[0] / mine:.2f}x"))
        if not args.no_attention_memory:
            memory_rows = _memory(args, torch, threads, budget, log)
    finally:
        fg.set_num_threads(old)
    text = report(rows, memory_rows, notes, args, torch)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": args.command_line, "rows": rows, "memory": memory_rows,
                       "notes": notes, "tolerances": AGREE_TOL}, f, indent=1)
    return 1 if failed else 0


def _sides(torch, setter, threads, mode, q, k, v, log_f, dout):
    """The timed sides of one configuration and the answers (at the most threads)."""
    from .bench import Side

    if mode == "infer":
        def fg_call():
            return fg.forgetting_attention(q, k, v, log_f)
    else:
        def fg_call():
            out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
            return (out,) + pullback(dout)
    setter(max(threads))
    answers = {"fastgates": (fg_call(),) if mode == "infer" else fg_call()}
    sides = [Side("fastgates", n, fg_call, setter.setter(n)) for n in threads]
    if torch is None:
        return sides, answers
    args = torch_inputs(torch, q, k, v, log_f)
    dout_t = torch.tensor(dout)
    if mode == "infer":
        def t_call():
            return torch_forward(torch, *args)
        answers["torch"] = (t_call().numpy(),)
    else:
        def t_call():
            return torch_training_step(torch, *args, dout_t)
        answers["torch"] = t_call()
    sides += [Side("torch", n, t_call, setter.setter(n)) for n in range(1, max(threads) + 1)]
    setter.refresh()
    return sides, answers


def _memory(args, torch, threads, budget, log):
    from .bench import _child_env, _run_child

    env = _child_env()
    n = max(threads)
    out = []
    for T in args.attention_lengths:
        for B in args.attention_batches:
            for mode in ("infer", "train"):
                row = {"T": T, "B": B, "mode": mode, "threads": n,
                       "fastgates_kib": None, "torch_kib": None,
                       "torch_estimate_mib": torch_bytes(B, T, mode) / 2**20,
                       "returned_mib": returned_bytes(B, T, mode) / 2**20}
                for side in ("fastgates", "torch"):
                    if side == "torch" and (torch is None or torch_bytes(B, T, mode) > budget):
                        continue
                    spec = {"side": side, "mode": mode, "B": B, "T": T, "threads": n}
                    row[f"{side}_kib"] = _run_child(_MEMORY_SCRIPT, env, json.dumps(spec))
                    log(f"memory T={T} B={B} {mode} {side}: {_mib(row[f'{side}_kib'])} MiB")
                out.append(row)
    return out


def _mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def _ms(t):
    return "" if t is None else (f"{t:.3g}" if t < 10 else f"{t:.1f}")


def report(rows, memory_rows, notes, args, torch=None):
    """The markdown report of the rows."""
    from .bench import Peers, environment_lines

    out = ["# fastgates benchmark: forgetting attention", ""]
    out += environment_lines(Peers(torch=torch))
    out.append(f"- command: `{getattr(args, 'command_line', 'python -m fastgates bench --attention')}`")
    out += [f"- {HEADS} heads of d = dv = {HEAD_DIM}, float32; median of {args.repeats} timed runs "
            "after a warm-up, sides alternating; PyTorch at every thread count up to the row's, "
            "`best` its fastest", ""]
    if rows:
        out += ["Times in ms; ratio: PyTorch's best / fastgates (above 1: fastgates is faster). "
                "infer: the output; train: the output and the gradients of q, k, v and log_f "
                "(PyTorch: `out.backward(dout)`). max err: max |fastgates - PyTorch| / max(1, "
                "max |PyTorch|), worst array.", "",
                "| T | B | mode | thr | fastgates | torch (same thr) | torch best | ratio | max err |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            best = "" if r["torch_best_ms"] is None else (
                f"{_ms(r['torch_best_ms'])} ({r['torch_best_threads']} thr)")
            ratio = "" if r["ratio"] is None else f"**{r['ratio']:.2f}**"
            err = "" if r["max_error"] is None else f"{r['max_error']:.1e} ({r['error_array']})"
            out.append(f"| {r['T']} | {r['B']} | {r['mode']} | {r['threads']} | "
                       f"{_ms(r['fastgates_ms'])} | {_ms(r['torch_ms'])} | {best} | {ratio} | {err} |")
    if memory_rows:
        out += ["", "## Peak memory of one call (fresh process)", "",
                "Rise of the peak resident set over the resident set before the call "
                "(every allocation, Numba's and PyTorch's included), MiB, at "
                f"{memory_rows[0]['threads']} threads. returned: the arrays a call returns "
                "(infer: the output; train: also dq, dk, dv, dlog_f), which both sides "
                "allocate; the rest is working memory. torch est.: "
                f"{TORCH_T2_ARRAYS['infer']} (infer) or {TORCH_T2_ARRAYS['train']} (train) x "
                "B*H*T^2 floats.", "",
                "| T | B | mode | fastgates | returned | torch | torch est. | torch / fastgates |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in memory_rows:
            f_kib, t_kib = r["fastgates_kib"], r["torch_kib"]
            ratio = "" if not (f_kib and t_kib) else f"{t_kib / f_kib:.0f}"
            out.append(f"| {r['T']} | {r['B']} | {r['mode']} | {_mib(f_kib)} | "
                       f"{r['returned_mib']:.1f} | {_mib(t_kib)} | "
                       f"{r['torch_estimate_mib']:.0f} | {ratio} |")
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
