"""Which parameters train, set per part by explicit choice.

Each part (`vision`, `connector`, `llm`) is `frozen`, `full` or `lora`. LoRA targets are
the `nn.Linear` layers found inside the parts that ask for LoRA, by module type, never by
guessing from names; the LM head is never a target. Fully trained parts that sit beside a
LoRA adapter are PEFT `modules_to_save`, so the adapter files carry them. New tokens
(vokens) train only their own rows of the input embeddings and output head, through PEFT's
trainable tokens: the frozen rows are not parameters at all, so no weight decay or
optimizer state touches them.

Frozen parts run in eval mode while the rest trains (`frozen_modules`, given to the training
loop), as the original methods run their frozen towers and LMs: no dropout, fixed
normalisation. A recipe also checks up front that no frozen part keeps random weights
(`check_frozen_parts_loaded`).
"""

from __future__ import annotations

from collections.abc import Iterable
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


def frozen_modules(parts: dict[str, nn.Module], choice: dict[str, str]) -> list[nn.Module]:
    """The modules to keep in eval mode while the model trains (the training loop's `frozen`):
    each of `parts` that `choice` leaves frozen (a part it does not name is frozen, as in
    `apply_trainability`) unless it sits inside a part that trains. An LM frozen but for its
    token rows counts as frozen; a LoRA part does not (LoRA's dropout must work). A frozen
    part that holds a training one (MiniGPT-4's Q-Former connector, whose `projection`
    trains) is split: its submodules that hold no trainable parameter are listed instead.
    Call it after `apply_trainability`, with the same `parts` (the module objects, which PEFT
    keeps in place)."""
    opened = [parts[p] for p, how in choice.items() if how != "frozen"]
    inside_opened = {id(m) for part in opened for m in part.modules()}
    out = []
    for name, part in parts.items():
        if choice.get(name, "frozen") != "frozen" or id(part) in inside_opened:
            continue
        holds = [o for o in opened if any(m is o for m in part.modules())]
        out += _frozen_submodules(part, holds) if holds else [part]
    return out


def _frozen_submodules(module: nn.Module, opened: list[nn.Module]) -> list[nn.Module]:
    """The children of `module` (recursively) that neither are nor hold an opened part or a
    trainable parameter; PEFT's copy of a fully trained part sits in a wrapper beside the
    original, which is why trainable parameters are looked at as well as the parts."""
    out = []
    for child in module.children():
        if any(child is o for o in opened):
            continue
        holds = any(m is o for o in opened for m in child.modules())
        if holds or any(p.requires_grad for p in child.parameters()):
            out += _frozen_submodules(child, opened)
        else:
            out.append(child)
    return out


@dataclass(frozen=True)
class PartOrigin:
    """Where a part's weights come from, for `check_frozen_parts_loaded`.

    `part`: its short name, as listed in `allow_random_frozen` (`connector`, `mapper.mlp`);
    `setting`: the config key that freezes it (`model.trainable.connector`); `source`: where
    its weights are loaded from, None when it starts random; `remedy`: what to give instead
    (`give model.init_connector=<...>`), or empty when only training it would do."""

    part: str
    setting: str
    frozen: bool
    source: str | None
    remedy: str


def check_frozen_parts_loaded(parts: Iterable[PartOrigin], allowed: Iterable[str] = (),
                              allow_setting: str = "model.allow_random_frozen") -> None:
    """Stop before training when a part is frozen but starts from random weights: nothing
    would train it, so every input would pass a random map (a random connector in front of
    the LM, say). Every such part is reported at once, by its config key, with the `init_*`
    setting to give. `allowed` lists the parts (by `PartOrigin.part`) to keep random and
    frozen all the same, a choice the config states in `allow_setting`. Call it at start-up,
    before the big models load: it needs only the config."""
    allowed, problems = set(allowed), []
    for p in parts:
        if p.frozen and p.source is None and p.part not in allowed:
            what = p.part.replace(".", "'s ")  # mapper.mlp: the mapper's mlp
            fixes = [p.remedy] if p.remedy else []
            fixes += [f"train it ({p.setting}: full)", f"list {p.part} in {allow_setting} to train with it random "
                      "all the same"]
            problems.append(f"{p.setting} is frozen but the {what} is random: " + ", or ".join(fixes))
    if problems:
        raise ValueError("a frozen part would keep its random weights (nothing would ever train it):\n"
                         + "\n".join(problems))


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, of whole tensors also under ZeRO-3 partitioning."""
    from mmpeft.train.placement import full_numel

    total = sum(full_numel(p) for p in model.parameters())
    return sum(full_numel(p) for p in model.parameters() if p.requires_grad), total
