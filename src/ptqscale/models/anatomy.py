"""One family-agnostic anatomy: decoder blocks, their Linear targets, embeddings and head.

Nothing here is written per family. The blocks are the ``nn.ModuleList`` whose length is the
config's ``num_hidden_layers``; the targets are the ``nn.Linear`` modules inside each block, in
the order one forward pass calls them (found once with hooks on block 0 and applied to every
block, since all blocks share one structure); the embeddings are the ``nn.Embedding`` modules
outside the blocks; the head is ``get_output_embeddings()``. Mixture-of-experts blocks hold one ``nn.Linear`` per expert matrix
(``models/experts.py`` splits transformers' fused experts at load); their routers are not
targets (the Linear children of a module that holds experts: ``mlp.gate``,
``shared_expert_gate``): routing stays in full precision, as GPTQ/AWQ implementations of
Mixtral and Qwen-MoE keep it.

To support a new family: add a tiny config of it to ``tests/models/tiny_models.py`` and the
targets it should report to ``EXPECTED`` in ``tests/models/test_anatomy.py``, then add its
``model_type`` to ``SUPPORTED_ARCHITECTURES`` (tests/models/test_architectures.py runs RTN and
GPTQ, streamed and in one piece, on the new ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ptqscale.models.errors import UnsupportedArchitectureError
from ptqscale.models.experts import PerExpertLinears, expert_prefixes, is_fused_experts
from ptqscale.models.loading import context_length

# model_type values whose anatomy is checked in tests (tests/models/test_anatomy.py, tiny_models.py).
SUPPORTED_ARCHITECTURES = (
    "bloom", "falcon", "gemma", "gemma2", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "opt",
    "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm",
)


@dataclass
class Anatomy:
    """Where the parts of a causal LM live (module names are full ``named_modules`` names).

    Example::

        >>> anat = get_anatomy(model)  # doctest: +SKIP
        >>> anat.block_prefix, list(anat.block_targets(0))[:2]  # doctest: +SKIP
        ('model.layers', ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj'])
    """

    architecture: str
    block_prefix: str
    blocks: list[nn.Module]
    targets: dict[str, nn.Linear]
    embeddings: list[str]
    head: str | None
    tied_head: bool
    context_length: int
    block_order: list[str] = field(default_factory=list)  # target names relative to a block
    experts: list[str] = field(default_factory=list)  # full names of MoE experts (experts.py)

    def block_targets(self, i: int) -> dict[str, nn.Linear]:
        """The targets of block ``i``, in execution order (q, k, v, o, gate, up, down ...)."""
        if not 0 <= i < len(self.blocks):
            raise IndexError(f"block {i} out of range (the model has {len(self.blocks)})")
        prefix = f"{self.block_prefix}.{i}."
        return {prefix + rel: self.targets[prefix + rel] for rel in self.block_order}


def get_anatomy(model: nn.Module) -> Anatomy:
    """Find blocks, targets, embeddings and head of a supported causal LM.

    Raises :class:`UnsupportedArchitectureError` (listing the supported ones) otherwise.
    """
    config = model.config
    arch = getattr(config, "model_type", type(model).__name__)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    prefix, blocks = _find_blocks(model, config.num_hidden_layers)
    order = _execution_order(model, blocks[0])
    for i, block in enumerate(blocks):  # the order of block 0 applies to every block
        names = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        if not set(order) <= names:
            raise UnsupportedArchitectureError(
                f"decoder blocks of {arch!r} differ in structure: block {i} lacks "
                f"{sorted(set(order) - names)[:3]} of block 0 (e.g. dense MLP layers among MoE "
                "ones, qwen2_moe's mlp_only_layers); every block must have the same linears")
    targets = {f"{prefix}.{i}.{rel}": blocks[i].get_submodule(rel)
               for i in range(len(blocks)) for rel in order}
    head, tied = _find_head(model)
    embeddings = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and not n.startswith(prefix + ".")]
    context = getattr(config, "ptqscale_max_seqlen", None) or context_length(config)
    return Anatomy(arch, prefix, list(blocks), targets, embeddings, head, tied, context, order,
                   expert_prefixes(model))


def count_parameters(model: nn.Module, anat: Anatomy) -> dict[str, int]:
    """Parameter counts: total, embedding, head, blocks, quantizable (weights of the targets).

    Each parameter is counted once: a head tied to the input embedding counts under
    ``embedding`` and adds 0 to ``head``. ``total`` also holds what is in none of the groups
    (final norm, BLOOM's embedding norm, OPT's projections).
    """
    seen: set[int] = set()

    def size(modules) -> int:
        n = 0
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n

    modules = dict(model.named_modules())
    counts = {"embedding": size(modules[n] for n in anat.embeddings)}
    counts["head"] = size([modules[anat.head]]) if anat.head else 0
    counts["blocks"] = size(anat.blocks)
    counts["quantizable"] = sum(m.weight.numel() for m in anat.targets.values())
    counts["total"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {k: counts[k] for k in ("total", "embedding", "head", "blocks", "quantizable")}


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, ModuleList)`` of the decoder blocks, found without a forward pass."""
    return _find_blocks(model, model.config.num_hidden_layers)


def _find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers and name]
    if not found:
        raise UnsupportedArchitectureError(
            f"no ModuleList of {n_layers} decoder blocks in {type(model).__name__}"
        )
    # the outermost one: nested lists of the same length (e.g. per-block experts) come later
    return min(found, key=lambda item: item[0].count("."))


