"""minGRU and minLSTM training against fastgates' LSTM and PyTorch's log-space scan.

``python -m fastgates bench --scan`` (see :mod:`fastgates.bench`,
``docs/mingru.md``).  Three comparisons per shape ``(T, B, H)`` with input
size ``I`` (``--scan-input``, default 32), at every thread count, in one
process, the sides alternating after a warm-up, each run after the
benchmark's pause (medians of the timed runs):

- a training step (``vjp`` and its pullback) of fastgates' minGRU and
  minLSTM against fastgates' LSTM of the same width: the sequential cell
  they replace;
- the same cells with ``positive=True`` against the same cells written in
  PyTorch with the paper's log-space parallel scan (Feng et al. 2024,
  appendix: ``torch.logcumsumexp`` over ``log a`` cumulative sums), forward
  and ``backward``, the same parameters: what a PyTorch user runs.  Their
  answers are compared first (y and every gradient, relative to the
  largest value: the log-space scan rounds ``exp(log h)``, its error grows
  with T);
- at B = 1, the scan alone (:mod:`fastgates._scan`, forward and adjoint)
  on one thread and on two: its speed-up from cutting time into blocks.

Memory: a model whose training step would hold more than
``--scan-memory`` GB (``training_memory``) is checkpointed at the longest
interval that fits (the LSTM and the scan cells by the same rule); the
PyTorch scan is skipped where its estimate exceeds the budget (it keeps
about TORCH_ARRAYS arrays of ``B*T*H`` values for autograd).

PyTorch is imported inside functions, only when the benchmark runs.
"""

import math
import statistics
import time

import numpy as np

import fastgates as fg
from fastgates import _config, _scan

__all__ = ["run", "add_arguments", "torch_scan_model", "checkpoint_for"]

SEQ_LENGTHS = (1_000, 10_000, 100_000)
BATCHES = (1, 16)
HIDDEN = (64, 256)
INPUT = 32
MEMORY_BUDGET_GB = 6.0
# PyTorch's log-space training step keeps about this many (B, T, H) arrays
# (the projection's halves, softplus and log-g values, the cumulative sums,
# logcumsumexp's input and output, exp's output, and their gradients).
TORCH_ARRAYS = 24
# Agreement of fastgates' linear scan and PyTorch's log-space one in float64
# (the same equations), relative to the largest value, at T = 1,000 and
# growing as T^2: the log-space scan takes exp of a difference of cumulative
# logs that grow with T, and its rounding grows faster still (measured:
# 1.4e-11, 2.5e-9 and 1.9e-7 at T = 1,000, 10,000 and 100,000).
AGREE_RTOL = 1e-10
TIME_BUDGET = 20.0          # s of timed calls per side and row, at most
WARMUP = 1


def add_arguments(p):
    """The ``--scan`` options of ``python -m fastgates bench``."""
    g = p.add_argument_group("minGRU / minLSTM (--scan)")
    g.add_argument("--scan", action="store_true",
                   help="time minGRU and minLSTM training against fastgates' LSTM of the same "
                        "width and against PyTorch's log-space scan, and the scan's speed-up "
                        "from one thread to two (its own rows; see docs/mingru.md)")
    g.add_argument("--scan-T", type=int, nargs="+", default=list(SEQ_LENGTHS), metavar="T",
                   help="sequence lengths (default %(default)s)")
    g.add_argument("--scan-B", type=int, nargs="+", default=list(BATCHES), metavar="B",
                   help="batch sizes (default %(default)s)")
    g.add_argument("--scan-H", type=int, nargs="+", default=list(HIDDEN), metavar="H",
                   help="hidden sizes (default %(default)s)")
    g.add_argument("--scan-input", type=int, default=INPUT, metavar="I",
                   help="input size (default %(default)s; the same as H compares the "
                        "products of a stacked layer)")
    g.add_argument("--scan-memory", type=float, default=MEMORY_BUDGET_GB, metavar="GB",
                   help="checkpoint a training step above this, skip PyTorch above it "
                        "(default %(default)s)")
    return p


