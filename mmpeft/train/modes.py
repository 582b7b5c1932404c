"""How a model runs while it trains: which parts are in train mode, and activation
checkpointing.

The original methods run their frozen parts in eval mode (GILL's frozen OPT without its
dropout). But transformers checkpoints a layer only in train mode, so a frozen LM that the
loss backpropagates through (LLaVA's stage 1, MiniGPT-5's, GILL's) would keep every
activation: `mmpeft plan` puts Vicuna-7B's at stage 1's 32 x 2,048 tokens at 348 GiB a GPU,
against 27 GiB checkpointed. A
frozen part whose computation does not depend on its mode (no dropout with p > 0, no batch
norm; LLaMA, CLIP and the SD UNet have none) computes the same in either mode, so under
checkpointing it stays in train mode and is checkpointed; one with dropout (OPT) keeps eval
mode and its activations.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Turn on activation checkpointing in every transformers or diffusers model inside
    `model` (the LM, a UNet that gradients pass through), non-reentrant: it needs no input
    that requires grad (PEFT's frozen embeddings) and works with ZeRO-3. transformers also
    hooks every input embedding inside to make its output require grad, the vision tower's
    patch embedding too, so that a frozen tower would keep all its activations (0.39 GiB an
    image at CLIP-L/336): those hooks are removed, as non-reentrant checkpointing does
    without them. Returns the names of the models it turned on."""
    inside, names = set(), []
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if getattr(module, "supports_gradient_checkpointing", False):  # transformers
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            module.disable_input_require_grads()
        elif getattr(module, "_supports_gradient_checkpointing", False):  # diffusers
            module.enable_gradient_checkpointing()
        else:
            continue
        inside |= {id(m) for m in module.modules()}
        names.append(name or type(module).__name__)
    return names


def mode_dependent(module: nn.Module) -> bool:
    """Whether `module` computes differently in train and eval mode: a dropout layer with
    p > 0, a batch norm, or a transformers config inside asking for dropout (OPT applies its
    `dropout` functionally, with no layer to find)."""
    configs = {}
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    return any("dropout" in k and isinstance(v, float) and v > 0
               for config in configs.values() for k, v in config.to_dict().items())


def parts_in_eval(frozen: Sequence[nn.Module], checkpointing: bool) -> list[nn.Module]:
    """The frozen modules to run in eval mode (`train_mode`): all of them, or under
    `checkpointing` those that compute differently in train mode (`mode_dependent`); the
    others stay in train mode, where transformers checkpoints them."""
    return [m for m in frozen if not checkpointing or mode_dependent(m)]


def train_mode(model: nn.Module, frozen: Sequence[nn.Module] = ()) -> None:
    """`model` in train mode but each module of `frozen` (and everything inside it) in eval
    mode, as the original methods run their frozen parts: a frozen LM's or tower's dropout
    off, its normalisation fixed. A module of `frozen` outside `model` (a pipeline's VAE)
    is put in eval mode all the same. Under checkpointing, give it `parts_in_eval`."""
    model.train()
    for module in frozen:
        module.eval()
