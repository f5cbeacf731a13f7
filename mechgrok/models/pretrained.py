"""``from_pretrained``: a Hugging Face causal LM converted, offline, into a ``HookedTransformer``.

The conversion is transformer-lens's own (its config and weight converters), run on a local
checkpoint folder or an in-memory ``transformers`` model, never downloading anything; the
architectures it is checked on are ``PRETRAINED_ARCHITECTURES``. Features the converters would
drop without a word (rope scaling, Llama biases, ...) are refused, and the converted model's
log-probabilities are compared with the Hugging Face model's before it is returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechgrok.models._args import _check_bool
from mechgrok.models._tl import TL_VERSION, HookedTransformer, HookedTransformerConfig, _quiet_build, _tl_loading
from mechgrok.models.devices import _device, _to_device, device_of

__all__ = ["from_pretrained", "PRETRAINED_ARCHITECTURES"]

#: Hugging Face causal-LM classes ``from_pretrained`` converts, each with transformer-lens's own
#: converter and each checked against the Hugging Face logits in tests/test_pretrained.py.
PRETRAINED_ARCHITECTURES = ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                            "Qwen2ForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM")
# Substrings that make transformer-lens 3.9's convert_hf_model_config take a hard-coded config
# chosen by the *path* instead of reading config.json; the neutral folder's path avoids them.
_TL_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2", "tinystories", "santacoder")


def from_pretrained(source: str | os.PathLike | Any, *, device: str | torch.device | None = None,
                    dtype: torch.dtype | str = torch.float32, fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    fold_value_biases: bool = False, check: bool = True) -> HookedTransformer:
    """A Hugging Face causal LM as a ``HookedTransformer``, converted offline by transformer-lens.

    Args:
        source: a local checkpoint folder (``config.json`` and the weights, as
            ``model.save_pretrained(folder)`` writes them; read with ``local_files_only=True``, never
            downloaded) or an in-memory ``transformers`` ``PreTrainedModel`` (read, not modified).
            Its architecture must be one of ``PRETRAINED_ARCHITECTURES``.
        device: where the model goes (default: the in-memory model's device; for a folder, torch's
            default device). ``model.cfg.device`` says where it is.
        dtype: the parameters' dtype (a folder is also read in it).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: transformer-lens's
            weight processing, all off by default so the weights are the checkpoint's and the
            logits equal Hugging Face's (within float rounding; tested to 1e-4). ``fold_ln`` folds
            each norm's scale (and bias) into the next layer's weights, leaving parameter-free
            norms (``LNPre`` / ``RMSPre``); ``center_writing_weights`` makes every weight writing to
            the residual stream mean-zero (LayerNorm models only; it changes nothing the next
            LayerNorm sees); ``center_unembed`` makes ``W_U`` mean-zero over the vocabulary (logits
            shift by a per-position constant, probabilities do not change); ``fold_value_biases``
            moves the value biases into the attention output bias. transformer-lens's own
            ``HookedTransformer.from_pretrained`` turns the first four on, so its logits and
            weights differ from these.
        check: run both models on one short random sequence and raise if the log-probabilities
            differ by more than float rounding (a checkpoint feature the converter ignores).

    Returns:
        The model in eval mode, with ``model.mechgrok_source`` (architecture, source name, the
        processing applied), which ``save`` records.

    Raises:
        FileNotFoundError: the folder does not exist or has no ``config.json``.
        ValueError: the architecture is not one of ``PRETRAINED_ARCHITECTURES``, or the checkpoint
            uses a feature transformer-lens does not convert (rope scaling, Llama biases, ...).

    Limits: the tokenizer is not loaded (mechgrok works on token ids; attach one with
    ``model.set_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))``). A folder
    is read whole into memory next to the converted copy.
    """
    owner = "models.from_pretrained"
    dtype = _check_dtype(dtype, owner)
    flags = {k: _check_bool(v, k, owner) for k, v in dict(
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases).items()}
    _check_bool(check, "check", owner)
    import transformers  # slow to import: only here

    if isinstance(source, HookedTransformer):
        raise TypeError(f"{owner}: this is already a HookedTransformer; use it as it is")
    if isinstance(source, (str, os.PathLike)):
        hf, name = _read_folder(Path(source), dtype, owner), Path(source).resolve().name
    elif isinstance(source, transformers.PreTrainedModel):
        hf, name = source, Path(str(getattr(source.config, "name_or_path", "") or "")).name or "in-memory model"
    else:
        raise TypeError(f"{owner}: source must be a checkpoint folder or a transformers PreTrainedModel, got "
                        f"{type(source).__name__}")
    arch = type(hf).__name__
    _check_architecture(arch, owner)
    _refuse_unconverted(hf.config, arch, owner)
    hf_device = device_of(hf)
    if hf_device.type == "meta":
        raise ValueError(f"{owner}: the model's weights are on the meta device (not loaded); load them first")
    target = hf_device if device is None and not isinstance(source, (str, os.PathLike)) else _device(device, owner)

    with _neutral_folder(owner) as folder:
        cfg_dict = _tl_config_dict(hf.config, arch, folder, owner)
        # Converted where the weights are (the converters add zero biases on cfg.device), moved after.
        cfg_dict.update(model_name=name, init_weights=False, tokenizer_name=None, device=str(hf_device),
                        dtype=dtype, n_devices=1, from_checkpoint=False,
                        default_prepend_bos=cfg_dict.get("default_prepend_bos", True))
        if flags["fold_ln"] and cfg_dict.get("normalization_type") in ("LN", "RMS"):
            cfg_dict["normalization_type"] += "Pre"  # as transformer-lens's get_pretrained_model_config does
        cfg = HookedTransformerConfig(**cfg_dict)
        with torch.no_grad():
            state = _quiet_build(_tl_loading.get_pretrained_state_dict, str(folder), cfg, hf_model=hf, dtype=dtype)
            model = _quiet_build(HookedTransformer, cfg)  # on cfg.device: where the weights are
            model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **flags)
    model.eval()
    model.mechgrok_source = {"architecture": arch, "name": name, "transformers": transformers.__version__,
                             "transformer_lens": TL_VERSION, **flags}
    if check:
        _check_logits(hf, model, owner)
    return _to_device(model, target)


def _check_dtype(dtype: Any, owner: str) -> torch.dtype:
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a floating torch dtype such as torch.float32 or 'bfloat16', "
                        f"got {dtype!r}")
    return dtype


def _check_architecture(arch: str, owner: str) -> None:
    if arch not in PRETRAINED_ARCHITECTURES:
        raise ValueError(f"{owner}: cannot convert a {arch}; supported architectures: "
                         f"{', '.join(PRETRAINED_ARCHITECTURES)} (transformer-lens {TL_VERSION}'s converters, each "
                         "checked against the Hugging Face logits). Capture, SAEs and EK-FAC also take the "
                         "Hugging Face model itself by module path")


def _read_folder(folder: Path, dtype: torch.dtype, owner: str):
    """The Hugging Face model saved in ``folder``, read offline; its architecture checked first."""
    import transformers

    if not folder.is_dir():
        raise FileNotFoundError(f"{owner}: {folder} is not a folder; from_pretrained reads a local Hugging Face "
                                "checkpoint folder (config.json + weights) and downloads nothing")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{owner}: {folder} has no config.json, so it is not a Hugging Face checkpoint "
                                "folder; write one with hf_model.save_pretrained(folder)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{owner}: {folder}/config.json names no architecture ('architectures' is empty); "
                         f"save the model with save_pretrained, or load it yourself and pass the model")
    _check_architecture(archs[0], owner)
    _refuse_unconverted(config, archs[0], owner)
    try:
        return _quiet_build(transformers.AutoModelForCausalLM.from_pretrained, folder, config=config,
                            local_files_only=True, dtype=dtype).eval()
    except OSError as e:
        raise FileNotFoundError(f"{owner}: could not read the weights in {folder}: {e}") from None


def _rope_types(config: Any) -> set[str | None]:
    """The rope types a Hugging Face config asks for (``rope_parameters`` / ``rope_scaling``)."""
    found: set[str | None] = set()
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, attr, None)
        if not isinstance(rope, dict):
            continue
        groups = list(rope.values()) if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
        found |= {g.get("rope_type") or g.get("type") for g in groups}
    return found


def _refuse_unconverted(config: Any, arch: str, owner: str) -> None:
    """Refuse checkpoint features transformer-lens 3.9's converters would drop without a word."""
    problems = []
    allowed = {None, "default"} | ({"llama3"} if arch == "LlamaForCausalLM" else set())
    if bad := sorted(str(t) for t in _rope_types(config) - allowed):
        problems.append(f"rope scaling {bad} (converted: {sorted(str(t) for t in allowed if t)})")
    if arch in ("LlamaForCausalLM", "MistralForCausalLM"):
        problems += [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        head_dim = getattr(config, "head_dim", None)
        if head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads:
            problems.append(f"head_dim={head_dim} != hidden_size // num_attention_heads")
    if arch == "Qwen2ForCausalLM" and getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if problems:
        raise ValueError(f"{owner}: this {arch} uses {', '.join(problems)}, which transformer-lens {TL_VERSION} "
                         "does not convert; the converted model would compute something else")


@contextlib.contextmanager
def _neutral_folder(owner: str):
    """A temporary folder whose path has none of ``_TL_NAME_TRIGGERS`` in it (removed afterwards)."""
    parents = [tempfile.gettempdir(), "/tmp", "/var/tmp", os.getcwd()]
    for parent in parents:
        if not Path(parent).is_dir() or any(t in str(Path(parent).resolve()).lower() for t in _TL_NAME_TRIGGERS):
            continue
        for _ in range(5):
            with tempfile.TemporaryDirectory(prefix="mechgrok-hf-config-", dir=parent) as tmp:
                if not any(t in str(Path(tmp).resolve()).lower() for t in _TL_NAME_TRIGGERS):
                    yield Path(tmp).resolve()
                    return
    raise RuntimeError(f"{owner}: every temporary folder ({parents}) has one of {list(_TL_NAME_TRIGGERS)} in its "
                       "path, which transformer-lens mistakes for a model name; set TMPDIR to a folder without them")


def _tl_config_dict(hf_config: Any, arch: str, folder: Path, owner: str) -> dict[str, Any]:
    """transformer-lens's config for ``hf_config``, from its own ``convert_hf_model_config``.

    That function reads ``config.json`` from a folder, but first matches model names in the folder's
    path ("llama", "gemma", ...) and then uses a hard-coded config instead; so the config is written
    to the neutral ``folder`` (whatever the checkpoint's folder is called), and the sizes of the
    result are checked against ``hf_config``.
    """
    d = json.loads(hf_config.to_json_string(use_diff=False))
    d["architectures"] = [arch]  # an in-memory model's config may name none
    if arch == "GPT2LMHeadModel" and "n_ctx" not in d:
        d["n_ctx"] = d["n_positions"]  # transformers 5 dropped GPT2Config.n_ctx, which TL 3.9's GPT-2 branch reads
    (folder / "config.json").write_text(json.dumps(d))
    cfg_dict = _quiet_build(_tl_loading.convert_hf_model_config, str(folder), local_files_only=True)
    for tl_key, hf_key in (("n_layers", "num_hidden_layers"), ("d_model", "hidden_size"), ("d_vocab", "vocab_size")):
        want = getattr(hf_config, hf_key, None)
        if want is not None and cfg_dict.get(tl_key) != want:
            raise RuntimeError(f"{owner}: transformer-lens converted the config to {tl_key}={cfg_dict.get(tl_key)}, "
                               f"but the checkpoint has {hf_key}={want}; please report this")
    if arch == "GPT2LMHeadModel" and getattr(hf_config, "n_inner", None):
        cfg_dict["d_mlp"] = int(hf_config.n_inner)  # TL 3.9's GPT-2 branch assumes d_mlp = 4 d_model
    want = getattr(hf_config, "intermediate_size", None) if arch != "GPT2LMHeadModel" else cfg_dict["d_mlp"]
    if want is not None and cfg_dict.get("d_mlp") != want:
        raise ValueError(f"{owner}: transformer-lens converted the config to d_mlp={cfg_dict.get('d_mlp')}, but the "
                         f"checkpoint's MLP width is {want}; this {arch} checkpoint cannot be converted as it is")
    return cfg_dict


def _check_logits(hf: nn.Module, model: HookedTransformer, owner: str) -> None:
    """Raise unless ``model`` and ``hf`` give the same log-probabilities on a short random sequence."""
    n = min(8, model.cfg.n_ctx)
    tokens = torch.randint(0, min(model.cfg.d_vocab, hf.config.vocab_size), (1, n),
                           generator=torch.Generator().manual_seed(0))  # [1, n]
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            ref = hf(tokens.to(device_of(hf))).logits.double().cpu()  # [1, n, vocab]
            out = model(tokens).double().cpu()
    finally:
        hf.train(was_training)
    diff = float((ref.log_softmax(-1) - out.log_softmax(-1)).abs().max())
    low = {torch.float16, torch.bfloat16}
    rtol = 3e-2 if model.cfg.dtype in low or next(hf.parameters()).dtype in low else 1e-3
    tol = rtol * (1 + float(ref.abs().max()))
    if not diff <= tol:
        raise ValueError(f"{owner}: the converted model's log-probabilities differ from the Hugging Face model's by "
                         f"{diff:.3g} (tolerance {tol:.3g}) on a random sequence: the checkpoint uses something "
                         f"transformer-lens {TL_VERSION} does not convert. Pass check=False to get the model anyway")