def checkpoint_for(model, T, B, budget):
    """None if a training step of ``model`` fits in ``budget`` bytes, else the
    longest checkpoint interval (in steps, a power of two) that does."""
    if model.training_memory(T, B)["peak"] <= budget:
        return None
    every = 1 << max(0, (T - 1).bit_length())
    while every > 1 and model.training_memory(T, B, checkpoint=every)["peak"] > budget:
        every //= 2
    return every


def torch_scan_model(torch, kind, weight, bias):
    """A function ``x -> y`` of PyTorch tensors: the paper's log-space minGRU or minLSTM.

    ``weight``, ``bias``: fastgates' ``weight_ih_l0`` and ``bias_ih_l0``
    as tensors (rows z, n or f, i, n); ``x`` (B, T, I) batch-first, as the
    paper's code; initial state 0; ``positive`` candidates ``g``.
    """
    F = torch.nn.functional

    def log_g(v):
        return torch.where(v >= 0, (F.relu(v) + 0.5).log(), -F.softplus(-v))

    def scan(log_a, log_b):
        # h_t = sum_{s <= t} exp(sum_{s < r <= t} log_a_r + log_b_s)
        a_star = torch.cumsum(log_a, dim=1)
        return torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1))

    def forward(x):
        k = F.linear(x, weight, bias)
        if kind == "mingru":
            kz, kh = k.chunk(2, dim=-1)
            log_a = -F.softplus(kz)                     # log(1 - z)
            log_b = -F.softplus(-kz) + log_g(kh)        # log z + log g
        else:
            kf, ki, kh = k.chunk(3, dim=-1)
            diff = F.softplus(-kf) - F.softplus(-ki)
            log_a = -F.softplus(diff)                   # log f/(f+i)
            log_b = -F.softplus(-diff) + log_g(kh)      # log i/(f+i) + log g
        return scan(log_a, log_b)

    return forward


class _Side:
    """One contender of a row: a name, a function running one timed step and
    ``setup`` (untimed, before each: thread counts), its step's calls."""

    def __init__(self, name, step, setup=None, calls=1):
        self.name = name
        self.step = step
        self.setup = setup
        self.calls = calls
        self.times = []

    def run(self):
        # the benchmark's pause: the other side's pool threads stop spinning
        # first (fastgates would take them for other work on the cores and
        # run on one thread; see fastgates.bench._pause)
        from fastgates.bench import _pause
        if self.setup is not None:
            self.setup()
        _pause()
        start = time.perf_counter()
        self.step()
        self.times.append((time.perf_counter() - start) / self.calls)

    @property
    def median(self):
        return statistics.median(self.times) if self.times else math.nan


def _fastgates_step(model, x, dy, checkpoint):
    def step():
        _, pullback = model.vjp(x, checkpoint=checkpoint)
        pullback(dy)
    return step


def _torch_step(torch, forward, x, dy):
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))).requires_grad_(True)
    dyt = torch.from_numpy(np.ascontiguousarray(dy.transpose(1, 0, 2)))

    def step():
        xt.grad = None
        forward(xt).backward(dyt)
    return step


def _torch_run(torch, kind, model, x, dy, dtype):
    """y and the gradients of x, W, b from PyTorch's log-space scan, in ``dtype``."""
    w = torch.from_numpy(model.weight_ih_l0.astype(dtype)).requires_grad_(True)
    b = torch.from_numpy(model.bias_ih_l0.astype(dtype)).requires_grad_(True)
    forward = torch_scan_model(torch, kind, w, b)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2), dtype=dtype))
    xt.requires_grad_(True)
    yt = forward(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(dy.transpose(1, 0, 2), dtype=dtype)))
    return [yt.detach().numpy().transpose(1, 0, 2), xt.grad.numpy().transpose(1, 0, 2),
            w.grad.numpy(), b.grad.numpy()]


