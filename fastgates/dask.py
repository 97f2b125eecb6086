"""Scoring and training on Dask: :func:`predict` and :func:`objective`.

Dask (``dask.array`` and ``dask.distributed``) runs the same code on a
laptop's cores, an HPC cluster (``dask-jobqueue``) or a cloud; fastgates adds
two functions on top of it and nothing of its own (no sockets, no process
pools).  Install the extra: ``pip install "fastgates[dask]"``.

- :func:`predict` applies a model to a ``dask.array`` of sequences chunked
  along the batch axis, lazily: a dask array whose blocks, computed, are the
  same bits as the in-memory call on the whole batch.
- :func:`objective` is :func:`fastgates.scipy_objective` over a chunked data
  set: each chunk's loss and gradient computed on a worker, summed in a
  fixed tree, so that the result is the same bits whatever the number of
  workers and whichever chunk finishes first.

How the work is sent
--------------------
The model travels in its saved form (:func:`fastgates.save`: configuration
and parameters, no pickle), once per worker: it is one key of the graph that
every task depends on (:func:`predict`), or scattered to every worker when the
objective is made (:func:`objective`, with a ``distributed`` client).  A
worker loads it once per thread and keeps it.  An evaluation of the
objective sends the parameter vector ``v`` once per worker the same way.

Threads
-------
Dask runs one task per thread it gives a worker (``nthreads``); each task's
kernels run on one thread and NumPy's BLAS on one (Dask's nanny already
starts workers with ``OMP_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``): a
worker with 4 threads running 4 tasks runs 4 kernel threads, not 16.  The
cores are used through the chunks, so give the cluster at least as many
chunks as threads.

Bits
----
A row of a batch gets the same bits in any slice of the batch: the
products are fastgates' own register tiles, each row its own sum, and the
one plan that depends on the batch size (the time blocks of minGRU's and
minLSTM's scan) is made for the whole batch in every task.  The tasks use
the client's activation mode (:func:`fastgates.set_activation_mode`): the
one in force when :func:`predict` is called, or when an evaluation of the
objective starts.  Gradients are sums over rows, so a chunk's sum and the tree
over the chunks are another order than one call on the whole batch:
:func:`objective` equals :func:`fastgates.scipy_objective` to rounding
(float64: ``1e-12`` relative), and itself bit for bit however it is run.
Weight gradients also depend on the size of Numba's pool
(``NUMBA_NUM_THREADS``, by default the machine's cores): give workers on
machines of different sizes the same value.
"""

import dataclasses
import hashlib
import io
import math
import threading

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:      # pragma: no cover (the test extra installs dask)
    raise ImportError("fastgates.dask needs dask.array and distributed: "
                      'pip install "fastgates[dask]"') from exc

from . import _config
from . import _validate as check
from .io import load, save
from .layers import _Recurrent, flatten_params
from .training import _LOSSES, Readout, _runner

__all__ = ["predict", "objective"]


# --------------------------------------------------------------------------
# What a task receives
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Model:
    """A model in its saved form (bytes) and their SHA-256, the key of the workers' copies."""

    token: str
    payload: bytes

    @classmethod
    def of(cls, model):
        buf = io.BytesIO()
        save(model, buf)
        payload = buf.getvalue()
        return cls(hashlib.sha256(payload).hexdigest(), payload)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The client's settings a task runs with: activation mode, whole batch, layout."""

    mode: str
    batch: int
    nstates: int            # parts of the initial state given (0: None)
    state_tuple: bool       # the state is a tuple (LSTM's (h, c)), not one array


@dataclasses.dataclass(frozen=True, eq=False)
class _Params:
    """A parameter vector of :func:`objective` and its token (a worker's copy skips a repeat)."""

    token: str
    v: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class _Loss:
    """The loss of :func:`objective`: a built-in's name or the user's callable."""

    loss: object

    def function(self):
        return _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss


# Each worker thread keeps the models it has loaded: one copy per thread, and
# for an objective another one, whose parameters it sets before each chunk.
_models = threading.local()
_KEEP = 4
# Loads of each model in this process, by token (what the tests count).
_loads = {}
_loads_lock = threading.Lock()


