"""How kernels are compiled and how many threads they use: one place.

Every compiled function in fastgates is built through :func:`jit` so that the
Numba options (caching, fastmath flags, error model) are decided here and not
per function.

Threads
-------
Two thread pools can run fastgates' work: Numba's (the ``prange`` loops over
batch chunks) and the BLAS behind NumPy and SciPy (the backward pass's
products over time, called from compiled code; the products inside the
recurrences and the input projection are fastgates' own, see
:mod:`fastgates._linalg`).  Left alone
they oversubscribe the cores: a compiled kernel running on ``n`` Numba threads
that each call a multi-threaded BLAS would ask for ``n * n`` threads, and
OpenBLAS threads that busy-wait beside Numba's slow a kernel down by an order
of magnitude.  OpenBLAS threads keep spinning for a while after a
product, so even taking turns is not enough.  fastgates therefore makes every
matrix product from compiled code, with the BLAS that Numba calls (SciPy's)
limited to one thread (:func:`_claim_blas`, :func:`single_threaded_blas`),
and splits the work across Numba's threads only.
"""

import hashlib
import math
import operator
import os
import re
import sys
import threading
import time
import types

import numba
import numpy as np
from numba.core import caching as numba_caching
from numba.core import event as numba_event

__all__ = ["jit", "set_num_threads", "get_num_threads", "single_threaded_blas", "kernel_threads",
           "begin_call", "end_call", "call_threads", "set_activation_mode", "get_activation_mode",
           "fast_activations", "task_settings", "planned_batch"]

# Cached: a second process loads the machine code instead of compiling (the
# cache is keyed on every kernel source of the package, see _Cache below).
# ``error_model="numpy"``: division follows IEEE rules; without it every
# division carries a ZeroDivisionError branch, which alone stops LLVM from
# vectorising the activation loops.  No ``fastmath``: every flag it offers either
# changes NaN/inf semantics (nnan, ninf) or reassociates sums (reassoc), and
# the kernels must give the same answers as the reference to the last digits.
_JIT_OPTIONS = dict(nogil=True, error_model="numpy")

# ``parallel=True`` runs only the ``prange`` loops in parallel.  Numba would
# also turn every array expression of a parallel kernel (``np.zeros(n)``,
# ``a[:] = 0``, ``a.sum()``) into a parallel loop of its own: a fork and join
# per call for arrays of a few elements, a reduction whose bits would depend
# on the thread count, and a parallel function compiled for each (the first
# training step of an LSTM compiled 4 of them, 2 for its ``np.zeros``).
_PARALLEL = dict(prange=True, comprehension=False, reduction=False, inplace_binop=False,
                 setitem=False, numpy=False, stencil=False, fusion=False)


def jit(parallel=False, inline_in_twins=False, inline=False):
    """Decorator compiling a kernel with fastgates' one set of Numba options.

    With ``parallel``, a :class:`ParallelKernel`: the kernel and its
    one-thread twin.  With ``inline_in_twins``, the one-thread twins that
    call this function have its code put into theirs (Numba's
    ``inline="always"``) instead of linking it in as a function compiled
    on its own; the parallel forms still call it.  With ``inline``, every
    caller does (for a function that is not worth a level of its own, see
    docs/internals.md).
    """
    def decorate(func):
        if inline:
            return numba.njit(inline="always", **_JIT_OPTIONS)(func)
        serial = numba.njit(**_JIT_OPTIONS)(func)
        # what ``cache=True`` does (Dispatcher.enable_caching), with the
        # package's source stamp instead of the kernel's own file's
        serial._cache = _Cache(serial.py_func)
        if inline_in_twins:
            serial.inlined = numba.njit(inline="always", **_JIT_OPTIONS)(func)
        if not parallel:
            return serial
        dispatcher = numba.njit(parallel=_PARALLEL, **_JIT_OPTIONS)(func)
        dispatcher._cache = _ParallelCache(dispatcher.py_func)
        return ParallelKernel(dispatcher)

    return decorate


def _twin(func):
    """``func`` compiled without ``parallel``, its ``inline_in_twins`` callees inlined."""
    names = set(func.__code__.co_names)
    scope = dict(func.__globals__)
    for name in names:
        inlined = getattr(scope.get(name), "inlined", None)
        if inlined is not None:
            scope[name] = inlined
    twin = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__,
                              func.__closure__)
    for attr in ("__qualname__", "__module__", "__doc__"):
        setattr(twin, attr, getattr(func, attr))
    serial = numba.njit(**_JIT_OPTIONS)(twin)
    serial._cache = _Cache(serial.py_func)
    return serial


