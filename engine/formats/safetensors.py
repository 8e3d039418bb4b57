"""HF safetensors checkpoints: one file or a sharded directory, plus config.json and tokenizer.json.

The reader parses the safetensors header itself (8-byte length, JSON, raw data) and memory-maps
the data, so opening reads only the header and `get(name)` converts just that tensor. That also
covers BF16, which the safetensors numpy API cannot return: its bits are the upper half of an
f32, widened exactly. The writer goes through the `safetensors` package, so files we write are
whatever that package (and therefore transformers) reads.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.errors import FormatError, UnsupportedModelError
from engine.fileio import atomic_output, loads_json, open_regular
from engine.formats.common import MAX_ELEMENTS, check_weights, hf_ordered, stored_tensor_names
from engine.formats.hf_config import hf_config_to_model_config, model_config_to_hf_config
from engine.model import Model, WeightStoreBase, check_row_range
from engine.tokenizer import BpeTokenizer, bpe_from_tokenizer_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own limit

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie in one memory-mapped file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset in the file."""
    nbytes: int


class SafetensorsWeightStore(WeightStoreBase):
    """Canonical-name float32 tensors from one or more memory-mapped safetensors files."""

    def __init__(self, entries: dict[str, _Entry], source: str) -> None:
        self._entries = entries
        self._maps: dict[Path, np.memmap] = {}
        self.source = source

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def get(self, name: str) -> np.ndarray:
        return self._decode(name, self._entry(name))

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor: a plain byte range of the memory map."""
        entry = self._entry(name)
        start, stop = check_row_range(str(entry.file), name, entry.shape, start, stop)
        cols = entry.shape[1]
        row_nbytes = cols * _DTYPES[entry.dtype].itemsize if entry.dtype in _DTYPES else 0
        rows = replace(
            entry,
            shape=(stop - start, cols),
            start=entry.start + start * row_nbytes,
            nbytes=(stop - start) * row_nbytes,
        )
        return self._decode(name, rows)

    def _decode(self, name: str, entry: _Entry) -> np.ndarray:
        """float32 values of `entry`'s byte range, in its shape."""
        raw = np.asarray(
            self._map(entry.file)[entry.start : entry.start + entry.nbytes]
        )  # [nbytes] u8
        if entry.dtype not in _DTYPES:
            raise UnsupportedModelError(
                f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, expected F32, F16 or BF16"
            )
        values = raw.view(_DTYPES[entry.dtype])
        if entry.dtype == "BF16":
            # bf16 is the top 16 bits of an f32: shift into place, reinterpret, exact.
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32).reshape(entry.shape)

    def close(self) -> None:
        self._maps.clear()

    def _map(self, path: Path) -> np.memmap:
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path]


def read_header(path: Path) -> dict[str, _Entry]:
    """The tensor table of one safetensors file, every offset checked against the file size."""
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise FormatError(
                    f"{path}: truncated safetensors file ({size} bytes, no header length)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise FormatError(
                    f"{path}: safetensors header length {header_len} exceeds the file ({size} bytes)"
                )
            header_bytes = handle.read(header_len)
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        header = loads_json(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: safetensors header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _parse_entry(path, name, info, data_start, data_size)
    return entries


def _parse_entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> _Entry:
    if not isinstance(info, dict):
        raise FormatError(f"{path}: tensor {name!r} has no header record")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"{path}: tensor {name!r} has no dtype")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise FormatError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise FormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise FormatError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}]: "
            + ("a negative start" if begin < 0 else "its end comes before its start")
        )
    if end > data_size:
        raise FormatError(
            f"{path}: tensor {name!r} data [{begin}, {end}) lies past the end of the file "
            f"(data section is {data_size} bytes)"
        )
    count = 1
    for dim in shape:
        count *= dim
        if count > MAX_ELEMENTS:
            raise FormatError(f"{path}: tensor {name!r} shape {shape} is absurdly large")
    itemsize = {
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "F64": 8,
        "I8": 1,
        "U8": 1,
        "I16": 2,
        "I32": 4,
        "I64": 8,
    }
    if dtype in itemsize and count * itemsize[dtype] != end - begin:
        raise FormatError(
            f"{path}: tensor {name!r} is {end - begin} bytes, its {dtype} shape {shape} needs "
            f"{count * itemsize[dtype]}"
        )
    return _Entry(path, dtype, tuple(shape), data_start + begin, end - begin)


