"""Saving and loading models: :func:`save` and :func:`load`.

A saved model is one file holding its whole configuration (every constructor
option and the dtype) and every parameter, bit for bit.  Loading it can never
run code: the file holds no pickle, and :func:`load` reads only a JSON
document and raw little-endian floats.

Supported models: :class:`~fastgates.LSTM`, :class:`~fastgates.GRU`,
:class:`~fastgates.LSTMCell`, :class:`~fastgates.GRUCell`,
:class:`~fastgates.Linear` and :class:`~fastgates.Readout` (with its ``rnn``
and ``head``), with any options.

File format, version 1
----------------------
A ZIP archive whose entries are all *stored* (uncompressed, as
``np.savez`` writes them), in this order:

``fastgates.json``
    The manifest, a UTF-8 JSON object::

        {
          "format": "fastgates.model",        # says what kind of file this is
          "format_version": 1,                # this layout; load refuses others
          "fastgates_version": "0.1.0",       # the writer (informational)
          "model": MODEL,
          "arrays": [{"name": "weight_ih_l0", "dtype": "<f4", "shape": [20, 3]},
                     ...],                    # state_dict order
          "sha256": "<64 hex digits>"
        }

    where ``MODEL`` is ``{"class": NAME, "options": {...}}`` with ``NAME`` and
    its options exactly these (values as the constructor takes them; ``dtype``
    is ``"float32"`` or ``"float64"``, ``clip`` is a number or ``null``)::

        LSTM      input_size hidden_size num_layers bias batch_first
                  bidirectional reverse clip peephole input_forget dtype
        GRU       input_size hidden_size num_layers bias batch_first
                  bidirectional reset_after reverse clip dtype
        LSTMCell  input_size hidden_size bias clip peephole input_forget dtype
        GRUCell   input_size hidden_size bias reset_after clip dtype
        Linear    in_features out_features bias dtype
        ForgettingAttention  embed_dim num_heads bias dtype
        Readout   mode

    and, for ``Readout`` only, a third key ``"children": {"rnn": MODEL,
    "head": MODEL}`` (an LSTM or GRU, and a Linear).  ``arrays`` lists each
    parameter under its ``state_dict`` name (``"rnn.weight_ih_l0"``,
    ``"head.bias"``, ... for a Readout), with ``dtype`` ``"<f4"`` or ``"<f8"``
    (the model's dtype, little-endian) and its shape.

``arrays/<name>.npy``
    One entry per element of ``arrays``, in the same order: a ``.npy`` file
    (format 1.0) of that dtype and shape in C order.  Object dtypes, and
    anything else than ``<f4``/``<f8``, are refused from the header alone,
    before any data is read.

``sha256`` is the SHA-256 of the manifest without its ``"sha256"`` key,
serialised canonically (``json.dumps(..., sort_keys=True,
separators=(",", ":"), ensure_ascii=True, allow_nan=False)``, UTF-8),
followed by the raw data of every array in ``arrays`` order (little-endian,
C order, no ``.npy`` header).  It detects corruption and accidental edits; it
is not a signature (whoever can write the file can recompute it).

Saving the same model twice gives the same bytes (entries carry a fixed
timestamp).  Parameters are stored as they are, NaN and inf included.

Reading
-------
:func:`load` reads the whole file into memory, then checks, in this order,
and raises ``ValueError`` naming the file at the first problem: a ZIP archive
(every entry stored, unencrypted, unique, CRC-32 correct); a manifest that is
strict JSON (no duplicate keys, no NaN) with ``"format":
"fastgates.model"`` and ``"format_version": 1`` and exactly the keys above;
exactly the entries the manifest lists; each ``.npy`` header (format 1.0 or
2.0) giving the listed dtype and shape, and exactly that many bytes of data;
the SHA-256; the model classes and option names; a configuration that does
not imply more parameter entries than the file holds (so that a forged file
cannot make the constructor allocate without bound); the constructor's own
validation of the options; and ``load_state_dict`` of the arrays.
"""

import collections
import functools
import hashlib
import hmac
import inspect
import io as _io
import json
import os
import secrets
import struct
import zipfile

import numpy as np

from .attention import ForgettingAttention
from .layers import _LAYERS, _STEPS
from .training import Linear, Readout

__all__ = ["load", "save"]