class ParallelKernel:
    """A parallel kernel and the same function compiled without ``parallel``.

    A call runs the twin when the calling thread's kernels are set to one
    thread (:func:`kernel_threads`: a call with one task, such as a batch of
    one sequence, or a busy machine, or one thread asked for): ``prange``
    is then ``range``, the same iterations in the same order, so the same
    bits, without the parallel region's start and join.  A process that
    only ever runs on one thread never compiles the parallel form, which
    costs the most to compile: Numba compiles the body of each parallel
    loop again as a function of its own and a wrapper around it, each
    re-optimising and generating the machine code of everything the body
    calls.  The twin is made at its first use (the module's functions are
    all defined by then; see :func:`_twin`).  Attributes are the parallel
    dispatcher's.
    """

    __slots__ = ("parallel", "_serial", "__wrapped__")

    def __init__(self, parallel):
        self.parallel = parallel
        self._serial = None
        self.__wrapped__ = parallel.py_func

    @property
    def serial(self):
        if self._serial is None:
            self._serial = _twin(self.parallel.py_func)
        return self._serial

    def __call__(self, *args):
        if getattr(_numba_threads, "n", 0) == 1:
            return self.serial(*args)
        return self.parallel(*args)

    def __getattr__(self, name):
        return getattr(self.parallel, name)

    def __repr__(self):
        return f"<fastgates parallel kernel {self.parallel.py_func.__qualname__}>"


# -- kernels compiled when they pay -------------------------------------------
#
# Some kernels are a faster form of work a cheaper one already does, and
# cost seconds more to compile: the LSTM's overlapped kernels for a batch
# of one sequence on two threads (the parallel loop's body compiled again
# twice, ~3 s forward and ~4.4 s backward on this machine's 2 cores) save
# up to a quarter of those calls' time (training 13-27%, inference 0-11%,
# docs/benchmarks.md).  Compiling them at a first call made a new user
# wait 9 + 10 s where the first call now takes 3.4 + 4.  A :class:`Tier` runs the
# faster kernel when it costs nothing to start (compiled in this process,
# or in the cache: ``python -m fastgates compile`` puts it there), and
# otherwise the cheaper work until that work has taken PAYS_AFTER seconds
# in the process, then compiles it: the rule of renting until the rent
# has cost what buying does, so a process never loses more than about
# twice what the better choice made in hindsight would have.  Both give the
# same bits (each kernel's docstring says why), so the switch changes
# nothing but the time.

# about the overlapped kernels' compile time (3-4.4 s each) over the share
# of a call's time they save
PAYS_AFTER = 30.0
_eager_tiers = False   # compile every tier at its first use (python -m fastgates compile)
_tier_spent = {}


def ready(disp, sig):
    """Whether the dispatcher ``disp`` runs argument types ``sig`` without compiling.

    True when it is compiled for them in this process, or when the cache
    holds it (it is then loaded, as a first call would).
    """
    if sig in disp.overloads:
        return True
    if not disp._cache.holds(sig, disp.targetctx):
        return False
    disp.compile(sig)
    return True


class Tier:
    """Whether calls run a kernel that is faster but costs more to compile (see above).

    One per kernel and *key*: whatever its caller knows fixes the kernel's
    argument types (the LSTM: dtype and variant), so that the types, which
    cost tens of microseconds to work out, are looked at only when the
    answer may have changed.  A key that does not fix them costs no more
    than a first call on new types does anyway: compiling, with the
    notice.  Call :meth:`use` with the kernel's arguments before each call
    that could run it (:meth:`maybe` first, where working the arguments
    out costs); when it says False, do the work another way and report the
    seconds that took with :meth:`spent`.  Get one with :func:`tier`.
    """

    __slots__ = ("kernel", "disp", "pays_after", "state", "seen")

    def __init__(self, kernel, pays_after=None):
        self.kernel = kernel
        self.pays_after = PAYS_AFTER if pays_after is None else pays_after
        # the form the calls run: a ParallelKernel's parallel one
        self.disp = kernel.parallel if isinstance(kernel, ParallelKernel) else kernel
        self.state = None       # True: ready; False: not; None: not checked yet
        self.seen = -1          # the kernel's compiled signatures when last checked

    def _pays(self):
        return _eager_tiers or _tier_spent.get(self.kernel, 0.0) >= self.pays_after

    def maybe(self):
        """False when :meth:`use` would surely say False (cheap: no types)."""
        return (self.state is not False or len(self.disp.overloads) != self.seen
                or self._pays())

    def use(self, *args):
        """True to run the kernel with ``args`` now."""
        if self.state:
            return True
        if not self.maybe():
            return False
        disp = self.disp
        n = len(disp.overloads)
        sig = tuple(disp.typeof_pyval(a) for a in args)
        if ready(disp, sig):
            self.state = True
        elif self._pays():
            # said when it takes longer than a first call's notice waits
            timer = threading.Timer(NOTICE_AFTER, _say, args=(TIER_NOTICE.format(
                what=disp.py_func.__qualname__, after=self.pays_after),))
            timer.daemon = True
            if not _eager_tiers:
                timer.start()
            try:
                disp.compile(sig)
            finally:
                timer.cancel()
            self.state = True
        else:
            self.state, self.seen = False, n
        return self.state

    def spent(self, seconds):
        """Count ``seconds`` of work the kernel would have done faster."""
        _tier_spent[self.kernel] = _tier_spent.get(self.kernel, 0.0) + seconds