def open_safetensors(path: Path) -> Model:
    """A model from a .safetensors file (config.json beside it) or an HF checkpoint directory."""
    directory = path if path.is_dir() else path.parent
    source = str(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FormatError(f"{source}: missing {CONFIG_FILE} (expected at {config_path})")
    try:
        spec = loads_json(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{config_path}: unreadable config.json: {error}") from None
    if not isinstance(spec, dict):
        raise FormatError(f"{config_path}: config.json is not a JSON object")
    config = hf_config_to_model_config(spec, str(config_path))

    entries: dict[str, _Entry] = {}
    for file in _weight_files(path, directory):
        for name, entry in read_header(file).items():
            if name in entries:
                raise FormatError(f"{file}: tensor {name!r} appears in more than one shard")
            entries[name] = entry
    weights = SafetensorsWeightStore(entries, source)
    check_weights(config, weights, source)
    for name in entries:
        if entries[name].dtype not in _DTYPES and name.endswith((".weight", ".bias")):
            raise UnsupportedModelError(
                f"{entries[name].file}: tensor {name!r} has dtype {entries[name].dtype}, "
                "expected F32, F16 or BF16"
            )

    tokenizer, add_bos, error = _tokenizer(directory, config.bos_token_id, config.eos_token_id)
    if add_bos:
        config = replace(config, add_bos=True)
    metadata: dict = {"name": directory.name, "architecture": spec.get("model_type")}
    if error:
        metadata["tokenizer_error"] = error
    return Model(
        path=path,
        format="safetensors",
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        metadata=metadata,
    )


def _weight_files(path: Path, directory: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            index = loads_json(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FormatError(f"{index_path}: unreadable shard index: {error}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise FormatError(
                f'{index_path}: shard index has no "weight_map" object (tensor name -> shard file)'
            )
        if not all(
            isinstance(shard, str) and shard and "\0" not in shard for shard in weight_map.values()
        ):
            raise FormatError(f'{index_path}: every "weight_map" value must be a shard file name')
        files = []
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if shard_path.parent != directory or not shard_path.is_file():
                raise FormatError(f"{index_path}: shard {shard!r} is missing from {directory}")
            files.append(shard_path)
        return files
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FormatError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} in the directory"
        + (f" ({len(found)} .safetensors files without an index)" if found else "")
    )


def _tokenizer(
    directory: Path, bos: int | None, eos: int | None
) -> tuple[BpeTokenizer | None, bool, str | None]:
    """The tokenizer.json beside the weights (if any), whether to add BOS, and why none."""
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        return None, False, f"no {TOKENIZER_FILE} in {directory}"
    try:
        tokenizer = bpe_from_tokenizer_json(tokenizer_path)
    except Exception as error:  # a broken tokenizer must not stop weights from loading
        return None, False, str(error).splitlines()[0]
    tokenizer.bos_token_id, tokenizer.eos_token_id = bos, eos
    add_bos = False
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        try:
            add_bos = bool(loads_json(config_path.read_text(encoding="utf-8")).get("add_bos_token"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            add_bos = False
    return tokenizer, add_bos, None


def write(model: Model, directory: Path | str) -> Path:
    """An HF checkpoint directory: model.safetensors (F32), config.json, tokenizer files.

    Each file goes to a temporary name in `directory` and is renamed into place.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {
        name: hf_ordered(config, name, model.weights.get(name))
        for name in stored_tensor_names(model)
    }
    _atomic(directory / SINGLE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    spec = model_config_to_hf_config(replace(config, rope_pairing="half"))
    _atomic_text(directory / CONFIG_FILE, json.dumps(spec, indent=2) + "\n")
    tokenizer = model.tokenizer
    if isinstance(tokenizer, BpeTokenizer):
        _atomic_text(directory / TOKENIZER_FILE, tokenizer.to_tokenizer_json())
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": model.config.add_bos,
            "bos_token": _token_or_none(tokenizer, model.config.bos_token_id),
            "eos_token": _token_or_none(tokenizer, model.config.eos_token_id),
            "model_max_length": spec["max_position_embeddings"],
        }
        _atomic_text(
            directory / TOKENIZER_CONFIG_FILE, json.dumps(tokenizer_config, indent=2) + "\n"
        )
    return directory


def _token_or_none(tokenizer: BpeTokenizer, token_id: int | None) -> str | None:
    if token_id is None or not 0 <= token_id < tokenizer.vocab_size:
        return None
    return tokenizer.tokens[token_id]


def _atomic(target: Path, write_to) -> None:
    with atomic_output(target) as temp:
        write_to(str(temp))


def _atomic_text(target: Path, text: str) -> None:
    _atomic(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
