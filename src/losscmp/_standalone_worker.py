"""losscmp's worker for another interpreter (``--python LABEL=PATH``).

This file is self-contained on purpose: it imports only the standard library, torch
and numpy -- never losscmp -- so losscmp can hand it to an interpreter of another
virtual environment (a paper's pinned environment with an old torch, its own copy of
a package) that has torch and numpy but not losscmp.  Keep it runnable on Python 3.6
and torch 1.x: no walrus, no ``from __future__ import annotations``, no dataclasses,
no ``str.removeprefix``, no ``torch.frombuffer``.

Started as ``python -c BOOT THIS_FILE REQUEST_FD REPLY_FD PROTOCOL`` (see
``losscmp.interpreter``).  It answers a ``hello``, then serves requests one at a time.

Wire format, both directions (version ``PROTOCOL``): a message is
``u64 length | JSON header | u32 count | (u64 length | raw bytes) * count``; all
integers little-endian.  No pickle, no losscmp classes: a tensor is described in the
header by ``{"dtype", "shape", "stride"}`` and its values travel as the raw bytes of its
contiguous copy (bfloat16 as its int16 bits).

Requests: ``load`` (a reference: ``path/file.py:attr``, ``pkg.module:attr.sub``,
``...:Factory(key=literal)``) -> ``ready`` | ``load_error``; ``call`` (spec arguments,
keyword parameters, input tensors) -> ``outcome``; ``shutdown``.

A call is computed exactly like ``losscmp.run.call``: fresh copies of the inputs with
the same strides, gradients of the (scalar) value for every grad-requiring floating
input, the same failure statuses and messages, in-place mutation detection, the
warnings and prints kept with the outcome (prints at the Python level only: a C
extension's writes go to the worker's log), and torch's global switches restored after
the call.  ``tests/test_runners.py`` runs the same tricky implementations through both
and compares the outcomes, so the two cannot drift apart unnoticed.
"""
import ast
import faulthandler
import hashlib
import importlib
import importlib.util
import io
import json
import os
import struct
import sys
import threading
import time
import traceback
import warnings

PROTOCOL = 1
# What an implementation printed and warned is kept up to this many characters (losscmp.run.OUTPUT_LIMIT).
OUTPUT_LIMIT = 4000

_HEADER = struct.Struct("<Q")
_COUNT = struct.Struct("<I")

# dtype name -> (numpy dtype name of the bytes on the wire, torch dtype name)
_WIRE = {
    "float16": ("float16", "float16"),
    "bfloat16": ("int16", "bfloat16"),
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "complex64": ("complex64", "complex64"),
    "complex128": ("complex128", "complex128"),
    "int8": ("int8", "int8"),
    "uint8": ("uint8", "uint8"),
    "int16": ("int16", "int16"),
    "int32": ("int32", "int32"),
    "int64": ("int64", "int64"),
    "bool": ("bool", "bool"),
}


# ---------------------------------------------------------------------- framing
def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 24))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view[: 1 << 24])
        view = view[n:]