def _fastgates_run(model, x, dy, dtype):
    """y and the gradients of x, W, b from fastgates, the model's parameters in ``dtype``."""
    m = type(model)(model.input_size, model.hidden_size, dtype=dtype, positive=model.positive)
    m.load_state_dict({k: v.astype(dtype) for k, v in model.state_dict().items()})
    (y, _), pullback = m.vjp(x.astype(dtype))
    dx, _, grads = pullback(dy.astype(dtype))
    return [y, dx, grads["weight_ih_l0"], grads["bias_ih_l0"]]


def _largest_error(values, reference):
    """max over the arrays of |value - reference| / max |reference|."""
    return max(float(np.abs(v - r).max() / max(np.abs(r).max(), 1e-300))
               for v, r in zip(values, reference))


def _agreement(torch, kind, model, x, dy):
    """How the two scans agree, and how accurate each is in the model's dtype.

    Returns ``(agree, fastgates_err, torch_err)``: the two in float64 (the
    same equations: they agree to rounding; y and the gradients of x, W and
    b), and each side's ``y`` in the model's dtype against fastgates'
    float64 one, relative to its largest value: the scan's accuracy.  (Not
    the gradients: ``g`` has a kink at 0, where float32 and float64 may
    round a pre-activation to either side and take the other slope.)
    """
    ref64 = _fastgates_run(model, x, dy, np.float64)
    agree = _largest_error(_torch_run(torch, kind, model, x, dy, np.float64), ref64)
    if model.dtype == np.float64:
        return agree, None, None
    fg_err = _largest_error(_fastgates_run(model, x, dy, model.dtype)[:1], ref64[:1])
    torch_err = _largest_error(_torch_run(torch, kind, model, x, dy, model.dtype)[:1], ref64[:1])
    return agree, fg_err, torch_err


def _time_row(sides, repeats):
    """Warm up each side, then alternate them for up to ``repeats`` rounds
    within TIME_BUDGET s per side."""
    for side in sides:
        for _ in range(WARMUP):
            side.run()
        side.times.clear()
    slowest = 0.0
    for r in range(repeats):
        for side in sides:
            side.run()
        slowest = max(s.median for s in sides)
        if (r + 1) * slowest >= TIME_BUDGET:
            break


def _scan_speedup(T, H, dtype, repeats):
    """The scan alone at B = 1 (forward and adjoint): median seconds on 1 and on 2 threads."""
    rng = np.random.default_rng(0)
    B = 1
    # minGRU's gates: z and n (a = 1 - z, b = z n)
    ab = np.concatenate([rng.uniform(0.0, 0.5, (T, B, H)), rng.standard_normal((T, B, H))],
                        axis=2).astype(dtype)
    one = dtype.type(1)
    lengths = np.full(B, T, dtype=np.int64)
    h0 = np.zeros((B, H), dtype=dtype)
    y = np.empty((T, B, H), dtype=dtype)
    hn = np.empty((B, H), dtype=dtype)
    g = np.empty_like(ab)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dh0 = np.empty((B, H), dtype=dtype)
    nblocks = _scan.scan_blocks(T, B)
    # calls per timed run: about 20 ms of them (a call takes about 4 ns per
    # value on one thread)
    calls = max(1, math.ceil(0.02 / (T * H * 4e-9)))
    out = {}
    sides = []
    for threads in (1, 2):
        def setup(threads=threads):
            fg.set_num_threads(threads, adaptive=False)
            _config.kernel_threads(threads)

        def step():
            for _ in range(calls):
                _scan.scan_forward(ab, 0, one, -one, 0, H, h0, lengths, False, nblocks, y, 0,
                                   hn)
                _scan.scan_backward(dy, 0, hn, ab, 0, one, -one, lengths, False, nblocks, g,
                                    H, dh0)
        sides.append(_Side(threads, step, setup, calls))
    _time_row(sides, max(repeats, 5))
    for side in sides:
        out[side.name] = side.median
    return nblocks, out