FORMAT = "fastgates.model"
FORMAT_VERSION = 1
_MANIFEST = "fastgates.json"
_ARRAY_DIR = "arrays/"
_DTYPES = {"float32": "<f4", "float64": "<f8"}
# A fixed entry timestamp (the earliest ZIP can store): the bytes of a saved
# model depend on the model only.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)



# Options added to the constructors after the file format was fixed, and
# their defaults: a file leaves one out when the model has the default (a
# model that does not use it writes the bytes it always did, which older
# versions read), and a file without it loads with the default.
_ADDED_OPTIONS = {"dropout": 0.0, "proj_size": 0}


def _constructor_options(cls):
    """The options a file stores for ``cls``: its constructor's, ``dtype`` last, no ``seed``."""
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "seed")]
    return tuple(n for n in names if n != "dtype") + ("dtype",)


# class name -> (class, options in the manifest, {child: allowed classes});
# every cell's layer and one-step classes (fastgates.cells), by their
# constructors' options
_SPECS = {cls.__name__: (cls, _constructor_options(cls), {})
          for cls in (*_LAYERS.values(), *_STEPS.values())}
_SPECS["Linear"] = (Linear, ("in_features", "out_features", "bias", "dtype"), {})
_SPECS["ForgettingAttention"] = (ForgettingAttention, _constructor_options(ForgettingAttention), {})
_SPECS["Readout"] = (Readout, ("mode",), {"rnn": tuple(cls.__name__ for cls in _LAYERS.values()),
                                          "head": ("Linear",)})
_CLASS_NAMES = {spec[0]: name for name, spec in _SPECS.items()}


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def save(model, path):
    """Write ``model`` (configuration and parameters) to a file.

    The layout is described in :mod:`fastgates.io`; :func:`load` reads it
    back into an equal model, parameters bit for bit.  The model is not
    modified.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell, GRUCell, Linear or Readout
        Any options.
    path : str, os.PathLike or binary file object
        A file name (any suffix; none is added), written atomically: to a
        temporary file in the same directory, then renamed over ``path``, so
        that a reader never sees half a file.  Or a file object open for
        binary writing (``open(p, "wb")``, ``io.BytesIO()``), which is
        written from its current position and left open.

    Raises
    ------
    TypeError
        If ``model`` is not one of the supported classes (a subclass is
        refused too: it may hold more than its parameters), if its class has
        a constructor option this module does not know (it would be lost),
        or if ``path`` is neither a path nor a binary file object.
    FileNotFoundError
        If the directory of ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a directory.

    Examples
    --------
    >>> import io, fastgates as fg
    >>> m = fg.GRU(3, 4, reset_after=False, seed=0)
    >>> buf = io.BytesIO()
    >>> fg.save(m, buf)
    >>> _ = buf.seek(0)
    >>> fg.load(buf)
    GRU(3, 4, reset_after=False, dtype=float32)
    """
    tree = _describe(model)
    params = {name: _little_endian(value) for name, value in model.state_dict().items()}
    payload = _archive(tree, params)
    if _is_path(path):
        _write_atomically(os.fspath(path), payload)
    elif _is_binary_file(path, "write"):
        path.write(payload)
    else:
        raise TypeError(
            f"path must be a str, an os.PathLike or a binary file object open for writing, "
            f"got {type(path).__name__}")


def _describe(model):
    """The manifest's ``MODEL`` node of ``model``."""
    name = _CLASS_NAMES.get(type(model))
    if name is None:
        supported = ", ".join(_SPECS)
        raise TypeError(f"model must be one of {supported} (not a subclass), got {type(model).__name__}")
    _, options, children = _SPECS[name]
    unknown = _unknown_options(type(model))
    if unknown:
        # A constructor option this module does not know would be lost: refuse
        # rather than write a file that loads as a different model.
        raise TypeError(f"fastgates.io cannot save {name} option(s) {unknown} yet; "
                        "the file would load as a different model")
    node = {"class": name, "options": {
        opt: _option(model, opt) for opt in options
        if not (opt in _ADDED_OPTIONS and _option(model, opt) == _ADDED_OPTIONS[opt])}}
    if children:
        node["children"] = {child: _describe(getattr(model, child)) for child in children}
    return node


