"""Saving and loading: ``fg.save`` and ``fg.load`` (``fastgates/io.py``).

Properties checked:

- a round trip gives a model of the same class with the same options and
  dtype, a bitwise equal ``state_dict`` (NaN payloads, signed zeros and
  subnormals included) and bitwise equal outputs;
- every damaged file raises ``ValueError`` naming the file (or the
  ``OSError`` subclass of what happened), never a crash or a wrong model:
  flipped bytes, truncation, removed/renamed/added entries, edited JSON with
  or without a recomputed checksum, other kinds of files;
- nothing in a file is ever unpickled: a crafted object array whose
  unpickling would create a marker file is refused and the marker never
  appears.

The file format is the one documented in ``fastgates.io``; the helpers here
rewrite files following that documentation, independently of the module's
own code.
"""

import hashlib
import importlib
import inspect
import io
import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgates as fg

F32, F64 = np.float32, np.float64
MANIFEST = "fastgates.json"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@st.composite
def recurrent_models(draw, classes=("LSTM", "GRU")):
    name = draw(st.sampled_from(classes))
    dtype = draw(st.sampled_from([F32, F64]))
    opts = {
        "bias": draw(st.booleans()),
        "clip": draw(st.one_of(st.none(), st.floats(0.1, 10.0))),
        "dtype": dtype,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    size = st.integers(1, 4)
    if not name.endswith("Cell"):
        opts.update(num_layers=draw(st.integers(1, 2)), batch_first=draw(st.booleans()),
                    bidirectional=draw(st.booleans()))
        opts["reverse"] = False if opts["bidirectional"] else draw(st.booleans())
    if name.startswith("LSTM"):
        opts.update(peephole=draw(st.booleans()), input_forget=draw(st.booleans()))
    else:
        opts["reset_after"] = draw(st.booleans())
    return getattr(fg, name)(draw(size), draw(size), **opts)


@st.composite
def linear_models(draw, in_features=None, dtype=None):
    return fg.Linear(in_features or draw(st.integers(1, 5)), draw(st.integers(1, 4)),
                     bias=draw(st.booleans()), dtype=dtype or draw(st.sampled_from([F32, F64])),
                     seed=draw(st.integers(0, 2**32 - 1)))


@st.composite
def readouts(draw):
    rnn = draw(recurrent_models())
    head = draw(linear_models(in_features=rnn.num_directions * rnn.hidden_size, dtype=rnn.dtype))
    return fg.Readout(rnn, head, mode=draw(st.sampled_from(["last", "sequence"])))


any_model = st.one_of(recurrent_models(("LSTM", "GRU", "LSTMCell", "GRUCell")), linear_models(), readouts())


def options(model):
    """Every constructor option of ``model`` (not ``seed``), read from its attributes."""
    params = inspect.signature(type(model).__init__).parameters
    out = {"class": type(model).__name__}
    for name in params:
        if name in ("self", "seed"):
            continue
        value = getattr(model, name)
        if isinstance(model, fg.Linear) and name == "bias":
            value = value is not None
        elif isinstance(value, (fg.LSTM, fg.GRU, fg.Linear)):
            value = options(value)
        out[name] = value
    return out


def assert_bitwise(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def run(model, rng):
    """Outputs of ``model`` on a random input, as a flat list of arrays."""
    if isinstance(model, fg.Linear):
        return [model(rng.standard_normal((2, model.in_features)).astype(model.dtype))]
    rnn = model.rnn if isinstance(model, fg.Readout) else model
    if isinstance(rnn, (fg.LSTMCell, fg.GRUCell)):
        out = model(rng.standard_normal((2, rnn.input_size)).astype(model.dtype))
    else:
        x = rng.standard_normal((2, 2, rnn.input_size)).astype(model.dtype)   # T = B = 2
        out = model(x, lengths=np.array([2, 1]))
    flat = []
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            stack.extend(item)
        else:
            flat.append(item)
    return flat


def saved(model):
    buf = io.BytesIO()
    fg.save(model, buf)
    return buf.getvalue()


def load_bytes(raw):
    return fg.load(io.BytesIO(raw))


# ---------------------------------------------------------------------------
# Rewriting files as the format documents them
# ---------------------------------------------------------------------------


def entries_of(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def zipped(entries, compression=zipfile.ZIP_STORED):
    """A ZIP archive of ``entries``, a dict or a list of (name, bytes) pairs."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in (entries.items() if isinstance(entries, dict) else entries):
            zf.writestr(name, data)
    return buf.getvalue()


def npy_bytes(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def documented_digest(manifest, entries):
    """SHA-256 of the canonical manifest (without "sha256") and the raw array data."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                  allow_nan=False).encode())
    for entry in manifest["arrays"]:
        arr = np.load(io.BytesIO(entries["arrays/" + entry["name"] + ".npy"]), allow_pickle=False)
        h.update(arr.tobytes())
    return h.hexdigest()


def edited(raw, edit, rehash=True):
    """``raw`` with its manifest changed by ``edit(manifest)`` and, if ``rehash``, a valid checksum."""
    entries = entries_of(raw)
    manifest = json.loads(entries[MANIFEST])
    edit(manifest)
    if rehash:
        manifest["sha256"] = documented_digest(manifest, entries)
    entries[MANIFEST] = json.dumps(manifest).encode()
    return zipped(entries)


@pytest.fixture(scope="module")
def sample():
    """A nested model with every kind of option set, and its file."""
    rnn = fg.LSTM(3, 4, num_layers=2, bidirectional=True, clip=3.5, peephole=True, dtype=F64, seed=1)
    model = fg.Readout(rnn, fg.Linear(8, 2, dtype=F64, seed=2), mode="sequence")
    return model, saved(model)


def assert_refused(raw, *fragments):
    """Loading ``raw`` raises ValueError naming the file object and each of ``fragments``."""
    buf = io.BytesIO(raw)
    with pytest.raises(ValueError) as info:
        fg.load(buf)
    message = str(info.value)
    assert repr(buf) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(model=any_model, seed=st.integers(0, 2**32 - 1))
def test_round_trip_is_exact(model, seed):
    before = model.state_dict()
    raw = saved(model)
    loaded = load_bytes(raw)
    assert type(loaded) is type(model)
    assert options(loaded) == options(model)
    assert repr(loaded) == repr(model)
    assert_bitwise(loaded.state_dict(), model.state_dict())
    assert_bitwise(model.state_dict(), before)            # saving changed nothing
    out_a, out_b = run(model, np.random.default_rng(seed)), run(loaded, np.random.default_rng(seed))
    assert len(out_a) == len(out_b)
    for a, b in zip(out_a, out_b):
        assert a.dtype == b.dtype == model.dtype and a.tobytes() == b.tobytes()
    assert saved(loaded) == raw                             # deterministic bytes


@pytest.mark.parametrize("dtype, bits", [(F32, np.uint32), (F64, np.uint64)])
def test_every_bit_pattern_round_trips(dtype, bits):
    """NaNs with payloads, infinities, signed zeros and subnormals keep every bit."""
    model = fg.GRUCell(3, 5, dtype=dtype, seed=0)
    rng = np.random.default_rng(1)
    state = {}
    for name, value in model.state_dict().items():
        raw = rng.integers(0, np.iinfo(bits).max, size=value.shape, dtype=bits, endpoint=True)
        state[name] = raw.view(dtype)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).smallest_subnormal], dtype=dtype)
    payload = np.array([0x7FC00001 if dtype is F32 else 0x7FF8000000000001], dtype=bits).view(dtype)
    state["bias_ih"][:7] = np.concatenate([special, payload])
    # Non-finite parameters need load_state_dict(..., check_finite=False) where that exists.
    keywords = {"check_finite": False} if "check_finite" in inspect.signature(model.load_state_dict).parameters else {}
    model.load_state_dict(state, **keywords)
    assert_bitwise(load_bytes(saved(model)).state_dict(), model.state_dict())