_tiers = {}


def tier(kernel, key, pays_after=None):
    """The :class:`Tier` of ``kernel`` for callers with ``key``.

    ``pays_after``: seconds of the other way's work before the kernel is
    compiled (default :data:`PAYS_AFTER`): about its compile time over the
    fraction of that work it saves.
    """
    t = _tiers.get((kernel, key))
    if t is None:
        t = _tiers[kernel, key] = Tier(kernel, pays_after)
    return t


TIER_NOTICE = ("fastgates: compiling {what}, once: the calls it makes faster have run "
               "without it for {after:g} s. python -m fastgates compile compiles it ahead of "
               "time.\n")


def _say(text):
    sys.stderr.write(text)
    sys.stderr.flush()


# -- the kernel cache and its key ----------------------------------------------
#
# Numba stamps a cached kernel with the content of its own source file only:
# a kernel that calls a helper of another module (every kernel here calls
# _math's activations or _linalg's tiles) kept running the old machine code
# after the helper was edited, until someone deleted __pycache__.  fastgates'
# kernels are stamped instead with one SHA-256 of every source file of the
# package that compiled code can depend on: the modules that define
# compiled functions (``@jit``, ``@overload``, ``@intrinsic``) and every
# module of the package they import from (the constants a kernel reads are
# frozen into it at compile time).  An edit or an upgrade of any of them
# recompiles every kernel once; nothing stale ever runs.  Editing a module
# outside that set (bench.py, layers.py, ...) keeps the cache.  (Numba
# checks its own version in each cache index.)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_COMPILED = re.compile(rb"^\s*@(jit|overload|intrinsic|numba\.njit)\b", re.M)
_IMPORT = re.compile(rb"^\s*from\s+(\.+)([\w.]*)\s+import\s+([\w, ()\n]+)", re.M)
_stamp = None


def _package_sources():
    """Every ``.py`` file of the package: relative path -> bytes."""
    sources = {}
    for folder, _, files in os.walk(_PACKAGE_DIR):
        if os.path.basename(folder) == "__pycache__":
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    sources[os.path.relpath(path, _PACKAGE_DIR).replace(os.sep, "/")] = f.read()
    return sources


def _imported(rel, text, sources):
    """The package's modules that ``from . import`` statements of ``rel`` name."""
    here = rel.split("/")[:-1]
    out = set()
    for dots, module, names in _IMPORT.findall(text):
        base = here[:len(here) - (len(dots) - 1)] if len(dots) > 1 else here
        parts = base + (module.decode().split(".") if module else [])
        candidates = ["/".join(parts) + ".py"]
        if not module:      # from . import a, b: the modules a and b
            candidates = ["/".join(parts + [n.strip()]) + ".py"
                          for n in names.decode().replace("(", "").replace(")", "").split(",")]
        out.update(c for c in candidates if c in sources)
    return out


def _kernel_sources():
    """The package's source files that compiled code may depend on: (path, bytes), sorted."""
    sources = _package_sources()
    kernels = {rel for rel, text in sources.items() if _COMPILED.search(text)}
    needed = set(kernels)
    for rel in kernels:
        needed |= _imported(rel, sources[rel], sources)
    return sorted((rel, sources[rel]) for rel in needed)


def source_stamp():
    """The SHA-256 (hex) of every kernel source of the package: the key of the cache."""
    global _stamp
    if _stamp is None:
        digest = hashlib.sha256()
        for rel, text in _kernel_sources():
            digest.update(rel.encode() + b"\0")
            digest.update(hashlib.sha256(text).digest())
        _stamp = digest.hexdigest()
    return _stamp


class _PackageStamp:
    """Mixin of Numba's cache locators: the package's stamp, not the file's."""

    def get_source_stamp(self):
        return source_stamp()


class _UserDirLocator(_PackageStamp, numba_caching.UserProvidedCacheLocator):
    pass


class _InTreeLocator(_PackageStamp, numba_caching.InTreeCacheLocator):
    pass