@functools.cache
def _unknown_options(cls):
    _, options, children = _SPECS[_CLASS_NAMES[cls]]
    known = set(options) | set(children) | {"self", "seed"}
    return sorted(set(inspect.signature(cls.__init__).parameters) - known)


def _option(model, name):
    value = getattr(model, name)
    if name == "dtype":
        return np.dtype(value).name
    if name == "clip":
        return None if value == np.inf else float(value)
    if name == "bias" and isinstance(model, Linear):
        return value is not None          # Linear.bias is the array itself
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and np.isfinite(value):
        return float(value)      # JSON keeps a float64 exactly (repr round-trips)
    raise TypeError(f"cannot save option {name}={value!r} of {type(model).__name__}")  # pragma: no cover


def _little_endian(value):
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))


def _canonical(manifest):
    body = {key: value for key, value in manifest.items() if key != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _digest(manifest, arrays):
    h = hashlib.sha256(_canonical(manifest))
    for entry in manifest["arrays"]:
        h.update(arrays[entry["name"]].tobytes(order="C"))
    return h.hexdigest()


def _archive(tree, params):
    """The bytes of the file: manifest first, then one .npy entry per array."""
    from . import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastgates_version": __version__,
        "model": tree,
        "arrays": [{"name": name, "dtype": value.dtype.str, "shape": list(value.shape)}
                   for name, value in params.items()],
    }
    manifest["sha256"] = _digest(manifest, params)
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        _add_entry(zf, _MANIFEST, json.dumps(manifest, indent=1, allow_nan=False).encode())
        for name, value in params.items():
            npy = _io.BytesIO()
            np.lib.format.write_array(npy, value, version=(1, 0), allow_pickle=False)
            _add_entry(zf, _ARRAY_DIR + name + ".npy", npy.getvalue())
    return buf.getvalue()


def _add_entry(zf, name, data):
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _write_atomically(path, payload):
    if os.path.isdir(path):
        raise IsADirectoryError(21, "cannot save a model to a directory", path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(2, "the directory to save the model in does not exist", folder)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 less the umask, as open(path, "wb") would give.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_path(path):
    return isinstance(path, (str, os.PathLike))


def _is_binary_file(obj, mode):
    if isinstance(obj, (_io.TextIOBase, bytes, bytearray)):
        return False
    return callable(getattr(obj, mode, None))


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


class _Invalid(Exception):
    """A problem with the file's content; :func:`load` adds the file's name."""


def load(path):
    """Read a model written by :func:`save`.

    Nothing in the file is executed: there is no pickle in the format, and
    entries are checked (names, dtypes, shapes, sizes, checksum) before the
    model is built.

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        A file name, or a file object open for binary reading, read from its
        current position to its end.

    Returns
    -------
    LSTM, GRU, LSTMCell, GRUCell, Linear or Readout
        A new model of the saved class with the saved options and dtype,
        whose ``state_dict()`` equals the saved one bit for bit.

    Raises
    ------
    ValueError
        If the file is not a fastgates model file, was written in another
        format version, is truncated or corrupted (its SHA-256 does not
        match), names an unknown class or options the model refuses, or has
        missing, extra, mis-shaped or non-float arrays.  The message names
        the file and the problem.
    FileNotFoundError, IsADirectoryError, PermissionError
        As ``open(path, "rb")`` raises them.
    TypeError
        If ``path`` is neither a path nor a binary file object.
    """
    if _is_path(path):
        where = os.fspath(path)
        with open(where, "rb") as f:
            raw = f.read()
    elif _is_binary_file(path, "read"):
        where = getattr(path, "name", None) or repr(path)
        raw = path.read()
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"path must be a file object open in binary mode, its read() gave {type(raw).__name__}")
        raw = bytes(raw)
    else:
        raise TypeError(
            f"path must be a str, an os.PathLike or a binary file object open for reading, "
            f"got {type(path).__name__}")
    try:
        return _read(raw)
    except _Invalid as exc:
        raise ValueError(f"cannot load a fastgates model from {where!r}: {exc}") from None


# What zipfile, struct and a JSON or .npy header parser raise on bytes that
# are not what they should be.  Anything else is a bug of fastgates, not of
# the file, and propagates.
_MALFORMED = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, ValueError,
              NotImplementedError, RuntimeError, UnicodeDecodeError, OverflowError, KeyError,
              IndexError, OSError, SyntaxError)


