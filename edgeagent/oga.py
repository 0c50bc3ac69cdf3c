"""onnxruntime-genai through its C API, with the GIL released while the model runs.

The package's Python binding (0.18) holds the GIL for the whole of every call:
``Generator.generate_next_token`` (~10 ms a token here), ``append_tokens`` (a prefill
chunk: up to hundreds of ms), the creation of a generator, the loading of a model. Every
other thread of the daemon, the HTTP event loop and the MQTT network thread among them,
then gets the GIL only between two such calls, and a thread that makes system calls (each
one gives the GIL up) waits about one model call per call: reading /proc/meminfo for the
memory guard took 277 ms instead of 0.8 ms beside a decoding generator, and a request that
arrived while others ran waited that long before it was even queued (docs/engine-notes.md,
"Late arrivals, session 5").

So the engine calls the same library through its C API (``ort_genai_c.h``, exported by the
``libonnxruntime-genai.so`` the package ships and its binding links) with ctypes, which
releases the GIL for the duration of a foreign call. The heavy calls go through such a
handle; the cheap ones (token readback, tokenizer) through a ``PyDLL`` handle, which keeps
the GIL: they stay serialized with the rest of the daemon as they were under the binding,
so the tokenizer, which the transports' threads also use, is never entered by two threads
at once. The generator's own calls come from the scheduler's thread only.

The classes mirror the binding's names (``Model``, ``Tokenizer``, ``TokenizerStream``,
``GeneratorParams``, ``Generator``) for the part of it the engine uses.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai  # loads libonnxruntime first (its _dll_directory)

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I32P = ctypes.POINTER(ctypes.c_int32)
_FLOAT32 = 1  # OgaElementType_float32

_LIB_PATH = Path(onnxruntime_genai.__file__).parent / "libonnxruntime-genai.so"
_free = ctypes.CDLL(str(_LIB_PATH))  # calls release the GIL
_held = ctypes.PyDLL(str(_LIB_PATH))  # calls keep it


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


# Model calls under way, the GIL released, on any thread; at exit, nothing is freed under
# one (a daemon thread may still be in a step when the interpreter finalizes).
_state = threading.Condition()
_busy = 0
_closed = False


def _counted(fn: Any) -> Any:
    def call(*args: Any) -> Any:
        global _busy
        with _state:
            if _closed:
                raise OgaError("onnxruntime-genai is shut down: the process is exiting")
            _busy += 1
        try:
            return fn(*args)
        finally:
            with _state:
                _busy -= 1
                if _closed:
                    _state.notify_all()  # _close_all waits for the last call
    return call


# The GIL released: the model's work.
_create_model = _counted(_declare(_free, "OgaCreateModelFromConfig", _P, _P, _PP))
_create_generator = _counted(_declare(_free, "OgaCreateGenerator", _P, _P, _P, _PP))
_append_tokens = _counted(_declare(_free, "OgaGenerator_AppendTokens", _P, _P, _I32P,
                                   ctypes.c_size_t))
_generate_next = _counted(_declare(_free, "OgaGenerator_GenerateNextToken", _P, _P))
# Runs the model when the step's logits are not computed yet (a rewrite reads them first).
_get_logits = _counted(_declare(_free, "OgaGenerator_GetLogits", _P, _P, _PP))
_destroy_generator = _declare(_free, "OgaDestroyGenerator", None, _P)  # frees its KV cache
_destroy_model = _declare(_free, "OgaDestroyModel", None, _P)
# The GIL kept: bookkeeping, readback and text.
_result_error = _declare(_held, "OgaResultGetError", ctypes.c_char_p, _P)
_destroy_result = _declare(_held, "OgaDestroyResult", None, _P)
_destroy_string = _declare(_held, "OgaDestroyString", None, _P)
_create_config = _declare(_held, "OgaCreateConfig", _P, ctypes.c_char_p, _PP)
_config_overlay = _declare(_held, "OgaConfigOverlay", _P, _P, ctypes.c_char_p)
_destroy_config = _declare(_held, "OgaDestroyConfig", None, _P)
_create_params = _declare(_held, "OgaCreateGeneratorParams", _P, _P, _PP)
_destroy_params = _declare(_held, "OgaDestroyGeneratorParams", None, _P)
_set_number = _declare(_held, "OgaGeneratorParamsSetSearchNumber", _P, _P, ctypes.c_char_p,
                       ctypes.c_double)
_set_bool = _declare(_held, "OgaGeneratorParamsSetSearchBool", _P, _P, ctypes.c_char_p,
                     ctypes.c_bool)
_is_done = _declare(_held, "OgaGenerator_IsDone", ctypes.c_bool, _P)
_next_tokens = _declare(_held, "OgaGenerator_GetNextTokens", _P, _P,
                        ctypes.POINTER(_I32P), ctypes.POINTER(ctypes.c_size_t))
_sequence_count = _declare(_held, "OgaGenerator_GetSequenceCount", ctypes.c_size_t, _P,
                           ctypes.c_size_t)
_sequence_data = _declare(_held, "OgaGenerator_GetSequenceData", _I32P, _P, ctypes.c_size_t)
_set_logits = _declare(_held, "OgaGenerator_SetLogits", _P, _P, _P)
_rewind_to = _declare(_held, "OgaGenerator_RewindTo", _P, _P, ctypes.c_size_t)
_tensor_from_buffer = _declare(_held, "OgaCreateTensorFromBuffer", _P, _P,
                               ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.c_int,
                               _PP)
_tensor_rank = _declare(_held, "OgaTensorGetShapeRank", _P, _P,
                        ctypes.POINTER(ctypes.c_size_t))
_tensor_shape = _declare(_held, "OgaTensorGetShape", _P, _P, ctypes.POINTER(ctypes.c_int64),
                         ctypes.c_size_t)
_tensor_data = _declare(_held, "OgaTensorGetData", _P, _P, _PP)
_destroy_tensor = _declare(_held, "OgaDestroyTensor", None, _P)
_create_tokenizer = _declare(_held, "OgaCreateTokenizer", _P, _P, _PP)
_destroy_tokenizer = _declare(_held, "OgaDestroyTokenizer", None, _P)
_eos_ids = _declare(_held, "OgaTokenizerGetEosTokenIds", _P, _P, ctypes.POINTER(_I32P),
                    ctypes.POINTER(ctypes.c_size_t))
_create_sequences = _declare(_held, "OgaCreateSequences", _P, _PP)
_destroy_sequences = _declare(_held, "OgaDestroySequences", None, _P)
_seqs_count = _declare(_held, "OgaSequencesGetSequenceCount", ctypes.c_size_t, _P,
                       ctypes.c_size_t)
_seqs_data = _declare(_held, "OgaSequencesGetSequenceData", _I32P, _P, ctypes.c_size_t)
_encode = _declare(_held, "OgaTokenizerEncode", _P, _P, ctypes.c_char_p, _P)
_decode = _declare(_held, "OgaTokenizerDecode", _P, _P, _I32P, ctypes.c_size_t, _PP)
_chat_template = _declare(_held, "OgaTokenizerApplyChatTemplate", _P, _P, ctypes.c_char_p,
                          ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool, _PP)
_create_stream = _declare(_held, "OgaCreateTokenizerStream", _P, _P, _PP)
_destroy_stream = _declare(_held, "OgaDestroyTokenizerStream", None, _P)
_stream_decode = _declare(_held, "OgaTokenizerStreamDecode", _P, _P, ctypes.c_int32,
                          ctypes.POINTER(ctypes.c_char_p))


class OgaError(RuntimeError):
    """A call onnxruntime-genai refused, with its message."""


def _check(result: int | None) -> None:
    if result:
        message = (_result_error(result) or b"").decode("utf-8", "replace")
        _destroy_result(result)
        raise OgaError(message)


def _out(fn: Any, *args: Any) -> int:
    """Call a ``fn(..., T** out)`` and return ``*out``."""
    out = ctypes.c_void_p()
    _check(fn(*args, ctypes.byref(out)))
    assert out.value is not None
    return out.value


def _take_string(fn: Any, *args: Any) -> str:
    """Call a ``fn(..., const char** out)`` whose string the caller frees."""
    out = ctypes.c_void_p()
    _check(fn(*args, ctypes.byref(out)))
    try:
        return ctypes.string_at(out.value).decode("utf-8", "replace") if out.value else ""
    finally:
        _destroy_string(out.value)


def _copy(data: Any, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A NumPy copy of the library's buffer at ``data`` (one memmove)."""
    out: np.ndarray = np.empty(shape, dtype)
    if out.nbytes:
        ctypes.memmove(out.ctypes.data, data, out.nbytes)
    return out