def _worker_model(ref, trained=False):
    """This thread's copy of the model ``ref`` (a :class:`_Model`), loaded once.

    ``[model, token of its parameters]``; ``trained``: the copy whose
    parameters :func:`objective` sets (never the one :func:`predict` scores
    with, which keeps the saved parameters).
    """
    cache = getattr(_models, "cache", None)
    if cache is None:
        cache = _models.cache = {}
    key = (ref.token, trained)
    entry = cache.get(key)
    if entry is None:
        if len(cache) >= _KEEP:
            cache.pop(next(iter(cache)))
        entry = cache[key] = [load(io.BytesIO(ref.payload)), None]
        with _loads_lock:
            _loads[ref.token] = _loads.get(ref.token, 0) + 1
    return entry


def _state_arg(parts, settings):
    if settings.nstates == 0:
        return None
    return tuple(parts) if settings.state_tuple else parts[0]


def _score(ref, settings, x, lengths, *state):
    """One block of :func:`predict`."""
    model = _worker_model(ref)[0]
    with _config.task_settings(threads=1, mode=settings.mode, batch=settings.batch):
        out = model(x, _state_arg(state, settings), lengths)
    return out if isinstance(model, Readout) else out[0]


def _gradient(ref, settings, params, loss, checkpoint, weight, x, target, lengths, *state):
    """One chunk's ``weight * loss`` and ``weight * gradient`` (float64) of :func:`objective`."""
    entry = _worker_model(ref, trained=True)
    model = entry[0]
    if entry[1] != params.token:
        model.set_flat_params(params.v)
        entry[1] = params.token
    loss_fn = loss.function()
    state = _state_arg(state, settings)
    with _config.task_settings(threads=1, mode=settings.mode, batch=settings.batch):
        # what fg.scipy_objective runs, on this chunk
        pred, pullback = _runner(model, x, state, lengths, checkpoint)()
        value, dpred = loss_fn(pred, target)
        grad = flatten_params(model, pullback(dpred)).astype(np.float64)
    return float(value) * weight, grad * weight


def _add(a, b):
    return a[0] + b[0], a[1] + b[1]


# --------------------------------------------------------------------------
# Checks on the client
# --------------------------------------------------------------------------


def _rnn(model, name="model"):
    if isinstance(model, Readout):
        return model.rnn
    if isinstance(model, _Recurrent):
        return model
    raise TypeError(f"{name} must be a fastgates recurrent layer (LSTM, GRU, JANET, MGU, SLSTM, "
                    f"MinGRU, MinLSTM) or a Readout, got {type(model).__name__}")


def _dask_array(value, name):
    if not isinstance(value, da.Array):
        raise TypeError(f"{name} must be a dask array chunked along the batch axis "
                        f"(dask.array.from_array(a, chunks=...)), got {type(value).__name__}")
    if any(math.isnan(c) for chunks in value.chunks for c in chunks):
        raise ValueError(f"{name} has chunks of unknown size; call {name}.compute_chunk_sizes() first")
    return value


def _one_chunk(arr, name, keep, what):
    """Refuse chunks along any axis but ``keep``, saying how to rechunk."""
    split = [axis for axis in range(arr.ndim) if axis != keep and len(arr.chunks[axis]) > 1]
    if split:
        spec = ", ".join(f"{axis}: -1" for axis in split)
        raise ValueError(f"{name} must be chunked along its batch axis ({keep}) only, got "
                         f"{len(arr.chunks[split[0]])} chunks along axis {split[0]} ({what}); "
                         f"rechunk it: {name}.rechunk({{{spec}}})")