@pytest.mark.parametrize("model", [
    fg.LSTM(2, 3), fg.GRU(2, 3), fg.LSTMCell(2, 3), fg.GRUCell(2, 3), fg.Linear(2, 3),
    fg.Readout(fg.GRU(2, 3), fg.Linear(3, 1)), fg.JANET(2, 3, beta=0.5), fg.MGU(2, 3),
    fg.GRU(2, 3, num_layers=2, dropout=0.3),
], ids=lambda m: f"{type(m).__name__}{'-dropout' if getattr(m, 'dropout', 0) else ''}")
def test_every_constructor_option_is_in_the_file(model):
    """The manifest holds exactly the constructor's options (except seed), so none is lost;
    an option added after the format was fixed is left out at its default (older versions
    read such a file)."""
    manifest = json.loads(entries_of(saved(model))[MANIFEST])
    assert manifest["format"] == "fastgates.model" and manifest["format_version"] == 1
    node = manifest["model"]
    expected = set(inspect.signature(type(model).__init__).parameters) - {"self", "seed", "rnn", "head"}
    added = importlib.import_module("fastgates.io")._ADDED_OPTIONS
    expected -= {k for k, default in added.items() if getattr(model, k, default) == default}
    assert node["class"] == type(model).__name__
    assert set(node["options"]) == expected
    assert manifest["sha256"] == documented_digest(manifest, entries_of(saved(model)))