def run(args, log=print):
    """Run the ``--scan`` benchmark of parsed ``args``; print and return the report."""
    try:
        import torch
    except ImportError:
        torch = None
        log("note: PyTorch is not installed: the log-space scan peer is not timed")
    threads_list = args.threads or [1, 2]
    dtypes = [d for d in (args.dtypes or ["float32"])]
    repeats = args.repeats
    budget = args.scan_memory * 1e9
    I = args.scan_input
    rows, scan_rows, notes = [], [], []
    old_threads = fg.get_num_threads()
    old_torch = torch.get_num_threads() if torch is not None else None
    try:
        for dtype_name in dtypes:
            dtype = np.dtype(dtype_name)
            for H in args.scan_H:
                for T in args.scan_T:
                    if 1 in args.scan_B:
                        nblocks, t = _scan_speedup(T, H, dtype, repeats)
                        scan_rows.append((T, H, dtype_name, nblocks, t[1], t[2]))
                        log(f"scan T={T} H={H} {dtype_name}: {nblocks} blocks, 1 thread "
                            f"{t[1] * 1e3:.2f} ms, 2 threads {t[2] * 1e3:.2f} ms, "
                            f"x{t[1] / t[2]:.2f}")
                    for B in args.scan_B:
                        rows.extend(_shape_rows(torch, T, B, I, H, dtype, threads_list, repeats,
                                                budget, notes, log))
    finally:
        fg.set_num_threads(old_threads)
        if torch is not None:
            torch.set_num_threads(old_torch)
    text = report(rows, scan_rows, notes, args)
    print(text, end="")
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            f.write(text)
    failures = [r for r in rows if r["agree"] is not None and r["agree"] > r["agree_tol"]]
    for r in failures:
        log(f"FAILED: T={r['T']} B={r['B']} H={r['H']}: fastgates and PyTorch's scan differ by "
            f"{r['agree']:.1e} in float64 (tolerance {r['agree_tol']:.0e})")
    return 1 if failures else 0


def _shape_rows(torch, T, B, I, H, dtype, threads_list, repeats, budget, notes, log):
    rng = np.random.default_rng([T, B, H])
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    models = {"LSTM": fg.LSTM(I, H, dtype=dtype, seed=0),
              "minGRU": fg.MinGRU(I, H, dtype=dtype, seed=0),
              "minLSTM": fg.MinLSTM(I, H, dtype=dtype, seed=0),
              "minGRU+": fg.MinGRU(I, H, dtype=dtype, seed=0, positive=True),
              "minLSTM+": fg.MinLSTM(I, H, dtype=dtype, seed=0, positive=True)}
    checkpoints = {name: checkpoint_for(m, T, B, budget) for name, m in models.items()}
    for name, every in checkpoints.items():
        if every is not None:
            notes.append(f"T={T} B={B} H={H}: {name} checkpointed every {every} steps "
                         f"(training_memory above {budget / 1e9:g} GB)")
    torch_bytes = TORCH_ARRAYS * B * T * H * dtype.itemsize
    use_torch = torch is not None and torch_bytes <= budget
    if torch is not None and not use_torch:
        notes.append(f"T={T} B={B} H={H}: PyTorch's log-space scan not run (about "
                     f"{torch_bytes / 1e9:.1f} GB for autograd, over the "
                     f"{budget / 1e9:g} GB budget)")
    agree, accuracy = {}, {}
    if use_torch and 24 * B * T * H * 8 <= budget:
        torch.set_num_threads(max(threads_list))
        fg.set_num_threads(max(threads_list))
        for kind, name in (("mingru", "minGRU+"), ("minlstm", "minLSTM+")):
            agree[kind], *accuracy[kind] = _agreement(torch, kind, models[name], x, dy)
    elif use_torch:
        notes.append(f"T={T} B={B} H={H}: agreement not checked (float64 over the budget)")
    out = []
    for threads in threads_list:
        fg.set_num_threads(threads)
        sides = [_Side(name, _fastgates_step(m, x, dy, checkpoints[name]))
                 for name, m in models.items()]
        if use_torch:
            torch.set_num_threads(threads)
            for kind, name in (("mingru", "torch minGRU"), ("minlstm", "torch minLSTM")):
                m = models["minGRU+" if kind == "mingru" else "minLSTM+"]
                forward = torch_scan_model(torch, kind, torch.from_numpy(m.weight_ih_l0.copy()),
                                           torch.from_numpy(m.bias_ih_l0.copy()))
                sides.append(_Side(name, _torch_step(torch, forward, x, dy)))
        _time_row(sides, repeats)
        t = {s.name: s.median for s in sides}
        tol = AGREE_RTOL * max(1.0, T / 1000) ** 2
        row = {"T": T, "B": B, "H": H, "I": I, "dtype": dtype.name, "threads": threads,
               "times": t, "agree": max(agree.values()) if agree else None, "agree_tol": tol,
               "accuracy": accuracy}
        out.append(row)
        log(f"T={T} B={B} H={H} I={I} {dtype.name} {threads} thread(s): "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))
    return out


