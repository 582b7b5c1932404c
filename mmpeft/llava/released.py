"""Starting from what LLaVA's users have rather than from a run of stage 1.

- A released LLaVA in transformers' own layout (`llava-hf/llava-1.5-7b-hf`: the
  `LlavaForConditionalGeneration` weights and config, the `LlavaProcessor` files): the
  vision tower, connector, LM, tokenizer and image processor all come from it
  (`load_released_llava`, the finetune recipe's `model.init_from`).
- LLaVA's released stage-1 projector, `mm_projector.bin` (a pickled state dict under the
  names of LLaVA's own code, `model.mm_projector.0.weight`, ...), or an mmpeft
  `connector.safetensors` (`load_connector`, `model.init_connector`).
"""

from __future__ import annotations

from pathlib import Path

import torch

# a released LLaVA under QLoRA: the LM's linear layers in 4 bits, the rest as trained
UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

# LLaVA's `mm_projector` is an nn.Sequential (Linear, GELU, Linear) for mlp2x_gelu and a
# bare nn.Linear for linear: its layer index (none for linear) -> mmpeft's layer
MM_PROJECTOR_LAYERS = {"mlp2x_gelu": {"0": "linear_1", "2": "linear_2"}, "linear": {"": "linear_1"}}
MM_PROJECTOR_FILE = "mm_projector.bin"
CONNECTOR_FILE = "connector.safetensors"


def load_released_llava(source: str, qlora: bool = False, dtype: torch.dtype = torch.float32, log=print,
                        **kwargs):
    """`(LlavaForConditionalGeneration, LlavaProcessor)` from a released LLaVA (a local
    folder or Hub id laid out as `llava-hf/llava-1.5-7b-hf`), in `dtype`; with `qlora` the
    LM's layers in 4-bit NF4 and the vision tower, projector and head kept out of it.
    `kwargs` go to the model's `from_pretrained` (a `quantization_config` there wins over
    `qlora`). The image token, its id and `vision_feature_layer` are the checkpoint's; one
    that mmpeft cannot train (another feature selection than LLaVA-1.5's) is an error."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from mmpeft.llava.model import ensure_pad_token, nf4_config
    from mmpeft.models.quant import keep_cpu_4bit_working
    from mmpeft.presets import load_pretrained

    if qlora:
        kwargs.setdefault("quantization_config", nf4_config(dtype, skip_modules=UNQUANTIZED))
    try:
        model = load_pretrained(source, LlavaForConditionalGeneration.from_pretrained, what="LLaVA checkpoint",
                                log=log, dtype=dtype, **kwargs)
        processor = LlavaProcessor.from_pretrained(source)
    except OSError as err:
        raise OSError(f"cannot load the LLaVA checkpoint '{source}': {err}\nOffline, download it on a connected "
                      f"machine (huggingface-cli download {source}) and give its local folder instead") from err
    config, tokenizer = model.config, processor.tokenizer
    problems = []
    if tokenizer.convert_tokens_to_ids(processor.image_token) != config.image_token_id:
        problems.append(f"the processor's image token {processor.image_token!r} has id "
                        f"{tokenizer.convert_tokens_to_ids(processor.image_token)} but config.json's image_token_id "
                        f"is {config.image_token_id}")
    if config.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_select_strategy is {config.vision_feature_select_strategy!r}; mmpeft "
                        "trains LLaVA-1.5's 'default' (patch features, class token dropped)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer is {config.vision_feature_layer!r}; mmpeft reads one layer")
    if problems:
        raise ValueError(f"LLaVA checkpoint {source}: " + "; ".join(problems))
    ensure_pad_token(tokenizer)
    return keep_cpu_4bit_working(model), processor


def connector_file(source: str | Path) -> Path:
    """The connector weights `source` names: the file itself, or a folder's
    `connector.safetensors` (an mmpeft run or checkpoint), else its `mm_projector.bin`
    (LLaVA's released stage 1)."""
    path = Path(source)
    if path.is_file():
        return path
    for name in (CONNECTOR_FILE, MM_PROJECTOR_FILE):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{source} is neither a connector file nor a folder holding {CONNECTOR_FILE} (an mmpeft "
                            f"stage-1 output or checkpoint) or {MM_PROJECTOR_FILE} (LLaVA's released stage 1)")


def mm_projector_names(keys, connector: str, file: Path) -> dict[str, str | None]:
    """mmpeft's connector parameter name for each key of LLaVA's `mm_projector.bin`
    (`model.mm_projector.0.weight` -> `linear_1.weight`); None for a key that is not a layer
    of LLaVA's `connector` projector."""
    if connector not in MM_PROJECTOR_LAYERS:
        raise ValueError(f"{file}: LLaVA's mm_projector is a linear or mlp2x_gelu connector, not {connector}")
    layers, names = MM_PROJECTOR_LAYERS[connector], {}
    for key in keys:
        _, found, rest = key.partition("mm_projector.")
        layer, _, param = rest.rpartition(".")
        names[key] = f"{layers[layer]}.{param}" if found and layer in layers else None
    return names


def load_connector(projector: torch.nn.Module, source: str | Path, connector: str) -> Path:
    """Load the weights of `connector_file(source)` into `projector` (mmpeft's `connector`
    of that type) and return the file read. Every unknown, missing or mis-shaped tensor is
    reported at once, by the file's own key, with both shapes."""
    from safetensors.torch import load_file

    file = connector_file(source)
    if file.suffix == ".safetensors":
        state = load_file(file)
        names = {k: k for k in state}
    elif file.suffix == ".bin":  # a pickle: tensors only, no code runs
        state = torch.load(file, weights_only=True, map_location="cpu")
        names = mm_projector_names(state, connector, file)
    else:
        raise ValueError(f"{file}: a connector is read from .safetensors (mmpeft) or .bin (LLaVA's mm_projector)")
    expected = projector.state_dict()
    problems = [f"{key} is no parameter of the {connector} connector" for key, name in names.items()
                if name not in expected]
    problems += [f"{key} has shape {tuple(state[key].shape)} but the {connector} connector's {name} has "
                 f"{tuple(expected[name].shape)}" for key, name in names.items()
                 if name in expected and state[key].shape != expected[name].shape]
    problems += [f"no tensor for the connector's {name}" for name in sorted(set(expected) - set(names.values()))]
    if problems:
        raise ValueError(f"{file}: cannot load it into the {connector} connector: " + "; ".join(problems))
    projector.load_state_dict({names[key]: tensor for key, tensor in state.items()})
    return file