def test_an_unknown_constructor_option_is_not_silently_dropped(monkeypatch):
    """A class whose constructor gains an option fastgates.io does not know cannot be saved."""
    class Wider(fg.Linear):
        def __init__(self, in_features, out_features, *, bias=True, dtype=F32, seed=None, scale=1.0):
            super().__init__(in_features, out_features, bias=bias, dtype=dtype, seed=seed)

    fio = importlib.import_module("fastgates.io")
    monkeypatch.setitem(fio._SPECS, "Wider", (Wider,) + fio._SPECS["Linear"][1:])
    monkeypatch.setitem(fio._CLASS_NAMES, Wider, "Wider")
    with pytest.raises(TypeError, match=r"option\(s\) \['scale'\]"):
        fg.save(Wider(2, 3), io.BytesIO())


def test_paths_and_file_objects(tmp_path):
    model = fg.LSTM(2, 3, reverse=True, seed=0)
    for target in (str(tmp_path / "a.fg"), tmp_path / "b.fg"):
        fg.save(model, target)
        assert_bitwise(fg.load(target).state_dict(), model.state_dict())
    with open(tmp_path / "c.fg", "wb") as f:
        f.write(b"prefix")           # written from the current position...
        fg.save(model, f)
    with open(tmp_path / "c.fg", "rb") as f:
        f.seek(6)                    # ...and read from it
        assert_bitwise(fg.load(f).state_dict(), model.state_dict())
        assert not f.closed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fg", "b.fg", "c.fg"]   # no temporary files


