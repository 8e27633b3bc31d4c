"""Read the tensors of a CLIP checkpoint from a local file, whatever form it was saved in.

Forms: an open_clip state_dict (`.pt/.pth/.bin`), `.safetensors`, an open_clip training
checkpoint (`{"state_dict": ...}`, keys possibly prefixed `module.`), and an OpenAI CLIP
TorchScript archive. Nothing is ever unpickled beyond tensors: pickles go through
`torch.load(weights_only=True)`, and TorchScript archives through a restricted unpickler of
our own that builds tensors and inert attribute holders and refuses every other global, so
no code in the file (Python or TorchScript) runs.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cbpt_guard.errors import UsageError, UserError

FORMATS = ("state_dict", "safetensors", "training_checkpoint", "openai_torchscript")
# OpenAI archives carry these as scalars beside the weights; they are not parameters.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: str  # one of FORMATS
    state_dict: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read every tensor of a checkpoint file into float32 CPU tensors with open_clip names."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}", "check the path")
    if not path.is_file():
        raise UsageError(f"checkpoint is not a file: {path}", "pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty: {path}", "the file has 0 bytes; re-copy it")

    _check_zip_sizes(path)
    if _is_safetensors(path):
        fmt, raw = "safetensors", _read_safetensors(path)
    elif _is_torchscript(path):
        fmt, raw = "openai_torchscript", _read_torchscript(path)
    else:
        obj = _torch_load(path)
        fmt, raw = _unwrap(obj, path)
    return Checkpoint(path=path, format=fmt, state_dict=_normalise(raw, path))


# A stored zip holds what its entries say; weights compress little. An entry that claims more
# than this times the file's own size is a zip bomb, refused before anything is inflated.
MAX_INFLATION = 4


def _check_zip_sizes(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return
    limit = MAX_INFLATION * path.stat().st_size + (1 << 20)
    with zipfile.ZipFile(path) as z:
        big = [i for i in z.infolist() if i.file_size > limit]
    if big:
        raise UserError(
            f"refused to load {path}: its entry {big[0].filename} would inflate to {big[0].file_size:,} "
            f"bytes from a {path.stat().st_size:,}-byte file (a zip bomb)",
            "pass the original checkpoint",
        )


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # A safetensors file starts with an 8-byte little-endian header length, then JSON.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"not a readable safetensors file: {path} ({e})", "re-export it with safetensors") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torch_load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except RuntimeError as e:
            if "not resizable" not in str(e):
                raise
            # a checkpoint re-zipped with compression cannot be memory-mapped: read it whole
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg or "not an allowed global" in msg:
            offender = _offending_global(msg)
            raise UserError(
                f"refused to load {path}: its pickle names {offender}, which is not a tensor type "
                "and could run code when unpickled; nothing was executed",
                "save only the state_dict (torch.save(model.state_dict(), ...)) or use safetensors",
            ) from None
        raise UserError(f"not a checkpoint: {path} is not a PyTorch or safetensors file", "pass a model file") from None
    except Exception as e:  # arbitrary bytes make the legacy loader raise almost anything
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0]  # torch's reader appends advice that does not apply here
        raise UserError(
            f"not a checkpoint: {path} could not be read as PyTorch or safetensors ({first[:160]})",
            "pass an open_clip state_dict, .safetensors, training checkpoint or OpenAI archive",
        ) from None


def _offending_global(msg: str) -> str:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in msg:
            return "`" + msg.split(marker, 1)[1].split()[0].rstrip(".,") + "`"
    return "a non-tensor object"


def _unwrap(obj: object, path: Path) -> tuple[str, dict]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return "training_checkpoint", obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict", obj
    if isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict", {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    kind = type(obj).__name__
    raise UserError(
        f"not a checkpoint: {path} holds a {kind} with no tensors",
        "pass a state_dict, a {'state_dict': ...} training checkpoint, .safetensors or an OpenAI archive",
    )


def _normalise(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"not a checkpoint: {path} contains no tensors", "pass a model file")
    # DataParallel / DistributedDataParallel wrap every key in `module.`.
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    for key in _OPENAI_EXTRAS:
        t = tensors.get(key)
        if t is not None and t.ndim == 0 and not t.is_floating_point():
            del tensors[key]
    # OpenAI archives are fp16; every later step (inversion, export parity) works in fp32.
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


# --- OpenAI TorchScript archives -------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


# Scripted modules store typed lists through these; they only wrap plain values.
_LIST_BUILDERS = {
    "build_intlist": list,
    "build_doublelist": list,
    "build_boollist": list,
    "build_tensorlist": list,
    "restore_type_tag": lambda value, _type: value,
}


class _ScriptObject:
    """An inert stand-in for a TorchScript module: it only records its attributes.

    The pickle creates it with NEWOBJ (no __init__) and fills it with BUILD (__setstate__)."""

    qualname = "__torch__"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, dict):
            self.__dict__.setdefault("attrs", {}).update(state)

    @property
    def fields(self) -> dict:
        return self.__dict__.get("attrs", {})


def _script_class(qualname: str) -> type:
    return type("ScriptObject", (_ScriptObject,), {"qualname": qualname})


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """A tensor of the archive, refused when it claims more elements than its stored bytes
    hold (a zero-stride view of a few bytes would otherwise be materialised at any size)."""
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    numel = math.prod(size)
    extent = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if numel else 0
    if numel > storage.numel() or extent > storage.numel() or offset < 0 or min(stride, default=0) < 0:
        raise pickle.UnpicklingError(f"Damaged tensor: {list(size)} elements over a storage of {storage.numel()}")
    return torch.as_strided(storage, size, stride, offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path = zf, prefix, path

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return _LIST_BUILDERS[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', dtype, key, location, numel): raw bytes live in <prefix>/data/<key>.
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError("Unsupported persistent id in TorchScript archive")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("Unsupported storage type in TorchScript archive")
        buf = bytearray(self._zf.read(f"{self._prefix}data/{key}"))
        if not buf:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype)


def _read_torchscript(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise UserError(f"not a checkpoint: {path} is a zip without TorchScript data", "pass a model file")
            prefix = pkl[: -len("data.pkl")]
            root = _TorchScriptUnpickler(zf.read(pkl), zf, prefix, path).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("Damaged tensor"):
            raise UserError(
                f"refused to load {path}: {e} (a memory bomb, or a damaged archive)", "re-download it"
            ) from None
        offender = _offending_global(str(e))
        raise UserError(
            f"refused to load {path}: its TorchScript data names {offender}, which is not a tensor "
            "type or a TorchScript module; nothing was executed",
            "export the weights as a state_dict or safetensors",
        ) from None
    except (zipfile.BadZipFile, KeyError, EOFError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(
            f"not a checkpoint: {path} is a damaged TorchScript archive ({type(e).__name__}: {str(e)[:120]})",
            "re-download it",
        ) from None
    if not isinstance(root, _ScriptObject):
        raise UserError(f"not a checkpoint: {path} holds no TorchScript module", "pass a model file")
    return _flatten(root)


# Tensors a scripted CLIP keeps as attributes that are not weights (causal masks).
_SCRIPT_NON_WEIGHTS = frozenset({"attn_mask"})


def _flatten(obj: _ScriptObject, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.fields.items():
        if name in _SCRIPT_NON_WEIGHTS:
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            out.update(_flatten(value, f"{prefix}{name}."))
    return out