class _UserWideLocator(_PackageStamp, numba_caching.UserWideCacheLocator):
    pass


class _CacheImpl(numba_caching.CompileResultCacheImpl):
    # NUMBA_CACHE_DIR first, then the package's __pycache__, then the user's
    # cache directory when the package's is not writable: Numba's order
    _locator_classes = [_UserDirLocator, _InTreeLocator, _UserWideLocator]


class _Cache(numba_caching.FunctionCache):
    """Numba's cache of compiled functions, with the package's stamp, saving under a lock.

    A function's cache index lists all its compiled signatures, and Numba
    adds one by reading the index, adding to it and writing it back: two
    processes that compile the same function at the same time (two dtypes
    in ``python -m fastgates compile``, Dask workers starting together)
    lost one of the two entries (measured: a precompiled LSTM compiled
    again at its first call).  The read-modify-write is made under an
    exclusive lock on a file of the cache directory.
    """

    _impl_class = _CacheImpl

    def save_overload(self, sig, data):
        with _cache_lock(self._cache_path):
            super().save_overload(sig, data)

    def holds(self, sig, target_context):
        """Whether the cache has machine code for ``sig`` (without loading it)."""
        if not self._enabled:
            return False
        key = self._index_key(sig, target_context.codegen())
        return key in self._cache_file._load_index()


class _ParallelCacheImpl(_CacheImpl):
    # the parallel form of a function has files of its own beside its
    # one-thread twin's (Numba keys an index by function, not by options)
    def get_filename_base(self, fullname, abiflags):
        return super().get_filename_base(fullname + "-parallel", abiflags)


class _ParallelCache(_Cache):
    _impl_class = _ParallelCacheImpl