def _tokens(values: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.int32).reshape(-1))


def _ptr(array: np.ndarray) -> Any:
    return array.ctypes.data_as(_I32P)


# Every handle alive, so that they are freed before the package's own shutdown
# (OgaShutdown when its module is torn down) rather than reported as leaks after it.
_live: weakref.WeakSet[_Handle] = weakref.WeakSet()


class _Handle:
    _destroy: Any = None
    _order = 0  # freed in this order at exit: generators before models
    _handle: int | None = None

    def __init__(self, handle: int, owner: _Handle | None = None) -> None:
        self._handle: int | None = handle
        self._owner = owner  # outlives this handle (a model its generators, ...)
        with _state:
            _live.add(self)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise OgaError(f"{type(self).__name__} is closed")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            type(self)._destroy(handle)

    def __del__(self) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    """Free every handle before the package's own shutdown, once no model call is under way
    (none starts after this); with one still running after 30 s, free nothing."""
    global _closed
    with _state:
        _closed = True
        if not _state.wait_for(lambda: _busy == 0, timeout=30):
            return
        handles = sorted(_live, key=lambda h: h._order)
    for handle in handles:
        handle.close()


class Model(_Handle):
    """A model loaded from its folder, with a genai_config overlay (a JSON object)."""

    _destroy = _destroy_model
    _order = 4

    def __init__(self, path: Path | str, overlay: dict[str, Any] | None = None) -> None:
        config = _out(_create_config, str(path).encode())
        try:
            if overlay:
                _check(_config_overlay(config, json.dumps(overlay).encode()))
            super().__init__(_out(_create_model, config))
        finally:
            _destroy_config(config)