class _Data:
    """The inputs of :func:`predict`/:func:`objective`, checked, as dask arrays in x's chunks."""

    def __init__(self, model, x, state, lengths):
        rnn = _rnn(model)
        x = _dask_array(x, "x")
        if x.ndim != 3:
            raise ValueError(f"x must be a batch of sequences, 3-D ({'(B, T, I)' if rnn.batch_first else '(T, B, I)'}), "
                             f"got {x.ndim}-D; one sequence is a batch of one: x[:, None]")
        self.baxis = 0 if rnn.batch_first else 1
        self.taxis = 1 - self.baxis
        _one_chunk(x, "x", self.baxis, "time" if len(x.chunks[self.taxis]) > 1 else "features")
        T, B = x.shape[self.taxis], x.shape[self.baxis]
        # Everything but the size of the batch is checked by the model's own
        # checks on an empty stand-in of one sequence (the same messages).
        proxy_shape = (1, T, x.shape[2]) if rnn.batch_first else (T, 1, x.shape[2])
        check.sequence(np.zeros(proxy_shape, dtype=x.dtype), rnn.input_size, rnn.dtype, rnn.batch_first)
        if B == 0:
            raise ValueError("x must hold at least one sequence, got a batch of 0")
        if 0 in x.chunks[self.baxis]:
            raise ValueError(f"x has empty chunks along its batch axis ({self.baxis}): "
                             f"{x.chunks[self.baxis]}; rechunk it, e.g. "
                             f"x.rechunk({{{self.baxis}: {max(x.chunks[self.baxis])}}})")
        self.T, self.B = T, B
        self.x = x
        self.local = set()          # the arrays given in this process's memory (NumPy)
        self.chunks = x.chunks[self.baxis]
        self.lengths = None if lengths is None else self._lengths(lengths)
        self.state, self.state_tuple = self._state(rnn, state)

    def rows(self, arr, axis, name):
        """``arr`` (NumPy or dask) as a dask array in x's batch chunks along ``axis``."""
        if not isinstance(arr, da.Array):
            arr = da.from_array(np.asarray(arr), chunks=-1)
            self.local.add(name)
        elif any(math.isnan(c) for chunks in arr.chunks for c in chunks):
            raise ValueError(f"{name} has chunks of unknown size; call compute_chunk_sizes() first")
        if arr.ndim <= axis or arr.shape[axis] != self.B:
            raise ValueError(f"{name} must have x's batch of {self.B} along axis {axis}, got shape {arr.shape}")
        chunks = tuple(self.chunks if a == axis else (n,) for a, n in enumerate(arr.shape))
        return arr.rechunk(chunks)

    def _lengths(self, lengths):
        if isinstance(lengths, da.Array):
            if lengths.dtype.kind not in "iu":
                raise TypeError(f"lengths must be an array of integers, got dtype {lengths.dtype}")
            if lengths.shape != (self.B,):
                raise ValueError(f"lengths must have shape (B,) = ({self.B},), one per sequence, "
                                 f"got {lengths.shape}")
            # the values are checked by the model in each task
        else:
            lengths = check.lengths_array(lengths, self.B, self.T, True)
        return self.rows(lengths, 0, "lengths")

    def _state(self, rnn, state):
        if state is None:
            return [], False
        is_tuple = isinstance(state, (tuple, list))
        parts = list(state) if is_tuple else [state]
        stand_ins = []
        for k, part in enumerate(parts):
            name = f"state[{k}]" if is_tuple else "state"
            shape = getattr(part, "shape", None)
            if shape is None:
                part = parts[k] = np.asarray(part)
                shape = part.shape
            if len(shape) != 3 or shape[1] != self.B:
                raise ValueError(f"{name} must be (L*D, B, H) with x's batch B = {self.B}, got shape {tuple(shape)}")
            stand_ins.append(np.zeros((shape[0], 1, shape[2]), dtype=part.dtype))
        num = rnn.num_layers * rnn.num_directions
        check.state_tuple(tuple(stand_ins) if is_tuple else stand_ins[0], rnn._spec, num, 1,
                          rnn._widths(), True, rnn.dtype)
        return [self.rows(part, 1, "state") for part in parts], is_tuple

    def settings(self):
        return _Settings(_config.get_activation_mode(), self.B, len(self.state), self.state_tuple)

    def block_keys(self, i):
        """The keys of x, lengths and the state parts of batch chunk ``i``."""
        xi = (self.x.name, 0, i, 0) if self.baxis == 1 else (self.x.name, i, 0, 0)
        li = None if self.lengths is None else (self.lengths.name, i)
        return xi, li, [(s.name, 0, i, 0) for s in self.state]

    def collections(self):
        return [self.x] + ([] if self.lengths is None else [self.lengths]) + self.state


