"""JAX as a peer of the benchmark runner (:mod:`fastgates.bench`): the model and its worker.

The recurrence is the one a performance-minded JAX user writes: per layer
and direction the input projection of all steps as one product (with every
bias that can be folded into it), then ``jax.lax.scan`` over time carrying
the state, the whole forward pass (inference) or the whole training step
(forward, and gradients by ``jax.grad`` of ``sum(y * dy)`` with respect to
the parameters, the input and the initial state) compiled as one function
by ``jax.jit``.  The GRU is PyTorch's
(``reset_after=True``).

**Threads.**  XLA's CPU client sizes its thread pools from the CPUs the
process may run on when it starts; in jaxlib 0.10 no ``XLA_FLAGS`` setting
limits them (measured: ``--xla_cpu_multi_thread_eigen=false`` still kept
1.9 cores busy on a 1024x1024 product, and ``intra_op_parallelism_threads=1``
is not an XLA flag: XLA reads it as a file name and aborts).  So each thread
count K runs in a worker process of its own (this file run as a script,
started by :class:`fastgates.bench.JaxWorker`)
that the runner starts restricted to K CPUs, as ``taskset -c`` would: the
pools get K threads, and the process uses at most K cores.

**Protocol.**  The worker reads pickled requests on stdin and writes pickled
replies on the stdout it was started with (anything else that writes to
stdout, such as JAX's warnings, is sent to stderr); it ends at end of input,
so it cannot outlive the runner.  Timing happens inside the worker; the
runner pauses before each request as before its own timed runs, so it
alternates the worker's runs with its own sides as with a side in its own
process.
"""

import os
import pickle
import sys
import time
import traceback

import numpy as np

def make_forward(cell, layers, bidirectional):
    """``forward(params, x, state) -> y`` of a stacked LSTM/GRU, for ``jax.jit``.

    ``params`` is keyed as PyTorch's ``state_dict()``; ``state`` is ``h0``
    (GRU) or ``(h0, c0)`` (LSTM), each ``(L*D, B, H)``; ``y`` is
    ``(T, B, D*H)``.
    """
    import jax
    import jax.numpy as jnp

    suffixes = ["", "_reverse"] if bidirectional else [""]

    def direction(p, k, suffix, inp, h0, c0):
        W, R = p[f"weight_ih_l{k}{suffix}"], p[f"weight_hh_l{k}{suffix}"]
        b_ih, b_hh = p[f"bias_ih_l{k}{suffix}"], p[f"bias_hh_l{k}{suffix}"]
        H = R.shape[1]
        if cell == "lstm":
            # Both biases fold into the projection of all steps.
            xw = inp @ W.T + (b_ih + b_hh)

            def step(carry, xw_t):
                h, c = carry
                a = xw_t + h @ R.T
                i = jax.nn.sigmoid(a[:, :H])
                f = jax.nn.sigmoid(a[:, H:2 * H])
                g = jnp.tanh(a[:, 2 * H:3 * H])
                o = jax.nn.sigmoid(a[:, 3 * H:])
                c = f * c + i * g
                h = o * jnp.tanh(c)
                return (h, c), h
            carry = (h0, c0)
        else:
            # b_hr and b_hz fold into the projection; b_hn is scaled by r.
            xw = inp @ W.T + (b_ih + b_hh.at[2 * H:].set(0))
            b_hn = b_hh[2 * H:]

            def step(h, xw_t):
                hw = h @ R.T
                r = jax.nn.sigmoid(xw_t[:, :H] + hw[:, :H])
                z = jax.nn.sigmoid(xw_t[:, H:2 * H] + hw[:, H:2 * H])
                n = jnp.tanh(xw_t[:, 2 * H:] + r * (hw[:, 2 * H:] + b_hn))
                h = (1 - z) * n + z * h
                return h, h
            carry = h0
        _, out = jax.lax.scan(step, carry, xw, reverse=suffix == "_reverse")
        return out

    def forward(p, x, state):
        h0, c0 = state if cell == "lstm" else (state, None)
        inp = x
        for k in range(layers):
            outs = []
            for j, suffix in enumerate(suffixes):
                s = k * len(suffixes) + j
                outs.append(direction(p, k, suffix, inp, h0[s],
                                      None if c0 is None else c0[s]))
            inp = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        return inp

    return forward