def _read(raw):
    if not raw:
        raise _Invalid("the file is empty")
    if raw[:4] != b"PK\x03\x04":
        raise _Invalid("not a fastgates model file (it is not a ZIP archive; "
                       "a fastgates model file starts with the bytes PK\\x03\\x04)")
    try:
        entries = _entries(raw)
    except _Invalid:
        raise
    except _MALFORMED as exc:
        raise _Invalid(f"the file is truncated or corrupted ({type(exc).__name__}: {exc})") from None
    manifest = _manifest(entries)
    arrays = _arrays(manifest, entries)
    if not hmac.compare_digest(_digest(manifest, arrays), manifest["sha256"]):
        raise _Invalid("the SHA-256 of the configuration and parameters does not match the one stored "
                       "in fastgates.json: the file is corrupted or was modified")
    model = _build(manifest["model"], arrays)
    _check_bitwise(model, arrays)
    return model


def _entries(raw):
    """Every entry of the archive, checked to be stored, unencrypted and unique."""
    with zipfile.ZipFile(_io.BytesIO(raw)) as zf:
        infos = zf.infolist()
        names = [info.filename for info in infos]
        duplicates = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        if duplicates:
            raise _Invalid(f"the archive holds duplicate entries {duplicates}")
        if _MANIFEST not in names:
            raise _Invalid(f"not a fastgates model file (the archive has no entry {_MANIFEST!r}; "
                           f"it holds {names[:5]}{' ...' if len(names) > 5 else ''})")
        entries = {}
        for info in infos:
            if info.flag_bits & 0x1:
                raise _Invalid(f"entry {info.filename!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Invalid(f"entry {info.filename!r} is compressed (method {info.compress_type}); "
                               "fastgates stores entries uncompressed")
            if info.file_size > len(raw):
                raise _Invalid(f"entry {info.filename!r} claims {info.file_size} bytes, more than the file holds")
            entries[info.filename] = zf.read(info)       # checks the entry's CRC-32
    return entries