def read_message(fd):
    """(header dict, [bytes, ...]) from ``fd``."""
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    header = json.loads(_read_exact(fd, n).decode("utf-8"))
    (count,) = _COUNT.unpack(_read_exact(fd, _COUNT.size))
    buffers = []
    for _ in range(count):
        (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
        buffers.append(_read_exact(fd, size) if size else b"")
    return header, buffers


def write_message(fd, header, buffers=()):
    text = json.dumps(header, allow_nan=True).encode("utf-8")
    parts = [_HEADER.pack(len(text)), text, _COUNT.pack(len(buffers))]
    for b in buffers:
        parts.append(_HEADER.pack(len(b)))
        parts.append(b)
    # One write for small messages, so a reader never sees half a header from us.
    _write_all(fd, b"".join(parts))


# ---------------------------------------------------------------------- values
def encode_value(v):
    """A keyword parameter as JSON, keeping tuples and non-finite floats apart."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return {"float": repr(v)}
        return v
    if isinstance(v, (list, tuple)):
        return {"tuple" if isinstance(v, tuple) else "list": [encode_value(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: encode_value(x) for k, x in v.items()}}
    raise TypeError("a %s cannot be sent to another interpreter" % type(v).__name__)


def decode_value(v):
    if isinstance(v, dict):
        if "float" in v:
            return float(v["float"])
        if "tuple" in v:
            return tuple(decode_value(x) for x in v["tuple"])
        if "list" in v:
            return [decode_value(x) for x in v["list"]]
        if "dict" in v:
            return {k: decode_value(x) for k, x in v["dict"].items()}
    return v


def tensor_to_wire(t):
    """(meta, bytes) for a tensor: its dtype, shape and strides, and its values in order."""
    import torch

    t = t.detach()
    name = str(t.dtype).replace("torch.", "")
    if name not in _WIRE:
        raise TypeError("a tensor of dtype %s cannot be sent" % name)
    if t.layout != torch.strided:
        raise TypeError("a %s tensor cannot be sent" % str(t.layout).replace("torch.", ""))
    meta = {"dtype": name, "shape": list(t.shape), "stride": list(t.stride()), "device": str(t.device)}
    c = t.cpu().contiguous()
    if name == "bfloat16":
        c = c.view(torch.int16)
    raw = c.numpy().tobytes() if c.numel() else b""
    return meta, raw


def tensor_from_wire(meta, raw, device):
    """The tensor ``meta`` describes, on ``device``, with the recorded strides."""
    import numpy as np
    import torch

    np_name, torch_name = _WIRE[meta["dtype"]]
    dtype = getattr(torch, torch_name)
    shape, stride = tuple(meta["shape"]), tuple(meta["stride"])
    values = torch.from_numpy(np.frombuffer(bytearray(raw), dtype=np_name).copy()).reshape(shape)
    if torch_name == "bfloat16":
        values = values.view(torch.bfloat16)
    out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    try:
        return out.copy_(values)
    except RuntimeError:  # an overlapping layout (an expanded gradient): same values, dense
        return values.to(device)


# ---------------------------------------------------------------------- loading
def parse_reference(text):
    """``target:attr.sub(literal args)`` -> (target, [attrs], call or None)."""
    target, sep, expr = text.partition(":")
    # A Windows drive letter is part of the path, not the separator.
    if len(target) == 1 and expr[:1] in ("\\", "/"):
        more_target, sep, expr = expr.partition(":")
        target = target + ":" + more_target
    if not sep or not target or not expr:
        raise ValueError("%r: expected 'file.py:attr' or 'package.module:attr'" % text)
    node = ast.parse(expr, mode="eval").body
    call = None
    if isinstance(node, ast.Call):
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = dict((k.arg, ast.literal_eval(k.value)) for k in node.keywords)
        if None in kwargs:
            raise ValueError("%r: '**' is not allowed in a reference" % text)
        call, node = (args, kwargs), node.func
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ValueError("%r is not a dotted attribute name" % expr)
    attrs.insert(0, node.id)
    return target, attrs, call


def _is_path(target):
    return target.endswith(".py") or "/" in target or os.sep in target


def _package_root(path):
    root = None
    folder = os.path.dirname(path)
    while os.path.exists(os.path.join(folder, "__init__.py")):
        root = folder
        folder = os.path.dirname(folder)
    return root


def _forget_package(top):
    for name in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        del sys.modules[name]


def import_target(target):
    if not _is_path(target):
        return importlib.import_module(target)
    path = os.path.abspath(target)
    if not os.path.exists(path):
        raise ValueError("no such file: %s" % target)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "__init__.py")):
            raise ValueError("%s is a folder without __init__.py, not a package" % target)
        path = os.path.join(path, "__init__.py")
    elif not path.endswith(".py"):
        raise ValueError("%s is not a .py file" % target)
    root = _package_root(path)
    if root is None:
        # A lone file: a private module name; its folder first on the path for sibling imports.
        name = "_losscmp_impl_%s_%s" % (
            os.path.splitext(os.path.basename(path))[0], hashlib.sha1(path.encode()).hexdigest()[:10])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))
        spec.loader.exec_module(module)
        return module
    # A file inside a package: import it as part of *that* package.  This process
    # serves one implementation, so the fork's folder simply goes first on the path
    # and stays there (lazy imports inside the fork's functions find the fork too).
    search_dir = os.path.dirname(root)
    rel = os.path.relpath(os.path.splitext(path)[0], search_dir).split(os.sep)
    if rel[-1] == "__init__":
        rel.pop()
    _forget_package(os.path.basename(root))
    sys.path.insert(0, search_dir)
    importlib.invalidate_caches()
    return importlib.import_module(".".join(rel))


def load_reference(text):
    target, attrs, call = parse_reference(text)
    obj = import_target(target)
    walked = [target]
    for name in attrs:
        if not hasattr(obj, name):
            raise ValueError("%s has no attribute %r" % (".".join(walked), name))
        walked.append(name)
        obj = getattr(obj, name)
    if call is not None:
        obj = obj(*call[0], **call[1])
    if not callable(obj):
        raise ValueError("%r is a %s, which is not callable" % (text, type(obj).__name__))
    return obj


# ---------------------------------------------------------------------- calling
def _first_line(e):
    try:
        said = str(e)
    except Exception as why:  # an exception whose __str__ raises is still the implementation's failure
        said = "(its message could not be read: %s)" % type(why).__name__
    lines = said.strip().splitlines()
    return lines[0] if lines else ""


def one_line(e):
    text = "raised %s: %s" % (type(e).__name__, _first_line(e))
    return text.rstrip(": ")


def _type_name(x):
    # As losscmp.run._type_name: 'list', but 'numpy.float32'.
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else "%s.%s" % (t.__module__.split(".")[0], t.__qualname__)


def _same(a, b):
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool(torch.equal(a, b))


def _clone_like(t):
    import torch

    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device).copy_(t)


def call(fn, args, scalar, tensors, params):
    """losscmp.run.call, re-implemented: returns a dict (status, value, grads, error, seconds, mutated)."""
    import torch

    inputs = []
    for a in args:
        t = _clone_like(tensors[a["name"]])
        if a["grad"] and t.is_floating_point():
            t.requires_grad_(True)
        inputs.append(t)
    device = tensors[args[0]["name"]].device if args else torch.device("cpu")
    start = time.perf_counter()
    switches = _switches(torch)
    printed = io.StringIO()
    old_streams = sys.stdout, sys.stderr
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sys.stdout = sys.stderr = printed  # what it prints is kept with its outcome, as in process
            torch.set_grad_enabled(True)
            result = _call(fn, args, scalar, inputs, params, device)
    finally:  # what one call switched must not change the next (losscmp.run.torch_switches_kept)
        sys.stdout, sys.stderr = old_streams
        _restore_switches(torch, switches)
    result["seconds"] = time.perf_counter() - start
    said = (printed.getvalue() if not printed.closed else "") + "".join("%s: %s\n" % (w.category.__name__, w.message) for w in caught)
    result["output"] = said if len(said) <= OUTPUT_LIMIT else said[:OUTPUT_LIMIT] + "... (%d more characters)" % (len(said) - OUTPUT_LIMIT)
    try:
        result["mutated"] = [a["name"] for a, t in zip(args, inputs) if not _same(t.detach(), tensors[a["name"]])]
    except Exception as e:  # a CUDA context the call poisoned fails our own comparison too
        return {"status": "exception", "error": one_line(e), "seconds": result["seconds"], "mutated": [], "output": result["output"]}
    return result


def _switches(torch):
    """torch's global switches (what exists in this torch: 1.x lacks some)."""
    state = {"grad": torch.is_grad_enabled(), "dtype": torch.get_default_dtype(), "anomaly": torch.is_anomaly_enabled()}
    if hasattr(torch, "are_deterministic_algorithms_enabled"):
        warn_only = getattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: False)()
        state["deterministic"] = (torch.are_deterministic_algorithms_enabled(), warn_only)
    return state


