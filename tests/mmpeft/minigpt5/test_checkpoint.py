"""Where a MiniGPT-5 run's connector comes from: LLaVA's released projector (local or by Hub
id), and the stage-1 folder that hands it on to stage 2."""

import json

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmpeft.llava.released import load_connector
from mmpeft.minigpt5.checkpoint import STAGE1_FILES, connector_source, read_stage1

RELEASED = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"


def _projector() -> LlavaMultiModalProjector:
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model", "hidden_size": 6,
                                        "num_attention_heads": 2},
                         text_config={"model_type": "llama", "hidden_size": 4, "num_attention_heads": 2},
                         projector_hidden_act="gelu")
    return LlavaMultiModalProjector(config)


def _mm_projector_bin(folder):
    """A folder laid out as LLaVA's released stage 1: `mm_projector.bin` under LLaVA's own names."""
    torch.manual_seed(1)
    state = {"model.mm_projector.0.weight": torch.randn(4, 6), "model.mm_projector.0.bias": torch.randn(4),
             "model.mm_projector.2.weight": torch.randn(4, 4), "model.mm_projector.2.bias": torch.randn(4)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "mm_projector.bin")
    return state


def test_a_local_folder_is_read_as_given(tmp_path):
    state = _mm_projector_bin(tmp_path / "released")
    assert connector_source(str(tmp_path / "released")) == tmp_path / "released"
    projector = _projector()
    assert load_connector(projector, connector_source(str(tmp_path / "released")), "mlp2x_gelu").name == \
        "mm_projector.bin"
    assert torch.equal(projector.linear_2.weight, state["model.mm_projector.2.weight"])


def test_a_hub_id_downloads_only_the_projector_file(tmp_path, monkeypatch):
    state = _mm_projector_bin(tmp_path / "snapshot")
    asked = {}

    def download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    projector = _projector()
    load_connector(projector, connector_source(RELEASED), "mlp2x_gelu")
    assert asked == {"repo_id": RELEASED, "allow_patterns": ["connector.safetensors", "mm_projector.bin"]}
    assert torch.equal(projector.linear_1.bias, state["model.mm_projector.0.bias"])


def test_an_id_that_cannot_be_downloaded_says_how_to_get_it(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise LocalEntryNotFoundError("offline mode is on")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match=f"model.init_connector: {RELEASED} is no local file or folder, and as a Hub "
                                      f"repo it cannot be downloaded: offline mode is on\nOffline, download it on a "
                                      f"connected machine \\(huggingface-cli download {RELEASED} mm_projector.bin\\)"):
        connector_source(RELEASED)
    with pytest.raises(FileNotFoundError, match="no/such/local is neither a local file or folder nor a Hub repo"):
        connector_source("no/such/local")


def test_a_stage1_folder_lacking_files_is_named_and_a_complete_one_read(tmp_path):
    (tmp_path / "mapper.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"model.init_from: {tmp_path} lacks connector.safetensors, "
                                                "llava_adapter, mmpeft_config.json; give a MiniGPT-5 stage-1"):
        read_stage1(tmp_path)
    for name in STAGE1_FILES[1:]:
        (tmp_path / name).write_text(json.dumps({"connector_from": RELEASED}))
    assert read_stage1(tmp_path)["connector_from"] == RELEASED