def _execution_order(model: nn.Module, block: nn.Module) -> list[str]:
    """Linear names of ``block`` in the order a forward pass calls them (routers left out).

    Registration order is not call order (OPT registers k_proj before q_proj; MLPs register
    gate/up/down in different orders), so one forward of 4 tokens with hooks decides it. A
    linear that forward did not call (an expert the 4 tokens were not routed to) goes right
    after the linear registered before it: experts run in index order, so every expert's
    matrices keep their place in any batch's call order.
    """
    if any(type(m).__name__ == "Conv1D" for m in block.modules()):
        raise UnsupportedArchitectureError(
            "block holds transformers Conv1D layers; load through ptqscale.models.load_model "
            "(or call ptqscale.models.replace_conv1d) first"
        )
    if any(is_fused_experts(m) for m in block.modules()):
        raise UnsupportedArchitectureError(
            "block holds fused MoE experts; load through ptqscale.models.load_model (or call "
            "ptqscale.models.split_experts) first")
    routers = _routers(block)
    registered = [n for n, m in block.named_modules()
                  if isinstance(m, nn.Linear) and n not in routers]
    linears = {block.get_submodule(n): n for n in registered}
    called: list[str] = []

    def hook(module, args, output):
        if linears[module] not in called:
            called.append(linears[module])

    handles = [m.register_forward_hook(hook) for m in linears]
    device = next(model.parameters()).device
    # Skeletons probe on the meta device. transformers 5.17's sdpa mask (OPT) calls .item() on
    # the padding mask to decide whether it may skip the causal mask, which a meta tensor
    # cannot answer; the eager mask asks nothing, and the order of the calls does not depend
    # on the attention kernel.
    attn = getattr(model.config, "_attn_implementation", None)
    eager = device.type == "meta" and attn not in (None, "eager")
    if eager:
        model.config._attn_implementation = "eager"
    try:
        vocab = int(model.config.vocab_size)
        ids = torch.arange(4, device=device).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        if eager:
            model.config._attn_implementation = attn
    order = list(called)
    for i, name in enumerate(registered):
        if name not in order:
            before = registered[i - 1] if i else None
            order.insert(0 if before is None else order.index(before) + 1, name)
    return order


def _routers(block: nn.Module) -> set[str]:
    """Names of the Linear children of the modules in ``block`` that hold experts."""
    return {f"{n}.{c}" if n else c for n, m in block.named_modules()
            if any(isinstance(x, PerExpertLinears) for x in m.children())
            for c, x in m.named_children() if isinstance(x, nn.Linear)}


def _find_head(model: nn.Module) -> tuple[str | None, bool]:
    head = model.get_output_embeddings()
    if head is None:
        return None, False
    name = next(n for n, m in model.named_modules() if m is head)
    inp = model.get_input_embeddings()
    tied = inp is not None and head.weight is inp.weight
    return name, tied