def test_saving_replaces_a_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "m.fg"
    old = fg.GRU(2, 3, seed=0)
    fg.save(old, path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        fg.save(fg.GRU(2, 3, seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.fg"]
    fg.save(fg.GRU(2, 3, seed=1), path)                      # overwrites
    assert_bitwise(fg.load(path).state_dict(), fg.GRU(2, 3, seed=1).state_dict())


def test_bad_paths_and_arguments(tmp_path):
    model = fg.Linear(2, 2)
    with pytest.raises(FileNotFoundError):
        fg.load(tmp_path / "missing.fg")
    with pytest.raises(IsADirectoryError):
        fg.load(tmp_path)
    with pytest.raises(IsADirectoryError):
        fg.save(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        fg.save(model, tmp_path / "no_such_dir" / "m.fg")
    with pytest.raises(TypeError, match="path must be"):
        fg.save(model, 3)
    with pytest.raises(TypeError, match="path must be"):
        fg.load(None)
    with pytest.raises(TypeError, match="path must be"):
        fg.save(model, io.StringIO())
    with pytest.raises(TypeError, match="model must be one of"):
        fg.save(object(), io.BytesIO())

    class MyLSTM(fg.LSTM):
        pass

    with pytest.raises(TypeError, match="not a subclass"):
        fg.save(MyLSTM(2, 2), io.BytesIO())


def test_errors_name_the_path(tmp_path):
    path = tmp_path / "broken.fg"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="broken.fg"):
        fg.load(path)


# ---------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_bytes_are_detected_or_harmless(sample, data):
    """Flip 1-3 bytes anywhere: ValueError, or (a byte ZIP ignores) the very same model."""
    model, raw = sample
    damaged = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        damaged[pos] ^= data.draw(st.integers(1, 255))
    try:
        loaded = load_bytes(bytes(damaged))
    except ValueError as exc:
        assert "cannot load a fastgates model" in str(exc)
    else:
        assert options(loaded) == options(model)
        assert_bitwise(loaded.state_dict(), model.state_dict())


def test_flips_inside_any_entry_are_always_detected(sample):
    """Every byte of every entry's content is covered (by the ZIP CRC-32 and the SHA-256)."""
    _, raw = sample
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        spans = []
        for info in zf.infolist():
            name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
                int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            spans.append((start, start + info.file_size))
    rng = np.random.default_rng(0)
    for start, stop in spans:
        for pos in rng.integers(start, stop, size=3):
            damaged = bytearray(raw)
            damaged[pos] ^= 1 << int(rng.integers(0, 8))
            assert_refused(bytes(damaged))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_files_are_refused(sample, data):
    _, raw = sample
    n = data.draw(st.integers(0, len(raw) - 1))
    assert_refused(raw[:n])


def test_removed_renamed_added_entries(sample):
    _, raw = sample
    entries = entries_of(raw)
    name = "arrays/rnn.weight_hh_l1.npy"

    removed = dict(entries)
    del removed[name]
    assert_refused(zipped(removed), "missing entries", name)

    renamed = {("arrays/rnn.weight_hh_l9.npy" if k == name else k): v for k, v in entries.items()}
    assert_refused(zipped(renamed), "missing entries", "unexpected entries", "weight_hh_l9")

    added = dict(entries, **{"arrays/extra.npy": npy_bytes(np.zeros(3))})
    assert_refused(zipped(added), "unexpected entries", "extra")

    no_manifest = {k: v for k, v in entries.items() if k != MANIFEST}
    assert_refused(zipped(no_manifest), "not a fastgates model file")

    compressed = zipped(entries, compression=zipfile.ZIP_DEFLATED)
    assert_refused(compressed, "compressed")

    with pytest.warns(UserWarning, match="Duplicate"):
        duplicated = zipped(list(entries.items()) + [(name, entries[name])])
    assert_refused(duplicated, "duplicate")


def test_changed_array_data_fails_the_checksum(sample):
    """New data with a valid ZIP CRC but without a new SHA-256 is caught."""
    _, raw = sample
    entries = entries_of(raw)
    name = "arrays/head.weight.npy"
    arr = np.load(io.BytesIO(entries[name]), allow_pickle=False)
    arr[0, 0] = np.nextafter(arr[0, 0], np.inf)
    entries[name] = npy_bytes(arr)
    assert_refused(zipped(entries), "SHA-256", "corrupted or was modified")


@pytest.mark.parametrize("edit, fragments", [
    (lambda m: m.update(format_version=2), ["unsupported format_version 2"]),
    (lambda m: m.update(format_version="1"), ["unsupported format_version"]),
    (lambda m: m.update(format="numpy"), ["not a fastgates model file"]),
    (lambda m: m["model"].update({"class": "Transformer"}), ["unknown class 'Transformer'"]),
    (lambda m: m["model"]["children"]["rnn"].update({"class": "Linear"}), ["must be one of LSTM, GRU"]),
    (lambda m: m["model"]["options"].update(mode="first"), ["validation", "mode"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(hidden_size=5), ["implies 1158", "holds 802"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(hidden_size=3), ["do not fit", "shape"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(hidden_size=-1), ["validation", "hidden_size"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(hidden_size="4"), ["validation", "hidden_size"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(hidden_size=10**12), ["implies"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(input_size=[1]), ["validation", "input_size"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(bias="yes"), ["validation", "bias"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(clip=-1.0), ["validation", "clip"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(dtype="float16"), ["dtype"]),
    (lambda m: m["model"]["children"]["head"]["options"].update(dtype="float32"), ["'head.weight' has dtype '<f8'", "float32"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(reverse=True), ["validation", "reverse"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].update(projection=2), ["unexpected keys ['projection']"]),
    (lambda m: m["model"]["children"]["rnn"]["options"].pop("peephole"), ["missing keys ['peephole']"]),
    (lambda m: m["arrays"][0].update(shape=[16, 4]), ["shape"]),
    (lambda m: m["arrays"][0].update(dtype="|O"), ["dtype"]),
    (lambda m: m["arrays"][0].update(name="rnn.other"), ["missing entries", "unexpected entries"]),
    (lambda m: m.update(extra=1), ["unexpected keys ['extra']"]),
    (lambda m: m.update(arrays={}), ["arrays"]),
    (lambda m: m.update(model=[]), ["model"]),
])
def test_edited_manifests_are_refused(sample, edit, fragments):
    _, raw = sample
    plain = edited(raw, edit, rehash=False)
    try:
        rehashed = edited(raw, edit)
    except KeyError:                # the manifest names an entry the archive lacks: no digest
        rehashed = plain
    assert_refused(rehashed, *fragments)
    # Without a new checksum the edit is refused too (by the check above or by the SHA-256).
    assert_refused(plain)


@pytest.mark.parametrize("new_name, fragments", [
    ("other.weight", ["'other.weight'", "not parameters of the Readout"]),
    ("rnn.weight_hh_l9", ["unexpected keys ['weight_hh_l9']", "missing keys ['weight_hh_l1']"]),
])
def test_renamed_arrays_with_a_valid_checksum_are_refused(sample, new_name, fragments):
    _, raw = sample
    entries = entries_of(raw)
    old_name = "rnn.weight_hh_l1"
    entries["arrays/" + new_name + ".npy"] = entries.pop("arrays/" + old_name + ".npy")
    manifest = json.loads(entries[MANIFEST])
    for entry in manifest["arrays"]:
        if entry["name"] == old_name:
            entry["name"] = new_name
    manifest["sha256"] = documented_digest(manifest, entries)
    entries[MANIFEST] = json.dumps(manifest).encode()
    assert_refused(zipped(entries), *fragments)


@pytest.mark.parametrize("digest, fragment", [
    ("0" * 63, "64 lowercase hex digits"), ("0" * 64, "does not match"), (None, "64 lowercase hex digits"),
])
def test_a_wrong_checksum_is_refused(sample, digest, fragment):
    _, raw = sample
    assert_refused(edited(raw, lambda m: m.update(sha256=digest), rehash=False), fragment)


def test_arrays_of_another_dtype_than_the_model_are_refused(sample):
    _, raw = sample
    entries = entries_of(raw)
    manifest = json.loads(entries[MANIFEST])
    for entry in manifest["arrays"]:
        key = "arrays/" + entry["name"] + ".npy"
        entries[key] = npy_bytes(np.load(io.BytesIO(entries[key])).astype(F32))
        entry["dtype"] = "<f4"
    manifest["sha256"] = documented_digest(manifest, entries)
    entries[MANIFEST] = json.dumps(manifest).encode()
    assert_refused(zipped(entries), "float64")


@pytest.mark.parametrize("text", [
    b"not json", b"\xff\xfe", b"[1, 2]", b'{"format": "fastgates.model", "format": "x"}',
    b'{"format": "fastgates.model", "format_version": NaN}', b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_json_is_refused(sample, text):
    _, raw = sample
    entries = entries_of(raw)
    entries[MANIFEST] = text
    assert_refused(zipped(entries))


def test_other_kinds_of_files_are_refused(tmp_path):
    assert_refused(b"", "empty")
    assert_refused(b"\x00" * 100, "not a ZIP archive")
    assert_refused(npy_bytes(np.zeros(4)), "not a ZIP archive")
    buf = io.BytesIO()
    np.savez(buf, weight=np.zeros(3))
    assert_refused(buf.getvalue(), "not a fastgates model file", "fastgates.json")
    buf = io.BytesIO()
    np.savez_compressed(buf, weight=np.zeros(3))
    assert_refused(buf.getvalue(), "not a fastgates model file")


# ---------------------------------------------------------------------------
# Nothing is ever unpickled
# ---------------------------------------------------------------------------


class Payload:
    """Unpickling this object creates the directory ``path`` (``os.mkdir(path)``)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def forbid_unpickling(mp):
    """Make any unpickling fail loudly while ``mp`` (a MonkeyPatch) is active."""
    def forbidden(*args, **kwargs):
        raise AssertionError("fastgates.load unpickled something")

    for name in ("load", "loads", "Unpickler"):
        mp.setattr(pickle, name, forbidden)


@pytest.fixture
def no_pickle(monkeypatch):
    forbid_unpickling(monkeypatch)


def object_npy(marker):
    data = npy_bytes(np.array([Payload(str(marker)), 1.0], dtype=object), allow_pickle=True)
    # The payload is live: numpy's own unpickling creates the marker.
    np.load(io.BytesIO(data), allow_pickle=True)
    assert marker.exists()
    marker.rmdir()
    return data


@pytest.mark.parametrize("claim", ["<f8", "|O"])
def test_object_arrays_are_refused_without_unpickling(sample, tmp_path, claim):
    _, raw = sample
    marker = tmp_path / "marker"
    entries = entries_of(raw)
    name = "rnn.bias_ih_l0"
    entries["arrays/" + name + ".npy"] = object_npy(marker)
    manifest = json.loads(entries[MANIFEST])
    for entry in manifest["arrays"]:
        if entry["name"] == name:
            entry.update(dtype=claim, shape=[2])
    entries[MANIFEST] = json.dumps(manifest).encode()
    with pytest.MonkeyPatch.context() as mp:      # after object_npy, which unpickles on purpose
        forbid_unpickling(mp)
        assert_refused(zipped(entries), "dtype", "'|O'")
    assert not marker.exists()


def test_a_pickle_in_a_zip_is_never_opened(tmp_path, no_pickle):
    """A PyTorch-style archive (``data.pkl``) is another kind of file, and its pickle stays shut."""
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(str(marker)))           # dumping is allowed, loading is not
    assert_refused(zipped({"archive/data.pkl": payload, "archive/version": b"3"}), "not a fastgates model file")
    entries = {MANIFEST: payload}
    assert_refused(zipped(entries), "not valid UTF-8 JSON")
    assert not marker.exists()


def test_loading_a_valid_file_never_unpickles(sample, no_pickle):
    model, raw = sample
    assert_bitwise(load_bytes(raw).state_dict(), model.state_dict())


def test_saved_files_hold_no_pickle(sample):
    _, raw = sample
    for name, data in entries_of(raw).items():
        if name.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)        # would raise for a pickle
        else:
            json.loads(data)


def test_public_api():
    assert "save" in fg.__all__ and "load" in fg.__all__
    assert fg.save.__module__ == "fastgates.io" and fg.load.__module__ == "fastgates.io"
    assert pathlib.Path(inspect.getsourcefile(fg.load)).name == "io.py"