def _strict_object(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Invalid(f"fastgates.json repeats a key among {sorted(keys)}")
    return dict(pairs)


def _no_constant(name):
    raise _Invalid(f"fastgates.json holds {name}, which JSON does not allow")


def _manifest(entries):
    try:
        text = entries[_MANIFEST].decode("utf-8")
        manifest = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"fastgates.json is not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise _Invalid("fastgates.json is nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Invalid(f"not a fastgates model file (fastgates.json must be an object with "
                       f"\"format\": {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _Invalid(f"unsupported format_version {version!r}; this fastgates reads version {FORMAT_VERSION} "
                       "(a newer fastgates may have written the file)")
    expected = {"format", "format_version", "fastgates_version", "model", "arrays", "sha256"}
    _exact_keys(manifest, expected, "fastgates.json")
    if not isinstance(manifest["fastgates_version"], str):
        raise _Invalid("fastgates.json: \"fastgates_version\" must be a string")
    digest = manifest["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise _Invalid(f"fastgates.json: \"sha256\" must be 64 lowercase hex digits, got {digest!r}")
    arrays = manifest["arrays"]
    if not isinstance(arrays, list):
        raise _Invalid("fastgates.json: \"arrays\" must be a list")
    seen = set()
    for k, entry in enumerate(arrays):
        where = f"fastgates.json: arrays[{k}]"
        if not isinstance(entry, dict):
            raise _Invalid(f"{where} must be an object {{\"name\", \"dtype\", \"shape\"}}")
        _exact_keys(entry, {"name", "dtype", "shape"}, where)
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name or name in seen:
            raise _Invalid(f"{where}: \"name\" must be a non-empty string naming each array once, got {name!r}")
        seen.add(name)
        if dtype not in _DTYPES.values():
            raise _Invalid(f"{where} ({name!r}): \"dtype\" must be \"<f4\" or \"<f8\", got {dtype!r}")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise _Invalid(f"{where} ({name!r}): \"shape\" must be a list of non-negative integers, got {shape!r}")
    if not isinstance(manifest["model"], dict):
        raise _Invalid("fastgates.json: \"model\" must be an object")
    return manifest


def _exact_keys(obj, expected, where, optional=()):
    missing = sorted(expected - obj.keys() - set(optional))
    unexpected = sorted(obj.keys() - expected)
    if missing or unexpected:
        parts = ([f"missing keys {missing}"] if missing else []) + \
                ([f"unexpected keys {unexpected}"] if unexpected else [])
        raise _Invalid(f"{where}: {'; '.join(parts)}")


def _arrays(manifest, entries):
    """The arrays the manifest lists, each read from its .npy entry after checking its header."""
    wanted = {_ARRAY_DIR + e["name"] + ".npy": e for e in manifest["arrays"]}
    present = set(entries) - {_MANIFEST}
    missing = sorted(set(wanted) - present)
    unexpected = sorted(present - set(wanted))
    if missing or unexpected:
        parts = ([f"missing entries {missing}"] if missing else []) + \
                ([f"unexpected entries {unexpected}"] if unexpected else [])
        raise _Invalid(f"the archive does not hold the arrays fastgates.json lists: {'; '.join(parts)}")
    arrays = {}
    for entry_name, entry in wanted.items():
        arrays[entry["name"]] = _npy(entries[entry_name], entry_name, np.dtype(entry["dtype"]), tuple(entry["shape"]))
    return arrays


def _npy(data, entry_name, dtype, shape):
    """Parse one .npy entry without ever unpickling: header first, then raw floats."""
    fp = _io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(fp)
        else:
            raise _Invalid(f"entry {entry_name!r} is a .npy file of version {version}; expected 1.0 or 2.0")
    except _Invalid:
        raise
    except _MALFORMED as exc:
        raise _Invalid(f"entry {entry_name!r} is not a valid .npy file ({exc})") from None
    got_shape, fortran, got_dtype = header
    if got_dtype.hasobject or got_dtype.kind != "f" or got_dtype != dtype:
        raise _Invalid(f"entry {entry_name!r} holds dtype {got_dtype.str!r}; fastgates.json says {dtype.str!r} "
                       "and only float arrays ('<f4', '<f8') are allowed (object arrays are never unpickled)")
    if fortran:
        raise _Invalid(f"entry {entry_name!r} is in Fortran order; fastgates writes C order")
    if tuple(got_shape) != shape:
        raise _Invalid(f"entry {entry_name!r} has shape {tuple(got_shape)}; fastgates.json says {shape}")
    body = data[fp.tell():]
    count = 1
    for n in shape:
        count *= n
    if len(body) != count * dtype.itemsize:
        raise _Invalid(f"entry {entry_name!r} holds {len(body)} bytes of data; shape {shape} of {dtype.str} "
                       f"needs {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def _build(node, arrays):
    """The model the manifest describes, with its arrays loaded."""
    _check_node(node, "model", None)
    stored = sum(a.size for a in arrays.values())
    implied = _implied_count(node)
    # Building a model allocates its parameters: refuse a configuration that
    # would allocate more than the file holds before building it.
    if implied is not None and implied > stored:
        raise _Invalid(f"the configuration implies {implied} parameter entries but the file holds {stored}")
    return _construct(node, "model", arrays, "")


def _check_node(node, where, allowed):
    """Check a MODEL node's structure (not its option values: the constructor does that)."""
    if not isinstance(node, dict):
        raise _Invalid(f"fastgates.json: {where} must be an object")
    name = node.get("class")
    if name not in _SPECS:
        raise _Invalid(f"fastgates.json: {where}: unknown class {name!r}; expected one of {', '.join(_SPECS)}")
    if allowed is not None and name not in allowed:
        raise _Invalid(f"fastgates.json: {where} must be one of {', '.join(allowed)}, got {name!r}")
    _, options, children = _SPECS[name]
    _exact_keys(node, {"class", "options"} | ({"children"} if children else set()), f"fastgates.json: {where}")
    if not isinstance(node["options"], dict):
        raise _Invalid(f"fastgates.json: {where}.options must be an object")
    _exact_keys(node["options"], set(options), f"fastgates.json: {where}.options of {name}",
                optional=_ADDED_OPTIONS.keys())
    dtype = node["options"].get("dtype", "float32")
    if dtype not in _DTYPES:
        raise _Invalid(f"fastgates.json: {where}.options.dtype must be \"float32\" or \"float64\", got {dtype!r}")
    if children:
        kids = node["children"]
        if not isinstance(kids, dict):
            raise _Invalid(f"fastgates.json: {where}.children must be an object")
        _exact_keys(kids, set(children), f"fastgates.json: {where}.children")
        for child, kinds in children.items():
            _check_node(kids[child], f"{where}.children.{child}", kinds)


def _construct(node, where, arrays, prefix):
    """Build the model of ``node`` and load the arrays named ``prefix + <its state_dict name>``."""
    cls, _, children = _SPECS[node["class"]]
    mine = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
    if children:
        # Each child loads the arrays under its own prefix; anything else is
        # not a parameter of this model.
        stray = sorted(prefix + name for name in mine if not any(name.startswith(c + ".") for c in children))
        if stray:
            raise _Invalid(f"the file holds arrays {stray} that are not parameters of the {node['class']} "
                           "the configuration describes")
    args = {child: _construct(node["children"][child], f"{where}.children.{child}", arrays, f"{prefix}{child}.")
            for child in children}
    try:
        model = cls(**args, **node["options"])
    except (TypeError, ValueError) as exc:
        raise _Invalid(f"fastgates.json: {where}: the options fail {node['class']}'s validation: {exc}") from None
    if children:
        return model
    for name, value in mine.items():
        if value.dtype != model.dtype.newbyteorder("<"):
            raise _Invalid(f"array {prefix + name!r} has dtype {value.dtype.str!r}, not the model's "
                           f"dtype {model.dtype.name}")
    # The saved parameters are loaded as they are, NaN and inf included (a
    # model holds them after load_state_dict(..., check_finite=False)).
    keywords = {"check_finite": False} if "check_finite" in inspect.signature(model.load_state_dict).parameters else {}
    try:
        model.load_state_dict(mine, **keywords)
    except (TypeError, ValueError) as exc:
        what = f"{node['class']} at {where}" if prefix else node["class"]
        raise _Invalid(f"the arrays do not fit the {what} the configuration describes: {exc}") from None
    return model


def _implied_count(node):
    """How many parameter entries the model ``node`` describes would allocate (None: cannot tell).

    Used only to refuse, before building, a configuration that would allocate
    more than the file holds.
    """
    name, opts = node["class"], node["options"]
    if name == "Readout":
        parts = [_implied_count(node["children"][child]) for child in ("rnn", "head")]
        return None if None in parts else sum(parts)
    sizes = {k: v for k, v in opts.items() if k in ("input_size", "hidden_size", "num_layers", "in_features",
                                                     "out_features", "embed_dim", "num_heads")}
    if not all(type(v) is int and v > 0 for v in sizes.values()):
        return None               # the constructor refuses these before allocating anything
    bias = opts.get("bias") is True
    if name == "Linear":
        return opts["out_features"] * (opts["in_features"] + bias)
    if name == "ForgettingAttention":
        E, heads = opts["embed_dim"], opts["num_heads"]
        if E % heads:
            return None           # the constructor refuses it
        return 4 * E * E + heads * E + bias * (4 * E + heads)
    spec = _SPECS[name][0]._spec
    H, I = opts["hidden_size"], opts["input_size"]
    peep = 3 * H if opts.get("peephole") is True else 0
    proj = opts.get("proj_size", 0)
    if type(proj) is not int or not 0 <= proj < H:
        return None               # the constructor refuses it
    heads = opts.get("num_heads", 1)
    if type(heads) is not int or heads < 1 or H % heads:
        return None               # the constructor refuses it
    cell_opts = {"proj_size": proj, "num_heads": heads}

    def count(in_size):
        shapes = spec.param_shapes(in_size, H, cell_opts, bias)
        return sum(int(np.prod(shape)) for shape in shapes.values())

    if name.endswith("Cell"):
        return count(I) + peep
    L = opts["num_layers"]
    D = 2 if opts.get("bidirectional") is True else 1
    out = spec.state_units(H, cell_opts)[0]
    return D * (count(I) + (L - 1) * count(D * out) + L * peep)


def _check_bitwise(model, arrays):
    # load_state_dict copies within one dtype, which keeps every bit (NaN
    # payloads, signed zeros); this makes sure of it.
    for name, value in model.state_dict().items():
        if value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes() != arrays[name].tobytes():
            raise _Invalid(f"parameter {name!r} changed when loaded into the model")  # pragma: no cover