def _output_layout(model, data):
    """Shape and chunks of the prediction, and the key index of batch chunk ``i``."""
    rnn = _rnn(model)
    if isinstance(model, Readout):
        width = model.head.out_features
        if model.mode == "last":
            return (data.B, width), (data.chunks, (width,)), lambda i: (i, 0)
    else:
        width = rnn.num_directions * rnn._widths()[0]
    if rnn.batch_first:
        return ((data.B, data.T, width), (data.chunks, (data.T,), (width,)), lambda i: (i, 0, 0))
    return ((data.T, data.B, width), ((data.T,), data.chunks, (width,)), lambda i: (0, i, 0))


# --------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------


def predict(model, x, *, state=None, lengths=None):
    """Apply ``model`` to a dask array of sequences chunked along the batch axis, lazily.

    Parameters
    ----------
    model : LSTM, GRU, JANET, MGU, SLSTM, MinGRU, MinLSTM or Readout
        Any options (stacked, bidirectional, ``batch_first``, ...).  It is
        copied (saved) now: changing it afterwards does not change the result.
    x : dask.array.Array
        ``(T, B, I)`` (``(B, T, I)`` when ``batch_first``), chunked along
        the batch axis only (one chunk along time and features).
    state : array or tuple of arrays, optional
        The initial state as the model takes it, ``(L*D, B, H)`` each
        (NumPy or dask; rechunked to ``x``'s batch chunks).  ``None``: zeros.
    lengths : array of int, optional
        ``(B,)``, NumPy or dask (rechunked to ``x``'s batch chunks).

    Returns
    -------
    dask.array.Array
        The output sequence ``y`` of a recurrent layer, the prediction of a
        :class:`~fastgates.Readout` (``(B, O)`` for ``mode="last"``), in the
        model's dtype, chunked as ``x`` along the batch.  Computed, it is the
        same bits as the in-memory call ``model(x, state, lengths)`` (``[0]``
        of it for a layer) on the whole batch, with any scheduler.

    Raises
    ------
    TypeError, ValueError
        For a model, ``x``, ``state`` or ``lengths`` the model would refuse
        (shapes, dtypes, ``lengths`` outside ``[1, T]`` when given as NumPy),
        and for chunks along time or features (the message says how to
        rechunk), before anything is computed.  Values (NaN in ``x``, dask
        ``lengths`` out of range) are checked in the tasks: ``compute``
        raises the model's ``ValueError``.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastgates as fg, fastgates.dask
    >>> m = fg.GRU(3, 8, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((20, 100, 3)).astype(np.float32)
    >>> y = fastgates.dask.predict(m, da.from_array(x, chunks=(20, 25, 3)))
    >>> y.numblocks
    (1, 4, 1)
    >>> np.array_equal(y.compute(scheduler="sync"), m(x)[0])
    True
    """
    _rnn(model)
    data = _Data(model, x, state, lengths)
    ref = _Model.of(model)
    settings = data.settings()
    shape, chunks, out_index = _output_layout(model, data)
    name = "fastgates-predict-" + dask.base.tokenize(ref.token, settings, *data.collections())
    model_key = "fastgates-model-" + ref.token
    layer = {model_key: ref}
    for i in range(len(data.chunks)):
        xi, li, si = data.block_keys(i)
        layer[(name,) + out_index(i)] = (_score, model_key, settings, xi, li, *si)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=data.collections())
    return da.Array(graph, name, chunks, dtype=model.dtype,
                    meta=np.empty((0,) * len(shape), dtype=model.dtype))


# --------------------------------------------------------------------------
# objective
# --------------------------------------------------------------------------


