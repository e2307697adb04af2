"""``load_model``: a causal LM and its tokenizer from a hub id, a local folder or a GGUF file.

Every model comes back the same way: eval mode, ``requires_grad`` off, on the configured device
(or, streamed, on the CPU with that device as where its blocks compute, or spread over several
GPUs: ``model.placement``, models/streaming.py, models/spread.py) and dtype, GPT-2's ``Conv1D``
layers turned into ``nn.Linear`` and fused MoE experts split into one ``nn.Linear`` per expert
matrix (models/experts.py), so every quantization target is a plain Linear, and the usable
context recorded on ``model.config.ptqscale_max_seqlen``.

Weights on the CPU in the checkpoint's own dtype stay memory-mapped from its safetensors
(transformers' mmap loading; models/mapped.py): a streamed model takes no host memory for
weights a job does not change. Whether they are is recorded on the model (``weights_of``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ptqscale.errors import ConfigError, ImplausibleResultError
from ptqscale.models.config import (
    ModelConfig,
    ModelSource,
    looks_like_path,
    parse_bytes,
    resolved_dtype,
    validate_model_config,
)
from ptqscale.models.experts import split_experts
from ptqscale.models.mapped import record_weights

# Attribute names under which families store their trained context, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len")
# ALiBi families have no position table; their published training context stands in.
_DEFAULT_CONTEXT = {"bloom": 2048}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GGUF_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_model(cfg: ModelConfig):
    """Load ``(model, tokenizer)`` as configured; all path checks run before any weight is read.

    Example::

        >>> cfg = ModelConfig(name="s", path="../shared/data/models/stories260K/stories260K.gguf",
        ...                   max_seqlen=512)
        >>> model, tok = load_model(cfg)  # doctest: +SKIP
        >>> model.config.ptqscale_max_seqlen  # doctest: +SKIP
        512
    """
    source = validate_model_config(cfg)
    check_host_memory(cfg, source)
    if cfg.placement == "spread":
        from ptqscale.models.spread import spread_devices

        spread_devices(cfg)  # no GPU or too few: an error before any weight is read
    config = _load_config(cfg, source)
    config.ptqscale_max_seqlen = _usable_context(config, cfg.max_seqlen)
    model = _load_weights(cfg, source, config)
    model.eval().requires_grad_(False)
    replace_conv1d(model)
    split_experts(model)  # MoE: fused 3-D expert weights -> one Linear per expert matrix
    place_model(model, cfg)
    record_weights(model)
    return model, _load_tokenizer(cfg, source)


def check_host_memory(cfg: ModelConfig, source: ModelSource) -> None:
    """Refuse, before any weight is read, a local safetensors checkpoint whose conversion to
    ``model.dtype`` would not fit in the host's available memory.

    Weights loaded in their stored dtype stay memory-mapped and need none (page cache only);
    converted ones are copies. A bfloat16 70B model in the default float32 would need 280 GB.
    """
    from ptqscale.models.mapped import available_host_bytes, copied_bytes

    files = [f for f in source.weights if f.endswith(".safetensors")]
    if cfg.stand_in or source.kind != "local" or not files:
        return
    index = os.path.join(source.path, "model.safetensors.index.json")
    if os.path.exists(index):   # only the shards it names (repos add consolidated copies)
        import json

        with open(index) as f:
            named = set(json.load(f)["weight_map"].values())
        files = [f for f in files if os.path.basename(f) in named]
    dtype = resolved_dtype(cfg)
    copied, _ = copied_bytes(files, dtype)
    available = available_host_bytes()
    if available is not None and copied > available:
        raise ConfigError(
            f"model {cfg.name!r}: model.dtype={cfg.dtype} converts {copied / 2**30:.1f} GiB of "
            f"{cfg.path}'s weights into host memory, but {available / 2**30:.1f} GiB is "
            "available; model.dtype=auto (the stored dtype) keeps them memory-mapped")


def place_model(model: nn.Module, cfg: ModelConfig):
    """Apply ``cfg.placement`` and ``cfg.max_gpu_memory`` to a model loaded on the CPU.

    The budget caps this process's CUDA allocator on the device (nothing to cap on a CPU);
    in one piece the model moves to the device, streamed it stays on the CPU. Returns the
    :class:`~ptqscale.models.streaming.Placement` it records on the model. ``spread``:
    whole decoder blocks on several GPUs (models/spread.py).
    """
    if cfg.placement == "spread":
        from ptqscale.models.spread import spread_model
        from ptqscale.models.streaming import set_placement

        placement = spread_model(model, cfg)
        set_placement(model, placement)
        return placement
    from ptqscale.models.streaming import (
        Placement,
        apply_memory_budget,
        choose_streamed,
        module_tensors,
        pin_host_weights,
        set_placement,
        within_budget,
    )

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:  # the budget and memory queries want one
        device = torch.device("cuda", torch.cuda.current_device())
    budget = None
    if cfg.max_gpu_memory is not None and device.type == "cuda":
        budget = parse_bytes(cfg.max_gpu_memory, "model.max_gpu_memory")
    apply_memory_budget(device, budget)
    weight_bytes = sum(t.numel() * t.element_size() for t in module_tensors([model]))
    placement = Placement(choose_streamed(cfg.placement, weight_bytes, device, budget), device,
                          budget)
    if not placement.streamed:
        with within_budget(placement, f"loading model {cfg.name!r} in one piece"):
            model.to(device)
    elif device.type == "cuda":
        pin_host_weights(model, weight_bytes)
    set_placement(model, placement)
    return placement


def resolve_device(device: str, key: str = "model.device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; a CUDA device where there is none is an
    error naming ``key``, the config value it came from (``method.device``, ...)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device!r} but CUDA is not available here; use auto or cpu")
    return torch.device(device)


def context_length(config) -> int:
    """The trained context of a transformers config (``_DEFAULT_CONTEXT`` for ALiBi families)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    if config.model_type in _DEFAULT_CONTEXT:
        return _DEFAULT_CONTEXT[config.model_type]
    raise ConfigError(
        f"cannot tell the context length of model_type {config.model_type!r} "
        f"(none of {_CONTEXT_KEYS} is set); set model.max_seqlen"
    )