def _restore_switches(torch, state):
    torch.set_grad_enabled(state["grad"])
    if torch.get_default_dtype() != state["dtype"]:
        torch.set_default_dtype(state["dtype"])
    if "deterministic" in state and _switches(torch).get("deterministic") != state["deterministic"]:
        on, warn_only = state["deterministic"]
        if hasattr(torch, "is_deterministic_algorithms_warn_only_enabled"):
            torch.use_deterministic_algorithms(on, warn_only=warn_only)
        else:
            torch.use_deterministic_algorithms(on)
    if torch.is_anomaly_enabled() != state["anomaly"]:
        torch.set_anomaly_enabled(state["anomaly"])


def _call(fn, args, scalar, inputs, params, device):
    import torch

    try:
        out = fn(*inputs, **params)
        if not isinstance(out, torch.Tensor):
            return {"status": "non_tensor", "error": "returned %s, not a tensor" % _type_name(out)}
        if out.layout != torch.strided or out.device.type == "meta":  # nothing losscmp could read values from
            what = "a meta tensor (it holds no values)" if out.device.type == "meta" else "a %s tensor" % str(out.layout).replace("torch.", "", 1)
            return {"status": "non_tensor", "error": "returned %s, not a dense tensor" % what}
        if scalar and out.numel() != 1:
            return {"status": "non_scalar", "error": "returned shape %s, expected a scalar" % (tuple(out.shape),)}
        grads = {}
        wanted = [(a["name"], t) for a, t in zip(args, inputs) if t.requires_grad]
        if wanted:
            if out.requires_grad:
                with torch.enable_grad():  # even if the implementation turned grad mode off on its way out
                    seed = out.reshape(()) if scalar else out.sum()
                got = torch.autograd.grad(seed, [t for _, t in wanted], allow_unused=True)
                grads = dict((name, (_plain(g.detach() if g.layout == torch.strided else g.detach().to_dense()) if g is not None else None))
                             for (name, _), g in zip(wanted, got))
            else:
                grads = dict((name, None) for name, _ in wanted)
        value = _plain(out.detach().reshape(()) if scalar else out.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except BaseException as e:  # the implementation's failure, whatever it raised, is a finding
        return {"status": "exception", "error": one_line(e)}
    return {"status": "ok", "value": value, "grads": grads}


def _plain(t):
    """The same data as a plain tensor: a subclass's __torch_function__ runs here, not while packing."""
    import torch

    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def poisons_cuda(error):
    """Errors after which this process's CUDA context cannot be trusted (or memory is short)."""
    text = error or ""
    return any(s in text for s in ("CUDA error", "CUDA out of memory", "OutOfMemoryError", "AcceleratorError",
                                   "CUBLAS_STATUS", "CUDNN_STATUS", "cuda runtime error"))


# ---------------------------------------------------------------------- the loop
def _die_with_parent(lifeline_fd):
    """Exit when losscmp dies, even in the middle of a hanging call."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass

    def watch():
        try:
            while os.read(lifeline_fd, 1):
                pass
        except OSError:
            pass
        os._exit(70)

    thread = threading.Thread(target=watch, name="losscmp-lifeline")
    thread.daemon = True
    thread.start()


def main(argv):
    request_fd, reply_fd, lifeline_fd, wanted = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is losscmp's business
    except Exception:
        pass
    _die_with_parent(lifeline_fd)
    faulthandler.enable(sys.stderr, all_threads=False)
    if wanted != PROTOCOL:
        write_message(reply_fd, {"type": "fatal", "reason": "protocol", "protocol": PROTOCOL,
                                 "detail": "the worker speaks protocol %d, losscmp wants %d" % (PROTOCOL, wanted)})
        return
    hello = {"type": "hello", "protocol": PROTOCOL, "python": "%d.%d.%d" % sys.version_info[:3], "pid": os.getpid()}
    try:
        import numpy
        import torch
    except Exception as e:
        hello.update(type="fatal", reason="missing", detail="%s: %s" % (type(e).__name__, _first_line(e)))
        write_message(reply_fd, hello)
        return
    hello["torch"] = torch.__version__
    hello["numpy"] = numpy.__version__
    hello["cuda"] = torch.version.cuda
    write_message(reply_fd, hello)
    fn = None
    while True:
        try:
            header, buffers = read_message(request_fd)
        except EOFError:
            return
        kind = header.get("type")
        if kind == "shutdown":
            return
        if kind == "load":
            try:
                fn = load_reference(header["ref"])
            except BaseException as e:
                if isinstance(e, (ValueError, SyntaxError)) and not isinstance(e, ImportError):
                    why = _first_line(e)
                else:
                    why = "%s: %s" % (type(e).__name__, _first_line(e))
                write_message(reply_fd, {"type": "load_error", "error": why})
                continue
            write_message(reply_fd, {"type": "ready"})
            continue
        if kind != "call" or fn is None:
            write_message(reply_fd, {"type": "fatal", "reason": "protocol", "protocol": PROTOCOL,
                                     "detail": "unexpected request %r" % kind})
            return
        reply, out_buffers = _serve_call(fn, header, buffers)
        write_message(reply_fd, reply, out_buffers)
        if reply.get("restart"):
            return  # a fresh process gets a fresh CUDA context


def _serve_call(fn, header, buffers):
    import torch

    try:
        device = torch.device(header["device"])
        tensors = {}
        for meta, raw in zip(header["tensors"], buffers):
            tensors[meta["name"]] = tensor_from_wire(meta, raw, device)
        params = dict((k, decode_value(v)) for k, v in header["params"].items())
    except Exception as e:  # a device this process cannot use, say
        return {"type": "outcome", "status": "exception",
                "error": "the worker could not rebuild the inputs: %s: %s" % (type(e).__name__, _first_line(e)),
                "seconds": 0.0, "mutated": [], "value": None, "grads": {}}, []
    result = call(fn, header["args"], header["scalar"], tensors, params)
    reply = {"type": "outcome", "status": result["status"], "error": result.get("error"),
             "seconds": result["seconds"], "mutated": result["mutated"], "output": result.get("output", ""),
             "value": None, "grads": {}}
    out_buffers = []
    try:
        if result.get("value") is not None:
            reply["value"], raw = tensor_to_wire(result["value"])
            out_buffers.append(raw)
        for name, g in result.get("grads", {}).items():
            if g is None:
                reply["grads"][name] = None
            else:
                reply["grads"][name], raw = tensor_to_wire(g)
                out_buffers.append(raw)
    except Exception as e:  # a value that cannot travel (a sparse tensor, a poisoned context)
        reply.update(status="exception", error="result could not be sent back: %s: %s" % (type(e).__name__, _first_line(e)),
                     value=None, grads={})
        out_buffers = []
    if device.type == "cuda" and reply["status"] == "exception" and poisons_cuda(reply["error"]):
        reply["restart"] = True  # this context is suspect: losscmp starts a fresh worker
    return reply, out_buffers


if __name__ == "__main__":  # pragma: no cover - started through BOOT in losscmp.interpreter
    try:
        main(sys.argv[1:])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