def _client():
    """The ``distributed`` client that ``dask.compute`` would use now, or None."""
    try:
        from distributed import default_client
        client = default_client()
    except (ImportError, ValueError):
        return None
    # dask.config.set(scheduler="sync") (or "threads") sets the client aside
    return client if dask.base.get_scheduler() == client.get else None


def objective(model, loss, x, target, *, state=None, lengths=None, checkpoint=None):
    """:func:`fastgates.scipy_objective` over a chunked data set, computed on Dask's workers.

    ::

        fun = fastgates.dask.objective(model, "mse", x, target)
        res = scipy.optimize.minimize(fun, model.get_flat_params(), jac=True,
                                      method="L-BFGS-B")

    Parameters
    ----------
    model : LSTM, GRU, JANET, MGU, SLSTM, MinGRU, MinLSTM or Readout
        Without dropout (its masks would make every evaluation another
        function).  Saved now and sent to the workers once.
    loss : {"mse", "cross_entropy"} or callable
        As for :func:`fastgates.scipy_objective`.  A callable runs on the
        workers (Dask pickles it) and must be a **mean over the batch axis**,
        as both built-in losses are: the data set's loss is the mean of the
        chunks' losses weighted by their number of sequences.
    x : dask.array.Array
        The inputs, chunked along the batch axis only (as for :func:`predict`).
    target : array_like or dask.array.Array
        Shaped as the loss wants it for the whole data set; its batch axis
        (axis 0 for a ``Readout`` with ``mode="last"``, else ``x``'s) is cut
        into ``x``'s chunks.
    state, lengths : optional
        As for :func:`predict`.
    checkpoint : int, optional
        Gradient checkpointing in each task, as for the rnn's ``vjp``.

    Returns
    -------
    fun : callable
        ``fun(v, chunks=None) -> (loss_value, grad)``: ``v`` laid out as
        ``model.get_flat_params()``, ``loss_value`` a float, ``grad`` a
        float64 vector.  ``chunks`` (an iterable of chunk indices) evaluates
        those chunks only (a mini-batch, for :class:`fastgates.Adam`); the
        loss is then their mean.  ``fun.nchunks`` is the number of chunks
        and ``fun.rows`` the sequences in each.

    Notes
    -----
    Each evaluation builds a graph of one task per chunk and a binary tree
    of additions over the chunks in index order, and computes it with the
    current ``distributed`` client (``distributed.Client()``), or with
    Dask's default scheduler when there is none.  The result is the same
    bits for any number of workers, any order of completion, and after a
    worker dies and Dask runs its tasks again.  It equals
    :func:`fastgates.scipy_objective` on the in-memory arrays to rounding.
    ``x`` and ``target`` are read again at every evaluation: persist them
    (``x = x.persist()``) when they fit in the cluster's memory.

    As :func:`fastgates.scipy_objective`, ``fun(v)`` sets the model's
    parameters to ``v``.
    """
    rnn = _rnn(model)
    if rnn.dropout:
        raise ValueError("model has dropout; fastgates.dask.objective needs a deterministic "
                         "objective (masks drawn per chunk would differ from run to run): "
                         "build the model with dropout=0.0")
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"loss must be 'mse', 'cross_entropy' or a callable, got {loss!r}")
    elif not callable(loss):
        raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable, got {type(loss).__name__}")
    if checkpoint is not None:
        checkpoint = check.positive_int(checkpoint, "checkpoint")
    data = _Data(model, x, state, lengths)
    shape, _, _ = _output_layout(model, data)
    baxis = 0 if isinstance(model, Readout) and model.mode == "last" else data.baxis
    if isinstance(target, da.Array):
        _dask_array(target, "target")
    elif getattr(target, "shape", None) is None:
        target = np.asarray(target)
    if target.ndim <= baxis or target.shape[baxis] != data.B:
        raise ValueError(f"target must have the prediction's batch of {data.B} along axis {baxis} "
                         f"(the prediction is {shape}), got shape {target.shape}")
    if isinstance(loss, str):
        want = shape if loss == "mse" else shape[:-1]
        if target.shape != want:
            raise ValueError(f"target must have shape {want} for loss {loss!r} (the prediction is "
                             f"{shape}), got {target.shape}")
        if loss == "cross_entropy" and target.dtype.kind not in "iu":
            raise TypeError(f"target must hold integer class indices for 'cross_entropy', "
                            f"got dtype {target.dtype}")
    target = data.rows(target, baxis, "target")
    return _Objective(model, loss, data, target, baxis, checkpoint)