def _usable_context(config, max_seqlen: int | None) -> int:
    trained = context_length(config)
    if max_seqlen is None:
        return trained
    if max_seqlen > trained:
        raise ConfigError(
            f"model.max_seqlen={max_seqlen} exceeds the checkpoint's context {trained}"
        )
    return max_seqlen


def _sanitize_special_ids(config) -> None:
    # GGUF files write "no token" as uint32 -1 (4294967295); transformers then refuses the
    # config or indexes out of range. An id outside the vocabulary means "none".
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and vocab and not 0 <= value < vocab:
            setattr(config, key, None)


def _load_config(cfg: ModelConfig, source: ModelSource):
    from transformers import AutoConfig

    if cfg.stand_in:
        from ptqscale.models.standins import standin_config

        return standin_config(cfg)
    if source.kind == "gguf":
        folder, name = os.path.split(os.path.abspath(source.path))
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    else:
        config = AutoConfig.from_pretrained(
            source.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    _sanitize_special_ids(config)
    return config


def _load_weights(cfg: ModelConfig, source: ModelSource, config):
    from transformers import AutoModelForCausalLM

    if cfg.stand_in:
        from ptqscale.models.standins import standin_model

        return standin_model(cfg, config, _DTYPES[cfg.dtype])
    kwargs = dict(config=config, dtype=_DTYPES[resolved_dtype(cfg)], trust_remote_code=cfg.trust_remote_code,
                  output_loading_info=True)
    if source.kind == "gguf":
        folder, name = os.path.split(os.path.abspath(source.path))
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    else:
        if not cfg.allow_pickle:
            # For hub ids this is the only guard: transformers then refuses pickle-only repos.
            kwargs["use_safetensors"] = True
        model, info = AutoModelForCausalLM.from_pretrained(source.path, revision=cfg.revision,
                                                           **kwargs)
    check_loaded(model, info, f"model {cfg.name!r} ({source.path})")
    return model


def check_loaded(model: nn.Module, info: dict, what: str) -> None:
    """Fail on weights the loader had to initialise (the checkpoint lacks them; tied weights
    are not missing) and on non-finite weights: such a model measures garbage that would be
    stored as a result."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ImplausibleResultError(
            f"{what}: {len(missing)} weight tensor(s) missing from the checkpoint would be "
            f"randomly initialised ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            "; the checkpoint is incomplete or of another architecture")
    check_finite(model, what)


def check_finite(model: nn.Module, what: str) -> None:
    """Fail naming the first parameters that hold NaN or infinity: how many, and where.

    Every format keeps a non-finite weight where it is (docs/formats.md), so after
    quantizing a model that loaded finite, a hit is a value the method or format created.
    """
    bad = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            where = (~torch.isfinite(p.detach())).nonzero()
            bad.append(f"{name} ({where.shape[0]} of {p.numel()} elements, first at "
                       f"{tuple(where[0].tolist())})")
    if bad:
        raise ImplausibleResultError(
            f"{what}: non-finite values (NaN or inf) in {len(bad)} weight tensor(s): "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")


def _load_tokenizer(cfg: ModelConfig, source: ModelSource):
    from transformers import AutoTokenizer

    if cfg.stand_in:
        from ptqscale.models.standins import standin_tokenizer

        return standin_tokenizer()
    name = cfg.tokenizer or source.path
    if name.endswith(".gguf"):
        return load_gguf_tokenizer(os.path.expanduser(name))
    revision = cfg.revision if cfg.tokenizer is None else None
    if looks_like_path(name):
        name = os.path.expanduser(name)
    return AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=cfg.trust_remote_code
    )


def load_gguf_tokenizer(path: str):
    """The tokenizer embedded in a GGUF file, built with transformers' GGUF converter.

    transformers' own GGUF tokenizer path indexes the vocabulary with every special-token id the
    file states, and some files (stories260K) store "none" as 4294967295, which fails. Here the
    metadata is read with the ``gguf`` package, ids outside the vocabulary are dropped, and the
    same converter builds the tokenizer; tests check it tokenizes like transformers' path.
    """
    import gguf
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5.20 moved the GGUF helpers into a package
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tdict = {
        name: meta[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    tokens = tdict["tokens"]
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if key in tdict and not 0 <= tdict[key] < len(tokens):
            del tdict[key]
    special = {}
    for name, key in _GGUF_SPECIAL.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= index < len(tokens):
            special[name] = tokens[index]
    architecture = reader.fields["general.architecture"].contents()
    backend, _ = convert_gguf_tokenizer(architecture, tdict)
    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", tdict.get("tokenizer_type") == "llama"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos, **special)


def replace_conv1d(model: nn.Module) -> int:
    """Swap transformers' ``Conv1D`` (GPT-2's transposed Linear) for an equal ``nn.Linear``.

    Returns how many were replaced. The output is bitwise the same up to matmul order
    (``x @ W + b`` vs ``x @ W.T.T + b``), and every quantizer then sees (out, in) weights.
    """
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, child_name, _linear_from_conv1d(child))
                replaced += 1
    return replaced


def _linear_from_conv1d(conv) -> nn.Linear:
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight.data.copy_(conv.weight.data.t())
    if conv.bias is not None:
        linear.bias.data.copy_(conv.bias.data)
    linear.requires_grad_(conv.weight.requires_grad)
    return linear