class _cache_lock:
    """Context: an exclusive lock on ``<path>/fastgates.lock`` (no lock where ``fcntl`` is missing)."""

    __slots__ = ("path", "fd")

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl

            os.makedirs(self.path, exist_ok=True)
            self.fd = os.open(os.path.join(self.path, "fastgates.lock"), os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            # no locking (Windows) or a read-only cache directory: Numba's
            # own save then fails quietly, as it always did
            self._release()
        return self

    def _release(self):
        if self.fd is not None:
            os.close(self.fd)       # closing releases the lock
            self.fd = None

    def __exit__(self, *exc):
        self._release()
        return False


# -- a first call that compiles says so ----------------------------------------
#
# A kernel found in the cache loads in milliseconds; one that is not compiles
# for seconds (3-10 s for a cell's first forward call with an empty cache),
# which a user would otherwise take for a hang.  Numba reports each real
# compilation (never a load from the cache) as a "numba:compile" event; when
# the outermost compilation of a fastgates kernel is still running after
# NOTICE_AFTER seconds, one line goes to stderr, once per process.

def _notice_after():
    """Seconds of compilation before the notice (FASTGATES_COMPILE_NOTICE_AFTER, else 1)."""
    try:
        return max(0.0, float(os.environ.get("FASTGATES_COMPILE_NOTICE_AFTER", "1.0")))
    except ValueError:
        return 1.0


NOTICE_AFTER = _notice_after()
NOTICE = ("fastgates: compiling kernels for a first call ({what}): there is no cached machine "
          "code for it yet. With an empty cache a cell's first forward call takes about 3-10 s "
          "and its first training step up to as long again; later processes load the cache in "
          "well under a second. To compile ahead of time (container images, CI, Dask workers): "
          "python -m fastgates compile\n")


class _CompileNotice(numba_event.Listener):
    # also adds up the seconds of fastgates' compilations (see clock())
    def __init__(self):
        self.local = threading.local()
        self.said = False
        self.seconds = 0.0
        self.counting = threading.Lock()     # of its own: never held while compiling

    @staticmethod
    def _ours(event):
        func = getattr(event.data.get("dispatcher"), "py_func", None)
        return getattr(func, "__module__", "").startswith("fastgates")

    def on_start(self, event):
        if not self._ours(event):
            return
        depth = getattr(self.local, "depth", 0)
        self.local.depth = depth + 1
        if depth == 0:
            self.local.start = time.perf_counter()
            self.local.timer = None
            if not self.said:
                what = event.data["dispatcher"].py_func.__qualname__
                timer = self.local.timer = threading.Timer(NOTICE_AFTER, self.say, args=(what,))
                timer.daemon = True
                timer.start()

    def on_end(self, event):
        depth = getattr(self.local, "depth", 0)
        if depth == 0 or not self._ours(event):
            return
        self.local.depth = depth - 1
        if depth == 1:
            if self.local.timer is not None:
                self.local.timer.cancel()
            with self.counting:
                self.seconds += time.perf_counter() - self.local.start

    def say(self, what):
        with _lock:
            if self.said:
                return
            self.said = True
        sys.stderr.write(NOTICE.format(what=what))
        sys.stderr.flush()


_notice = _CompileNotice()
numba_event.register("numba:compile", _notice)


def clock():
    """Seconds, as ``time.perf_counter``, but stopped while fastgates compiles.

    For timing work that a first call may compile (the work a
    :class:`Tier` counts).
    """
    return time.perf_counter() - _notice.seconds


_lock = threading.Lock()
_num_threads = numba.config.NUMBA_NUM_THREADS
_adaptive = True
_controller = None


def set_num_threads(n, *, adaptive=True):
    """Set the number of threads the compiled kernels use.

    BLAS runs single-threaded inside them; the work is split across these
    threads.  Results do not depend on the number chosen: work is divided by
    problem size, never by thread count.

    Parameters
    ----------
    n : int
        Between 1 and the number of threads Numba was started with
        (``numba.config.NUMBA_NUM_THREADS``, by default the number of cores).
    adaptive : bool, default True
        ``n`` is then the most a call uses: a call takes fewer (one on a
        2-core machine) while other work keeps the cores busy, where waiting
        for a thread that cannot run would cost milliseconds (see
        ``docs/guarantees.md``, "Busy machines").  ``False``: every call
        takes ``n``, whatever else runs (for measurements of a fixed
        setting; the results are the same bits either way).
    """
    global _num_threads, _adaptive
    if isinstance(n, bool):
        raise TypeError("n must be an integer, got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__}") from None
    if not isinstance(adaptive, (bool, np.bool_)):
        raise TypeError(f"adaptive must be True or False, got {type(adaptive).__name__}")
    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= top:
        raise ValueError(f"n must be between 1 and {top} (NUMBA_NUM_THREADS), got {n}")
    _num_threads = n
    _adaptive = bool(adaptive)


def get_num_threads():
    """Return the number of threads the compiled kernels use."""
    return _num_threads


def _blas_libraries():
    """The BLAS libraries that Numba's ``np.dot`` may call, found once."""
    global _controller
    if _controller is not None:
        return _controller
    with _lock:
        if _controller is not None:     # another thread got here first
            return _controller
        # Imported here: the BLAS that Numba calls (SciPy's) is loaded on first
        # use, and threadpoolctl only sees the libraries already loaded.
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(user_api="blas").lib_controllers
        # Numba calls SciPy's BLAS; NumPy's own copy (pip wheels ship one
        # each) is never called while fastgates computes and is left alone.
        # Where SciPy's cannot be told apart, limit them all.
        scipy_dir = os.path.dirname(os.path.dirname(scipy.__file__))
        own = [lib for lib in libs if "scipy" in os.path.basename(os.path.dirname(lib.filepath))
               and os.path.dirname(lib.filepath).startswith(scipy_dir)]
        _claim_blas(own or libs)
        _controller = own or libs
    return _controller


def _set_blas(libs, counts):
    for lib, n in zip(libs, counts):
        if lib.get_num_threads() != n:
            lib.set_num_threads(n)
    return [lib.get_num_threads() for lib in libs]


def _claim_blas(libs):
    """Set SciPy's BLAS to one thread, once, from a short-lived thread.

    OpenBLAS 0.3.30 (SciPy's wheels) obeys ``openblas_set_num_threads`` only
    from one thread: the first that called it, for as long as that thread
    lives (measured; a call from any other thread does nothing).  Setting
    and restoring the count around each call, as fastgates did, therefore
    did nothing when a call came from another Python thread than the first
    caller (a ``ThreadPoolExecutor`` worker): the BLAS ran multi-threaded and
    float64 weight gradients differed in the last bits from a serial run.
    Handing every change to one dedicated thread would cost two thread
    switches per call (40-90 us measured, more than a small call itself).
    Instead a thread of fastgates' own sets SciPy's BLAS to one thread at the
    first call and ends: later calls, from any thread, find it
    single-threaded and change nothing.  SciPy's BLAS stays single-threaded
    in the process afterwards (NumPy's own BLAS, a separate library in the
    wheels, is not touched); a user who sets it again (``threadpoolctl``)
    gets the earlier behaviour, set to one thread around each call and
    restored, from the thread that set it.
    """
    worker = threading.Thread(target=_set_blas, args=(libs, [1] * len(libs)), name="fastgates-blas")
    worker.start()
    worker.join()


def _reset_after_fork():
    # A forked child starts with no fastgates call in flight.
    global _blas_users
    _blas_users = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


_blas_users = 0
_blas_saved = []


class single_threaded_blas:
    """Context: run the body with the BLAS that compiled code calls limited to one thread.

    SciPy's BLAS is set to one thread at the first call (see
    :func:`_claim_blas`), so this normally changes nothing.  If it has been
    set otherwise since, it is set to one thread here and the user's
    setting is restored when the last concurrent caller leaves.  (A class:
    about 0.5 us less per call than a generator-based context manager.)
    """

    __slots__ = ("libs",)

    def __enter__(self):
        global _blas_users, _blas_saved
        self.libs = libs = _blas_libraries()
        with _lock:
            if _blas_users == 0:
                _blas_saved = [lib.get_num_threads() for lib in libs]
                for lib, n in zip(libs, _blas_saved):
                    if n != 1:
                        lib.set_num_threads(1)
            _blas_users += 1
        return self

    def __exit__(self, *exc):
        global _blas_users
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                for lib, n in zip(self.libs, _blas_saved):
                    if n != 1:
                        lib.set_num_threads(n)
        return False


_numba_threads = threading.local()
_pool_started = False


def _start_pool():
    """Start Numba's thread pool, keeping other OpenMP runtimes' thread counts.

    Numba's OpenMP layer sets the thread count when its pool starts, and the
    call can land in another libgomp of the process (PyTorch ships one under
    the same soname): measured, ``torch.set_num_threads(1)`` followed by the
    first fastgates call left PyTorch running on 2 threads.  The counts every
    OpenMP runtime had before are put back.
    """
    global _pool_started
    from threadpoolctl import ThreadpoolController

    with _lock:
        if _pool_started:
            return
        omp = ThreadpoolController().select(user_api="openmp").lib_controllers
        saved = [(lib, lib.get_num_threads()) for lib in omp]
        numba.get_num_threads()            # starts the pool
        for lib, n in saved:
            if lib.get_num_threads() != n:
                lib.set_num_threads(n)
        _pool_started = True


def kernel_threads(tasks=None):
    """Point Numba at the current call's thread count for the calling thread.

    The count is the one :func:`begin_call` chose for the call (the user's
    :func:`set_num_threads` unless the cores are contended).  With ``tasks``
    given, use no more threads than there are tasks: a thread without work
    would still have to be woken and joined.
    """
    if not _pool_started:
        _start_pool()
    n = call_threads()
    if tasks is not None:
        n = max(1, min(n, tasks))
    # numba.set_num_threads is per calling thread and costs a few
    # microseconds; skip it when nothing changes.
    if getattr(_numba_threads, "n", None) != n:
        numba.set_num_threads(n)
        _numba_threads.n = n


# -- threads on a busy machine -------------------------------------------------
#
# A kernel on two threads is an OpenMP parallel region: the calling thread
# wakes a pool thread and, at the end, waits for it.  When other work keeps
# the cores busy (other processes, another thread pool of the process), the
# pool thread may not run for a whole scheduler time slice (3-4 ms here):
# measured with two busy processes on this 2-core machine, a region of 55 us
# a thread took 2-6 ms at the median and 8-10 ms at the 90th percentile, while
# the same work on one thread took 0.10 ms.  libgomp's pool threads spin for
# ~8 ms after each region (so that the next region starts in microseconds on
# an idle machine), and a spinning thread that the scheduler preempts is
# exactly the one the next region waits for.  No wait inside the region can
# fix that: the region's end waits for every thread of the team.
#
# So each call chooses its plan when it starts (begin_call): the user's
# thread count, or fewer (one on a 2-core machine: the same work, the same
# bits, nothing to wait for) while the cores are contended.  Two signals,
# both cheap:
#
# - reactive: a call on two threads or more that takes far longer than the
#   best time of the same call (end_call) means a partner did not run; a
#   second such call soon after (within COLLAPSE_CALLS calls on more than
#   one thread, or within COLLAPSE_WINDOW seconds) puts the following calls
#   on one thread for a while (a hold).  One alone does not: on a virtual
#   machine the host stops a CPU now and then (measured here on an idle
#   machine: one call in a thousand took more than three times its best),
#   while a partner that misses time slices does so at one call in ten or
#   more, or, when calls are short, every few milliseconds (a B = 1 LSTM
#   step of 0.33 ms on a busy machine lost a slice every 20-40 calls: far
#   apart in calls, yet each cost ten calls' time);
# - proactive (Linux): when a hold ends, and before any call made after the
#   pool has been quiet for a while, the number of runnable threads on the
#   machine (/proc/loadavg) says how many cores are free for partners; the
#   call takes no more threads than that, without trying.
#
# A hold that ends in a new collapse soon after doubles (load that stays),
# up to HOLD_MAX; otherwise it starts again from HOLD_MIN (load that came
# and went).  While the machine count says the cores are busy, a hold is
# renewed HOLD_MIN at a time.  The pool threads' own spinning after a region would read as
# another runnable thread, so the machine is only sampled when fastgates'
# pool has been quiet for QUIET seconds (longer than libgomp's spin).

HOLD_MIN = 0.02          # s: the first hold after a collapse
HOLD_MAX = 2.0           # s: the longest
PROBATION = 0.25         # s: a collapse this soon after a hold doubles it
QUIET = 0.05             # s: pool idle this long before the machine is sampled
# A call is said to have collapsed when it takes longer than
# COLLAPSE_FACTOR times its best time plus COLLAPSE_SLACK: a partner that
# misses a time slice costs milliseconds, far beyond noise, while two
# threads sharing the cores fairly with other work take about twice their
# idle time.
COLLAPSE_FACTOR = 2.5
COLLAPSE_SLACK = 3e-4    # s
COLLAPSE_CALLS = 16
COLLAPSE_WINDOW = 0.05   # s


def _cores():
    """The cores this process may run on, when the whole machine's count applies.

    ``None`` when the process is limited to some of the machine's CPUs
    (affinity): the runnable count of /proc/loadavg covers the whole
    machine and would say nothing about them.
    """
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return mine if mine == os.cpu_count() else None


def _runnable_others():
    """Threads runnable on the machine now besides the caller, or ``None`` if unknown.

    The fourth field of /proc/loadavg (Linux) counts the runnable threads,
    the reader included; reading it costs a few microseconds.
    """
    try:
        with open("/proc/loadavg", "rb") as f:
            field = f.read().split()[3]
        return int(field.split(b"/")[0]) - 1
    except (OSError, IndexError, ValueError):
        return None


class _Contention:
    """The thread plan of each call on a machine that may be busy.

    State shared by all calling threads (plain attribute writes under the
    GIL; a lost update only changes when the next check happens).
    """

    def __init__(self, clock=time.perf_counter, runnable=_runnable_others, cores="detect"):
        self.clock = clock
        self.runnable = runnable
        self.cores = _cores() if cores == "detect" else cores    # None: unknown
        self.held_until = 0.0       # calls take at most `held` threads until then
        self.held = 1
        self.hold = HOLD_MIN
        self.held_at = -1.0         # when the last hold ended
        self.last_parallel = -1.0   # when the last call on more than one thread ended
        self.best = {}              # call key -> best time on more than one thread
        self.calls = 0              # calls on more than one thread
        self.last_collapse = -COLLAPSE_CALLS - 1   # the call number of the last collapse
        self.last_collapse_at = -math.inf           # and when it ended
        self.collapses = 0          # calls seen collapsing (for tests and the bench)
        self.samples = 0            # machine samples taken
        self.asked = 0              # calls that asked for more than one thread
        self.reduced = 0            # ... and were given fewer

    def threads(self, want):
        """Threads for a call that would take ``want`` (counted in ``asked``, ``reduced``)."""
        if want <= 1:
            return want
        self.asked += 1
        n = self._threads(want)
        self.reduced += n < want
        return n

    def _threads(self, want):
        if self.held_until:
            now = self.clock()
            if now < self.held_until:
                return min(want, self.held)
            fit = self._fit()
            if fit < want:
                # the machine says busy: look again soon (a sample is cheap)
                self.held, self.held_until = fit, now + HOLD_MIN
                return fit
            self.held_until = 0.0
            self.held_at = now
        elif self.cores is not None and self.clock() - self.last_parallel > QUIET:
            fit = self._fit()
            if fit < want:
                self.held, self.held_until = fit, self.clock() + HOLD_MIN
                return fit
        return want

    def _fit(self):
        """Threads that have a core each now: the caller and one per free core.

        Unbounded (a large number) when the machine cannot be read.
        """
        others = None if self.cores is None else self.runnable()
        self.samples += self.cores is not None
        if others is None:
            return 1 << 30
        return max(1, self.cores - others)

    def done(self, key, elapsed):
        """Record a call on more than one thread that took ``elapsed`` seconds."""
        now = self.clock()
        self.last_parallel = now
        self.calls += 1
        best = self.best.get(key)
        if best is None or elapsed < best:
            if len(self.best) >= 4096:
                self.best.clear()
            self.best[key] = elapsed
            return
        if elapsed > COLLAPSE_FACTOR * best + COLLAPSE_SLACK:
            self.collapses += 1
            previous, self.last_collapse = self.last_collapse, self.calls
            previous_at, self.last_collapse_at = self.last_collapse_at, now
            if self.calls - previous > COLLAPSE_CALLS and now - previous_at > COLLAPSE_WINDOW:
                return
            if now - self.held_at < PROBATION:
                self.hold = min(HOLD_MAX, 2 * self.hold)
            else:
                self.hold = HOLD_MIN
            self.held, self.held_until = 1, now + self.hold


_contention = _Contention()
_call = threading.local()


def begin_call():
    """Choose the thread count of a call that starts now; returns it.

    The user's count (:func:`set_num_threads`), or fewer while the cores
    are contended (see the notes above :class:`_Contention`).  Results do
    not depend on it.
    """
    n = _contention.threads(_num_threads) if _adaptive else _num_threads
    cap = getattr(_task, "threads", None)
    if cap is not None and cap < n:
        n = cap
    _call.threads = n
    return n


def end_call(key, threads, elapsed):
    """End a call begun with :func:`begin_call` that took ``elapsed`` seconds.

    ``key`` identifies calls of equal work (shapes, options); only calls
    that ran on more than one thread say anything about contention.
    ``elapsed`` None: the call failed, nothing is learnt from it.
    """
    _call.threads = None
    if threads > 1 and elapsed is not None:
        _contention.done((key, threads), elapsed)


def call_threads():
    """The thread count of the current call (:func:`begin_call`), else the user's."""
    n = getattr(_call, "threads", None)
    if n is None:
        n = _num_threads
        cap = getattr(_task, "threads", None)
        if cap is not None and cap < n:
            n = cap
    return n


_MODES = ("fast", "exact")


def _initial_mode():
    mode = os.environ.get("FASTGATES_ACTIVATIONS", "fast")
    if mode not in _MODES:
        raise ValueError(f"FASTGATES_ACTIVATIONS must be one of {_MODES}, got {mode!r}")
    return mode


_mode = _initial_mode()


def set_activation_mode(mode):
    """Choose how the kernels evaluate sigmoid and tanh.

    Parameters
    ----------
    mode : {"fast", "exact"}
        ``"fast"`` (the default): vectorised polynomial approximations,
        error bounds 3 ulp sigmoid, 4 ulp tanh (see :mod:`fastgates._math`).
        ``"exact"``: the C library's ``exp`` and ``tanh``, about ten times
        slower per element.  The environment variable
        ``FASTGATES_ACTIVATIONS`` sets the mode at import.

    Notes
    -----
    A pullback uses the mode its forward pass ran with.
    """
    global _mode
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_activation_mode():
    """Return the activation mode, ``"fast"`` or ``"exact"``."""
    return _mode


def fast_activations():
    """True when the kernels should use the fast activations."""
    mode = getattr(_task, "mode", None)
    return (_mode if mode is None else mode) == "fast"


def exact_arg():
    """The activation mode as the kernels take it: None (fast) or True (exact).

    None, a type of its own, for the default mode: Numba then compiles none
    of the exact mode's code into its kernels (see :mod:`fastgates._math`).
    """
    return None if fast_activations() else True


# -- settings of one task ----------------------------------------------------
#
# A process that runs other people's tasks on several threads (a Dask worker)
# needs settings per task, not per process: each task's kernels on the
# threads Dask gave that task, in the activation mode of the client that sent
# it, planned as the whole batch the task is a slice of.  They are thread-local
# and override the process-wide settings only inside the ``with`` block.

_task = threading.local()


class task_settings:
    """Context: settings of the calls the current thread makes in the block.

    Parameters
    ----------
    threads : int or None
        The most threads a call uses (fewer than :func:`set_num_threads` may
        give, never more).
    mode : {"fast", "exact"} or None
        The activation mode (:func:`set_activation_mode`) of these calls.
    batch : int or None
        Plan each call as if its batch had ``batch`` rows, for the choices
        that depend on the batch size and change bits (:func:`planned_batch`):
        a call on a slice of a batch then gives the rows the same bits as
        the call on the whole batch.

    ``None`` leaves a setting as it is.  Blocks nest; leaving one restores
    what was in force before it.
    """

    __slots__ = ("settings", "saved")

    def __init__(self, *, threads=None, mode=None, batch=None):
        for name, value in (("threads", threads), ("batch", batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} or None, got {mode!r}")
        self.settings = {"threads": threads, "mode": mode, "batch": batch}
        self.saved = None

    def __enter__(self):
        self.saved = {name: getattr(_task, name, None) for name in self.settings}
        for name, value in self.settings.items():
            if value is not None:
                setattr(_task, name, value)
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(_task, name, value)
        return False


def planned_batch(batch):
    """The batch size a call on ``batch`` rows plans for (:class:`task_settings`)."""
    planned = getattr(_task, "batch", None)
    return batch if planned is None or planned < batch else planned
