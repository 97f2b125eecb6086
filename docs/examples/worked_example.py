"""The worked example of the design note (T = 5), step by step with fastgates.

An LSTM with ``input_size=3``, ``hidden_size=4``, float64, seed 0, reads a
sequence of 5 steps from ``h_0 = c_0 = 0``.  This script takes it one step at
a time with an ``LSTMCell`` holding the layer's weights, writes each gate out
from the equations of docs/equations.md, and prints the numbers that
``python -m fastgates`` prints (same model, same input, same seed):

1. every gate at every step, and ``c_1 = i_1 * g_1`` exactly;
2. what the forget gate means: with ``i ~ 0`` and a constant ``f``, the cell
   keeps the fraction ``f`` of its value at each step (``f = 0.2``: 80% is
   forgotten per step, ``0.2**5 = 0.00032`` is left after 5 steps);
3. the gradients of ``m.vjp`` against central finite differences.

Run it from anywhere once fastgates is installed (``pip install .``)::

    python docs/examples/worked_example.py          # seed 0
    python docs/examples/worked_example.py 3        # another seed
"""

import sys

import numpy as np

import fastgates as fg

T, I, H = 5, 3, 4
SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 0
FD_STEP = 1e-6        # central differences in float64: errors ~1e-9 relative
FD_BOUND = 1e-6


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def row(label, values, fmt="{:+.6f}"):
    return f"{label:<10}" + "".join(f"{fmt.format(v):>12}" for v in values)


def heading(text):
    print(f"\n{text}\n{'=' * len(text)}")


# The model and input of `python -m fastgates`.
lstm = fg.LSTM(I, H, dtype=np.float64, seed=SEED)
x = np.random.default_rng(SEED).uniform(-1.0, 1.0, size=(T, I))
params = lstm.state_dict()            # weight_ih_l0 (4H, I), weight_hh_l0 (4H, H), ...
W_ih, W_hh = params["weight_ih_l0"], params["weight_hh_l0"]
b = params["bias_ih_l0"] + params["bias_hh_l0"]   # only the sum matters for an LSTM

# An LSTMCell computes one step; it takes the layer's parameters without "_l0".
cell = fg.LSTMCell(I, H, dtype=np.float64)
cell.load_state_dict({name.removesuffix("_l0"): value for name, value in params.items()})

# --------------------------------------------------------------------------
heading(f"1. An LSTM (input_size={I}, hidden_size={H}, float64, seed {SEED}) reads "
        f"T={T} steps from h0 = c0 = 0")
print("x_t:")
for t in range(T):
    print(row(f"  t = {t + 1}", x[t]))

layer_gates = lstm.gates(x)           # the layer's own record: {"i", "f", "g", "o", "c"}, (1, T, H)
h, c = np.zeros(H), np.zeros(H)
worst = 0.0
for t in range(T):
    h_prev, c_prev = h, c
    # The equations, gate order i, f, g, o in blocks of H rows:
    a = W_ih @ x[t] + W_hh @ h_prev + b
    i, f, g, o = sigmoid(a[:H]), sigmoid(a[H:2 * H]), np.tanh(a[2 * H:3 * H]), sigmoid(a[3 * H:])
    # One step of fastgates:
    h, c = cell(x[t], (h_prev, c_prev))
    print(f"\nt = {t + 1}" + " " * 5 + "".join(f"{'unit ' + str(u):>12}" for u in range(H)))
    for name, value in (("i", i), ("f", f), ("g", g), ("o", o),
                        ("c", c), ("h", h)):
        print(row(name, value))
    worst = max(worst,
                np.max(np.abs(c - (f * c_prev + i * g))),     # c_t = f c_(t-1) + i g
                np.max(np.abs(h - o * np.tanh(c))),           # h_t = o tanh(c_t)
                *(np.max(np.abs(layer_gates[k][0, t] - v))    # the layer agrees
                  for k, v in (("i", i), ("f", f), ("g", g), ("o", o), ("c", c))))

y, (h_n, c_n) = lstm(x)
worst = max(worst, np.max(np.abs(y[-1] - h)), np.max(np.abs(c_n[0] - c)))
print(f"\nfastgates (cell step by step, and the whole layer) against the equations "
      f"in NumPy: max difference {worst:.1e}")
