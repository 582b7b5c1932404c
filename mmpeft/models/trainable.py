"""Which parameters train, set per part by explicit choice.

Each part (`vision`, `connector`, `llm`) is `frozen`, `full` or `lora`. LoRA targets are
the `nn.Linear` layers found inside the parts that ask for LoRA, by module type, never by
guessing from names; the LM head is never a target. Fully trained parts that sit beside a
LoRA adapter are PEFT `modules_to_save`, so the adapter files carry them. New tokens
(vokens) train only their own rows of the input embeddings and output head, through PEFT's
trainable tokens: the frozen rows are not parameters at all, so no weight decay or
optimizer state touches them.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, TrainableTokensConfig, get_peft_model
from torch import nn

CHOICES = ("frozen", "full", "lora")


@dataclass
class LoraSettings:
    """LoRA hyperparameters; LLaVA-1.5's LoRA run used r 128, alpha 256, dropout 0.05."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # "all-linear": every linear layer of a LoRA part; or a list of layer names (last name
    # component, such as q_proj, v_proj) to keep among them
    targets: str | list[str] = "all-linear"


def linear_layer_names(root: nn.Module, prefix: str) -> list[str]:
    """Full names of the linear layers under `root` (bitsandbytes 4-bit layers included)."""
    names = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.append(f"{prefix}.{name}" if name else prefix)
    return names


def apply_trainability(model, parts: dict[str, nn.Module], choice: dict[str, str],
                       lora: LoraSettings | None = None, token_rows: dict[str, list[int]] | None = None):
    """Freeze everything, then open each part as `choice` says. `parts` maps a part name
    to its module inside `model`. `token_rows` maps embedding / head module names to the
    token ids whose rows train. Returns the model, wrapped by PEFT when any part is LoRA
    or any token rows train."""
    problems = [f"{p}: '{c}' is not one of {CHOICES}" for p, c in choice.items() if c not in CHOICES]
    problems += [f"{p}: no such part (parts: {', '.join(parts)})" for p in choice if p not in parts]
    if problems:
        raise ValueError("trainability settings: " + "; ".join(problems))
    lora = lora or LoraSettings()
    if lora.targets != "all-linear" and not (isinstance(lora.targets, list) and lora.targets):
        raise ValueError(f"lora targets: 'all-linear' or a list of layer names, not {lora.targets!r}")
    names = {module: name for name, module in model.named_modules()}
    model.requires_grad_(False)
    targets, full = [], []
    for part, how in choice.items():
        module = parts[part]
        if how == "full":
            module.requires_grad_(True)
            full.append(names[module])
        elif how == "lora":
            targets += linear_layer_names(module, names[module])
    if targets and lora.targets != "all-linear":
        unmatched = [t for t in lora.targets if not any(n.rsplit(".", 1)[-1] == t for n in targets)]
        if unmatched:
            found = sorted({n.rsplit(".", 1)[-1] for n in targets})
            raise ValueError(f"lora targets {unmatched} match no linear layer of the LoRA parts (they have: "
                             f"{', '.join(found)})")
        targets = [n for n in targets if n.rsplit(".", 1)[-1] in lora.targets]
    if not targets and not token_rows:
        return model
    if not targets:  # token rows alone; PEFT freezes the rest, so the full parts reopen after
        ids = sorted({i for rows in token_rows.values() for i in rows})
        wrapped = get_peft_model(model, TrainableTokensConfig(target_modules=list(token_rows), token_indices=ids))
        for name in full:
            wrapped.base_model.model.get_submodule(name).requires_grad_(True)
        return wrapped
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        modules_to_save=full or None, task_type="CAUSAL_LM", trainable_token_indices=token_rows)
    return get_peft_model(model, config)


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