def _ms(v):
    if v is None or not np.isfinite(v):
        return "-"
    return f"{v * 1e3:.3g}" if v < 1 else f"{v * 1e3:.0f}"


def _ratio(a, b):
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return "-"
    return f"{a / b:.1f}"


def _accuracy(accuracy):
    """``fastgates / torch`` errors of minGRU and minLSTM in the model's dtype."""
    parts = [f"{a[0]:.0e} / {a[1]:.0e}" for a in accuracy.values() if a and a[0] is not None]
    return "; ".join(parts) if parts else "-"


def report(rows, scan_rows, notes, args):
    """The markdown report of the ``--scan`` rows."""
    out = ["# minGRU / minLSTM: training steps (ms, median)", "",
           f"Input size I = {args.scan_input}; a training step is `vjp` + pullback (PyTorch: "
           "forward + `backward`).  LSTM/x: fastgates' LSTM of the same width over the cell's "
           "time; torch/x: PyTorch's log-space scan over fastgates' cell with "
           "`positive=True` (the same equations).", "",
           "| T | B | H | dtype | threads | LSTM | minGRU | minLSTM | LSTM/minGRU | LSTM/minLSTM "
           "| minGRU+ | torch minGRU | torch/minGRU+ | minLSTM+ | torch minLSTM | torch/minLSTM+ "
           "| agreement (float64) | float32 error of y, fastgates / torch |",
           "|" + "---|" * 18]
    for r in rows:
        t = r["times"]
        out.append("| " + " | ".join([
            str(r["T"]), str(r["B"]), str(r["H"]), r["dtype"], str(r["threads"]),
            _ms(t["LSTM"]), _ms(t["minGRU"]), _ms(t["minLSTM"]),
            _ratio(t["LSTM"], t["minGRU"]), _ratio(t["LSTM"], t["minLSTM"]),
            _ms(t["minGRU+"]), _ms(t.get("torch minGRU")),
            _ratio(t.get("torch minGRU"), t["minGRU+"]),
            _ms(t["minLSTM+"]), _ms(t.get("torch minLSTM")),
            _ratio(t.get("torch minLSTM"), t["minLSTM+"]),
            "-" if r["agree"] is None else f"{r['agree']:.1e}",
            _accuracy(r["accuracy"])]) + " |")
    if scan_rows:
        out += ["", "## The scan alone at B = 1 (forward + adjoint, ms, median)", "",
                "| T | H | dtype | blocks | 1 thread | 2 threads | speed-up |", "|" + "---|" * 7]
        for T, H, dt, nblocks, t1, t2 in scan_rows:
            out.append(f"| {T} | {H} | {dt} | {nblocks} | {_ms(t1)} | {_ms(t2)} | "
                       f"{t1 / t2:.2f} |")
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