# With c_0 = 0 there is nothing to forget at the first step: c_1 = i_1 * g_1.
c1 = layer_gates["c"][0, 0]
i1_g1 = layer_gates["i"][0, 0] * layer_gates["g"][0, 0]
print(row("c_1", c1))
print(row("i_1 * g_1", i1_g1))
print(f"c_1 == i_1 * g_1 bit for bit: {'yes' if np.array_equal(c1, i1_g1) else 'no'}")

# --------------------------------------------------------------------------
heading("2. What the forget gate means: c keeps the fraction f of its previous value")
print("The i and f rows of both weight matrices set to 0, the i bias to -40 (i ~ 4e-18),")
print("the f bias to log(f / (1 - f)): f is that constant at every step.  c_0 = (1, -2, 0.5, 3).")
c0 = np.array([1.0, -2.0, 0.5, 3.0])
for f_const in (0.2, 0.8):
    p = {name: value.copy() for name, value in cell.state_dict().items()}
    p["weight_ih"][:2 * H] = 0.0
    p["weight_hh"][:2 * H] = 0.0
    p["bias_ih"][:H], p["bias_hh"][:H] = -40.0, 0.0
    p["bias_ih"][H:2 * H], p["bias_hh"][H:2 * H] = np.log(f_const / (1.0 - f_const)), 0.0
    forgetful = fg.LSTMCell(I, H, dtype=np.float64)
    forgetful.load_state_dict(p)
    print(f"\nf = {f_const}:")
    h, c = np.zeros(H), c0
    for t in range(T):
        c_prev = c
        h, c = forgetful(x[t], (h, c))
        print(row(f"  c_{t + 1}", c) + f"   c_t / c_(t-1) = {np.mean(c / c_prev):.12f}")
    print(f"  after {T} steps c_5 / c_0 = {f_const}^{T} = {f_const ** T:.5f}; "
          f"measured {np.mean(c / c0):.5f}")

# --------------------------------------------------------------------------
heading("3. Gradient check: pullback against central finite differences (float64)")
rng = np.random.default_rng(SEED + 1)
h0 = rng.uniform(-0.5, 0.5, size=(1, H))
c0 = rng.uniform(-0.5, 0.5, size=(1, H))
dy = rng.standard_normal((T, H))
dh, dc = rng.standard_normal((1, H)), rng.standard_normal((1, H))
print("L = sum(y * dy) + <h_n, dh> + <c_n, dc> for random dy, dh, dc and a random (h0, c0)")

(y, state), pullback = lstm.vjp(x, (h0, c0))
dx, (dh0, dc0), dparams = pullback(dy, (dh, dc))
analytic = {"x": dx, "h0": dh0, "c0": dc0, **dparams}
probe = fg.LSTM(I, H, dtype=np.float64)


def loss(inputs):
    probe.load_state_dict({k: inputs[k] for k in params})
    y, (h_n, c_n) = probe(inputs["x"], (inputs["h0"], inputs["c0"]))
    return np.sum(y * dy) + np.sum(h_n * dh) + np.sum(c_n * dc)


worst = 0.0
print(f"\n{'entry':<20}{'pullback':>19}{'finite difference':>19}{'rel. error':>12}")
for name, index in [("x", (0, 0)), ("x", (2, 1)), ("x", (4, 2)), ("h0", (0, 1)), ("c0", (0, 3)),
                    ("weight_ih_l0", (1, 0)), ("weight_ih_l0", (5, 2)),
                    ("weight_hh_l0", (9, 3)), ("weight_hh_l0", (14, 1)),
                    ("bias_ih_l0", (6,)), ("bias_hh_l0", (13,))]:
    sides = []
    for sign in (1.0, -1.0):
        inputs = {"x": x.copy(), "h0": h0.copy(), "c0": c0.copy(),
                  **{k: v.copy() for k, v in params.items()}}
        inputs[name][index] += sign * FD_STEP
        sides.append(loss(inputs))
    numeric = (sides[0] - sides[1]) / (2 * FD_STEP)
    exact = analytic[name][index]
    rel = abs(exact - numeric) / max(abs(exact), abs(numeric), 1e-8)
    worst = max(worst, rel)
    print(f"{name + str(list(index)):<20}{exact:>+19.10e}{numeric:>+19.10e}{rel:>12.1e}")
print(f"\nmax relative error {worst:.1e} (bound {FD_BOUND:g}): {'OK' if worst <= FD_BOUND else 'FAILED'}")
sys.exit(0 if worst <= FD_BOUND else 1)