class _Objective:
    """``fun(v, chunks=None) -> (loss, grad)`` of :func:`objective`."""

    def __init__(self, model, loss, data, target, baxis, checkpoint):
        self.model = model
        self.data = data
        self.target = target
        self.tbaxis = baxis
        self.checkpoint = checkpoint
        self.rows = tuple(int(n) for n in data.chunks)
        self.nchunks = len(self.rows)
        self.size = model.get_flat_params().size
        ref = _Model.of(model)
        self.token = ref.token
        client = _client()
        # scattered once to every worker; without a client the model is a
        # key of each graph (kept in this process)
        self.ref = client.scatter(ref, broadcast=True, hash=False) if client is not None else ref
        if client is not None:
            # what came as NumPy goes to the workers once, not with every evaluation
            if "target" in data.local:
                self.target = client.persist(self.target)
            if "lengths" in data.local:
                data.lengths = client.persist(data.lengths)
            if "state" in data.local:
                data.state = [client.persist(s) for s in data.state]
        self.loss = loss

    def _chunks(self, chunks):
        if chunks is None:
            return list(range(self.nchunks))
        try:
            picked = sorted({int(c) for c in chunks})
        except (TypeError, ValueError):
            raise TypeError(f"chunks must be an iterable of chunk indices, got {chunks!r}") from None
        if not picked or picked[0] < 0 or picked[-1] >= self.nchunks:
            raise ValueError(f"chunks must name at least one chunk, each in [0, {self.nchunks}), "
                             f"got {chunks!r}")
        return picked

    def __call__(self, v, chunks=None):
        picked = self._chunks(chunks)
        settings = self.data.settings()         # the activation mode in force now
        self.model.set_flat_params(v)
        v = self.model.get_flat_params()
        token = dask.base.tokenize(v)
        name = "fastgates-objective-" + dask.base.tokenize(self.token, token, settings,
                                                            self.loss, picked, self.checkpoint,
                                                            *self.data.collections(), self.target)
        params_key = "fastgates-params-" + token
        layer = {params_key: _Params(token, v)}
        if isinstance(self.ref, _Model):
            model_key = "fastgates-model-" + self.ref.token
            layer[model_key] = self.ref
        else:
            model_key = self.ref
        loss_key = "fastgates-loss-" + dask.base.tokenize(self.loss)
        layer[loss_key] = _Loss(self.loss)
        total = sum(self.rows[i] for i in picked)
        level = []
        for i in picked:
            xi, li, si = self.data.block_keys(i)
            ti = (self.target.name,) + tuple(i if a == self.tbaxis else 0
                                             for a in range(self.target.ndim))
            key = (name, "chunk", i)
            layer[key] = (_gradient, model_key, settings, params_key, loss_key,
                          self.checkpoint, self.rows[i] / total, xi, ti, li, *si)
            level.append(key)
        depth = 0
        while len(level) > 1:
            depth += 1
            nxt = []
            for j in range(0, len(level) - 1, 2):
                key = (name, "sum", depth, j // 2)
                layer[key] = (_add, level[j], level[j + 1])
                nxt.append(key)
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        graph = HighLevelGraph.from_collections(name, layer,
                                                dependencies=self.data.collections() + [self.target])
        value, grad = dask.compute(Delayed(level[0], graph, layer=name))[0]
        if grad.shape != (self.size,):      # pragma: no cover (a bug, not bad input)
            raise RuntimeError(f"gradient of {grad.shape[0]} values for {self.size} parameters")
        return float(value), grad

    def __repr__(self):
        return f"<fastgates.dask objective of {self.model!r} over {self.nchunks} chunks>"