def make_gradients(cell, layers, bidirectional):
    """``grads(params, x, state, dy) -> (d params, dx, d state)`` of ``sum(y * dy)``, for ``jax.jit``."""
    import jax
    import jax.numpy as jnp

    forward = make_forward(cell, layers, bidirectional)

    def loss(p, x, state, dy):
        return jnp.sum(forward(p, x, state) * dy)

    return jax.grad(loss, argnums=(0, 1, 2))


class Case:
    """One benchmark case in the worker: its jitted function and its arguments.

    ``spec``: dict with cell, mode ("infer" or "train"), layers and
    bidirectional, and NumPy arrays: ``params`` (keyed as ``state_dict()``),
    x, state (h0 or (h0, c0)) and, for training, dy and ``params_next``, a
    second set of weights: between two timed training steps the weights are
    swapped for the other set (:meth:`between`), as the runner does on its
    sides.
    """

    def __init__(self, spec):
        import jax
        import jax.numpy as jnp

        self.jax = jax
        cell, layers, bi = spec["cell"], spec["layers"], spec["bidirectional"]
        dev = jax.tree_util.tree_map(jnp.asarray, {
            "params": [spec["params"], spec.get("params_next")],
            "x": spec["x"], "state": spec["state"], "dy": spec.get("dy")})
        self.x, self.state, self.dy = dev["x"], dev["state"], dev["dy"]
        self.params, self.next_params = dev["params"]
        self.train = spec["mode"] == "train"
        if self.train:
            self.fn = jax.jit(make_gradients(cell, layers, bi))
        else:
            self.fn = jax.jit(make_forward(cell, layers, bi))

    def call(self):
        """One timed call; its result is complete when it returns."""
        if self.train:
            return self.jax.block_until_ready(
                self.fn(self.params, self.x, self.state, self.dy))
        return self.jax.block_until_ready(self.fn(self.params, self.x, self.state))

    def between(self):
        """Before each timed training step, untimed: the other set of weights."""
        self.params, self.next_params = self.next_params, self.params

    def answer(self):
        """The first call's result as NumPy: y, or the gradients (first set of weights).

        Training: a dict with dx, dh0 (and dc0) and one gradient per parameter.
        """
        out = self.call()
        if not self.train:
            return np.asarray(out)
        gp, gx, gs = out
        grads = {name: np.asarray(g) for name, g in gp.items()}
        grads["dx"] = np.asarray(gx)
        states = gs if isinstance(gs, (tuple, list)) else (gs,)
        for name, g in zip(("dh0", "dc0"), states):
            grads[name] = np.asarray(g)
        return grads


def timed_calls(call, calls, between=None):
    """``calls`` calls of ``call``, each timed: (seconds of each, wall seconds, CPU seconds).

    ``between``, if given, runs before each call, untimed: wall and CPU
    seconds then add up the calls alone.  The runner times its own sides
    with this function too.
    """
    times = []
    if between is None:
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(calls):
            s = time.perf_counter()
            call()
            times.append(time.perf_counter() - s)
        return times, time.perf_counter() - t0, time.process_time() - c0
    cpu = 0.0
    for _ in range(calls):
        between()
        c = time.process_time()
        s = time.perf_counter()
        call()
        times.append(time.perf_counter() - s)
        cpu += time.process_time() - c
    return times, sum(times), cpu


def serve(requests, replies):
    """Answer the runner's requests until end of input (see the module's doc)."""
    import jax

    jax.config.update("jax_enable_x64", True)      # float64 cases; float32 stays float32
    case = None
    idle_from = (time.perf_counter(), time.process_time())

    def reply(obj):
        pickle.dump(obj, replies)
        replies.flush()

    reply(("ok", jax.__version__))
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        # CPU this process used while it waited: its pools spinning into the
        # runner's timed runs would show here.
        idle = (time.perf_counter() - idle_from[0], time.process_time() - idle_from[1])
        kind, arg = request
        try:
            if kind == "setup":
                case = None
                t0 = time.perf_counter()
                case = Case(arg)
                out = ("ok", (case.answer(), time.perf_counter() - t0))
            elif kind == "warmup":
                times, _, _ = timed_calls(case.call, arg, case.between if case.train else None)
                out = ("ok", times[-1])
            elif kind == "run":
                between = case.between if case.train else None
                out = ("ok", (*timed_calls(case.call, arg, between), idle))
            else:
                out = ("error", f"unknown request {kind!r}")
        except Exception:  # the runner reports it with the case that failed
            out = ("error", traceback.format_exc())
        reply(out)
        idle_from = (time.perf_counter(), time.process_time())


def main():
    # The replies go to the stdout the runner reads; everything else that
    # prints (JAX's warnings, a library's banner) goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