class Tokenizer(_Handle):
    _destroy = _destroy_tokenizer
    _order = 3

    def __init__(self, model: Model) -> None:
        super().__init__(_out(_create_tokenizer, model.handle), model)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = _I32P()
        count = ctypes.c_size_t()
        _check(_eos_ids(self.handle, ctypes.byref(ids), ctypes.byref(count)))
        return tuple(int(ids[i]) for i in range(count.value))

    def encode(self, text: str) -> np.ndarray:
        sequences = _out(_create_sequences)
        try:
            _check(_encode(self.handle, text.encode(), sequences))
            return _copy(_seqs_data(sequences, 0), (_seqs_count(sequences, 0),), np.int32)
        finally:
            _destroy_sequences(sequences)

    def decode(self, tokens: Iterable[int] | np.ndarray) -> str:
        array = _tokens(tokens)
        return _take_string(_decode, self.handle, _ptr(array), len(array))

    def apply_chat_template(self, messages: str, add_generation_prompt: bool = True) -> str:
        """``messages`` as JSON, rendered by the model's own chat template."""
        return _take_string(_chat_template, self.handle, None, messages.encode(), None,
                            add_generation_prompt)

    def create_stream(self) -> TokenizerStream:
        return TokenizerStream(self)


class TokenizerStream(_Handle):
    """Decodes one token at a time, holding back the bytes of an unfinished character."""

    _destroy = _destroy_stream
    _order = 1

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(_out(_create_stream, tokenizer.handle), tokenizer)

    def decode(self, token: int) -> str:
        out = ctypes.c_char_p()  # the stream's own buffer, valid until its next call
        _check(_stream_decode(self.handle, int(token), ctypes.byref(out)))
        return (out.value or b"").decode("utf-8", "replace")


class GeneratorParams(_Handle):
    _destroy = _destroy_params
    _order = 2

    def __init__(self, model: Model) -> None:
        super().__init__(_out(_create_params, model.handle), model)

    def set_search_options(self, **options: float | bool) -> None:
        for name, value in options.items():
            if isinstance(value, bool):
                _check(_set_bool(self.handle, name.encode(), value))
            else:
                _check(_set_number(self.handle, name.encode(), float(value)))


class Generator(_Handle):
    """A batch of sequences and their KV cache. Creating one allocates that cache for the
    search's whole ``max_length``; ``append_tokens``, ``get_logits`` and
    ``generate_next_token`` run the model. All four release the GIL."""

    _destroy = _destroy_generator
    _order = 0

    def __init__(self, model: Model, params: GeneratorParams) -> None:
        super().__init__(_out(_create_generator, model.handle, params.handle), model)

    def append_tokens(self, tokens: np.ndarray) -> None:
        """The tokens of every row, row after row (a 2-D array of the batch's rows)."""
        array = _tokens(tokens)
        _check(_append_tokens(self.handle, _ptr(array), len(array)))

    def generate_next_token(self) -> None:
        _check(_generate_next(self.handle))

    def is_done(self) -> bool:
        return bool(_is_done(self.handle))

    def get_next_tokens(self) -> np.ndarray:
        data = _I32P()
        count = ctypes.c_size_t()
        _check(_next_tokens(self.handle, ctypes.byref(data), ctypes.byref(count)))
        return _copy(data, (count.value,), np.int32)

    def get_sequence(self, index: int) -> np.ndarray:
        n = _sequence_count(self.handle, index)
        return _copy(_sequence_data(self.handle, index), (n,), np.int32)

    def get_logits(self) -> np.ndarray:
        """The next token's logits, (rows, 1, vocabulary), a copy; computing them runs the
        model (``generate_next_token`` then only draws)."""
        tensor = _out(_get_logits, self.handle)
        try:
            rank = ctypes.c_size_t()
            _check(_tensor_rank(tensor, ctypes.byref(rank)))
            shape = (ctypes.c_int64 * rank.value)()
            _check(_tensor_shape(tensor, shape, rank.value))
            return _copy(_out(_tensor_data, tensor), tuple(int(d) for d in shape), np.float32)
        finally:
            _destroy_tensor(tensor)

    def set_logits(self, logits: np.ndarray) -> None:
        """Replace the last step's logits (the shape ``get_logits`` gave) before the search
        draws the next token."""
        array = np.ascontiguousarray(logits, dtype=np.float32)
        shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        tensor = _out(_tensor_from_buffer, array.ctypes.data, shape, array.ndim, _FLOAT32)
        try:
            _check(_set_logits(self.handle, tensor))
        finally:
            _destroy_tensor(tensor)

    def rewind_to(self, length: int) -> None:
        _check(_rewind_to(self.handle, length))
