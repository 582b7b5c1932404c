"""MiniGPT-5: a LLaVA-style model whose LM emits vokens; their hidden states go through the
`VokenMapper` into Stable Diffusion's text-condition space and are trained by the latent
diffusion loss through the frozen UNet.

    loss = w_text * LM loss + w_image * latent diffusion loss (Min-SNR) + w_caption * caption MSE
           + w_decision * -log(1 - p([IMG0])) where an answer decides not to draw

The diffusion loss regresses what the UNet predicts (its scheduler's `prediction_type`:
the noise for SD 2.1-base, the velocity for SD 2.1 at 768 px).

The paper's weights are 0.01, 1 and 0.1; the caption term (stage 1) pulls the mapped
features towards the SD text encoder's encoding of the caption. `cfg_dropout` replaces the
voken states of a fraction of occurrences by zeros (and their caption target by the empty
prompt's encoding), so `mapper(zeros)` learns to be the unconditional embedding that
classifier-free guidance pushes away from.

The decision term (not in MiniGPT-5, whose weight is 0) teaches where not to draw: at the
tokens where an answer decides against an image (`voken_decisions`: the first token of an
answer that starts with text, the token that ends an answer with no image) it lowers the
probability of `[IMG0]` alone. With a text weight of 0.01 a small LM learns `[IMG0]` from
the image loss and starts text answers with it. The full LM loss at those tokens taught the
decision too, but it stays as high as the next word is uncertain and cost the image
conditioning (docs/findings.md). The term reads no state that conditions an image: `[IMG0]` itself is
left to the text loss, since the state that predicts it is `[IMG0]`'s voken feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmpeft.llava.model import llava_forward, unwrap
from mmpeft.models.vokens import voken_features, voken_starts


class LearnedQuery(nn.Module):
    """The decoder input of the mapper: `n` learned vectors of width `d`."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, n, d) * d ** -0.5)

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1)


class VokenMapper(nn.Module):
    """Voken states `(k, n_vokens, llm_hidden)` -> UNet conditioning `(k, n_query, out_dim)`.

    MLP (LLM hidden -> d -> d, GELU; GILL: one linear layer, `input_layers=1`) encodes the
    voken states; a pre-norm encoder-decoder
    transformer decodes a learned query against them; a final linear layer maps width `d`
    to the UNet's `cross_attention_dim` when the two differ (MiniGPT-5 has d = 1024 =
    SD 2.1's width, so none). `n_query` is the SD tokenizer's length (77)."""

    def __init__(self, llm_hidden: int, out_dim: int, n_query: int = 77, d_model: int = 1024, heads: int = 8,
                 encoder_layers: int = 4, decoder_layers: int = 4, ff: int = 4096, input_layers: int = 2):
        super().__init__()
        self.llm_hidden = llm_hidden
        self.mlp = (nn.Sequential(nn.Linear(llm_hidden, d_model), nn.GELU(), nn.Linear(d_model, d_model))
                    if input_layers == 2 else nn.Linear(llm_hidden, d_model))
        self.query = LearnedQuery(n_query, d_model)
        # the encoder built here only to turn off nested tensors, which pre-norm layers cannot use
        # (nn.Transformer would warn on every build); the same modules and initialisation
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, norm_first=True),
            encoder_layers, nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.transformer = nn.Transformer(d_model, heads, encoder_layers, decoder_layers, ff, dropout=0.0,
                                          custom_encoder=encoder, batch_first=True, norm_first=True)
        self.out = nn.Linear(d_model, out_dim) if d_model != out_dim else nn.Identity()

    def forward(self, voken_states: torch.Tensor) -> torch.Tensor:
        memory = self.mlp(voken_states)
        return self.out(self.transformer(memory, self.query(len(voken_states))))

    def unconditional(self, n_vokens: int, batch: int = 1) -> torch.Tensor:
        """The learned unconditional embedding: the mapper's output for all-zero states."""
        p = next(self.parameters())
        return self(torch.zeros(batch, n_vokens, self.llm_hidden, dtype=p.dtype, device=p.device))


def cfg_dropout(states: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the voken states of each occurrence with probability `rate`; returns the states
    and the boolean mask of dropped occurrences."""
    dropped = torch.rand(len(states), device=states.device) < rate
    return states.masked_fill(dropped[:, None, None], 0.0), dropped


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PREDICTION_TARGETS = {"epsilon": "noise", "v_prediction": "velocity", "sample": "clean latents"}  # in words


def scheduler_prediction_type(noise_scheduler) -> str:
    """What the UNet was trained to predict, from its scheduler's config (`epsilon`, the
    noise; `v_prediction`, the velocity, as in SD 2.1 at 768 px; `sample`, the clean
    latents). A scheduler config without the field predicts the noise, as diffusers reads it."""
    kind = noise_scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"noise scheduler prediction_type {kind!r} is not supported; "
                         f"supported: {', '.join(PREDICTION_TYPES)}")
    return kind


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target of the UNet's output for `latents` noised with `noise` at
    `timesteps`: the noise, the velocity (`get_velocity`) or the latents, by the scheduler's
    `prediction_type`. Training and the held-out loss both take it from here, so a
    v-prediction UNet is never scored against the noise."""
    kind = scheduler_prediction_type(noise_scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) in the form of the prediction target:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction (as
    diffusers' `train_text_to_image.py` computes them), min(SNR, gamma) for the sample."""
    a = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = a / (1 - a)
    capped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    if prediction_type == "sample":
        return capped
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")


def latent_diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, condition: torch.Tensor,
                          snr_gamma: float | None = 5.0) -> torch.Tensor:
    """Noise scaled latents at uniform timesteps, let the UNet predict its target given
    `condition` (its `encoder_hidden_states`), and return the (Min-SNR weighted) MSE. The
    target and the weights follow the scheduler's `prediction_type` (`diffusion_target`)."""
    kind = scheduler_prediction_type(noise_scheduler)
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=condition.to(latents.dtype)).sample
    target = diffusion_target(noise_scheduler, latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler.alphas_cumprod, t, snr_gamma, kind)
    return per_sample.mean()


@dataclass
class LossWeights:
    """MiniGPT-5's weights: 0.01 text + 1 image + 0.1 caption, and no decision term."""

    text: float = 0.01
    image: float = 1.0
    caption: float = 0.1
    decision: float = 0.0


def voken_decisions(input_ids: torch.Tensor, labels: torch.Tensor, voken_ids: list[int]) -> torch.Tensor:
    """Boolean `(batch, length)` mask of the labels at which an answer decides not to draw:
    each answer's first token when it is text, and the token that ends an answer's text
    when no `[IMG0]` follows (the end of turn of a text answer). An answer is a run of
    labels other than -100; `labels` hold the forced vokens `[IMG1]`.. as -100
    (`mask_forced_vokens`), so the end of turn after a voken run starts a run of its own and
    is left out, as are `[IMG0]` and every other token."""
    answer = labels != -100
    before = F.pad(answer, (1, 0))[:, :-1]  # the previous position is labelled
    after = F.pad(answer, (0, 1))[:, 1:]
    after_run = torch.isin(F.pad(input_ids, (1, 0))[:, :-1], torch.tensor(voken_ids, device=input_ids.device))
    return answer & ~after_run & (~before | ~after) & (labels != voken_ids[0])


def decision_loss(logits: torch.Tensor, decisions: torch.Tensor, first_voken: int) -> torch.Tensor:
    """Mean of -log(1 - p(`[IMG0]`)) at `decisions` (`voken_decisions`), each predicted by
    the logits one position before it: only the choice not to draw is taught, not which
    word comes instead, so the term fades once `[IMG0]` is unlikely there. Zero (with a
    gradient path) when there is none."""
    decisions = decisions.clone()
    decisions[:, 0] = False  # a label at position 0 has no prediction
    rows, cols = decisions.nonzero(as_tuple=True)
    if len(rows) == 0:
        return 0.0 * logits.sum()
    picked = logits[rows, cols - 1].float()
    others = torch.cat([picked[:, :first_voken], picked[:, first_voken + 1:]], dim=-1)
    return (torch.logsumexp(picked, -1) - torch.logsumexp(others, -1)).mean()


class MiniGPT5(nn.Module):
    """The LLaVA model (PEFT-wrapped or not), the mapper and the frozen UNet in one module,
    so one DeepSpeed engine trains and shards them together. `forward(**batch)` returns
    the loss and its parts.

    A batch holds the LLaVA inputs plus, for every voken run in row-major order, its target
    image's scaled VAE latents (`target_latents`) and, in stage 1, the SD text encoder's
    encoding of its caption (`caption_embeds`)."""

    def __init__(self, llava, mapper: VokenMapper, unet, noise_scheduler, voken_ids: list[int],
                 empty_caption: torch.Tensor | None = None, weights: LossWeights | None = None,
                 cfg_rate: float = 0.1, snr_gamma: float | None = 5.0):
        super().__init__()
        self.llava, self.mapper, self.unet = llava, mapper, unet
        self.noise_scheduler, self.voken_ids = noise_scheduler, list(voken_ids)
        self.weights, self.cfg_rate, self.snr_gamma = weights or LossWeights(), cfg_rate, snr_gamma
        self.register_buffer("empty_caption", empty_caption, persistent=False)

    def voken_states(self, batch: dict):
        """`(states (k, n, hidden), LM output)` for the batch's voken runs."""
        starts = voken_starts(batch["input_ids"], self.voken_ids)
        out = llava_forward(self.llava, {**batch, "output_hidden_states": True})
        return voken_features(out.hidden_states[-1], starts, len(self.voken_ids)), out

    def forward(self, target_latents: torch.Tensor | None = None, caption_embeds: torch.Tensor | None = None,
                **batch) -> dict[str, torch.Tensor]:
        states, out = self.voken_states(batch)
        parts = {"text_loss": out.loss}
        if self.weights.decision:
            decisions = voken_decisions(batch["input_ids"], batch["labels"], self.voken_ids)
            parts["decision_loss"] = decision_loss(out.logits, decisions, self.voken_ids[0])
        targets = 0 if target_latents is None else len(target_latents)
        if targets != len(states):
            raise ValueError(f"batch has {len(states)} voken run(s) but {targets} target image(s)")
        if targets == 0:  # no image in this batch: a zero that still touches the mapper
            parts["image_loss"] = 0.0 * self.mapper.unconditional(len(self.voken_ids)).sum()
        else:
            states, dropped = cfg_dropout(states, self.cfg_rate if self.training else 0.0)
            condition = self.mapper(states.to(next(self.mapper.parameters()).dtype))
            parts["image_loss"] = latent_diffusion_loss(self.unet, self.noise_scheduler, target_latents, condition,
                                                        self.snr_gamma)
            if caption_embeds is not None:
                target = torch.where(dropped[:, None, None], self.empty_caption.to(caption_embeds), caption_embeds)
                parts["caption_loss"] = F.mse_loss(condition.float(), target.float())
        w = self.weights
        loss = w.text * parts["text_loss"] + w.image * parts["image_loss"]
        if "caption_loss" in parts:
            loss = loss + w.caption * parts["caption_loss"]
        if "decision_loss" in parts:
            loss = loss + w.decision * parts["decision_loss"]
        return {"loss": loss, **parts}

    @property
    def llava_model(self):
        """The `LlavaForConditionalGeneration` inside (unwrapped from PEFT)."""
        return unwrap(self.llava)


def mapper_parts(mapper: VokenMapper) -> dict[str, nn.Module]:
    """The mapper's parts whose trainability the recipes set: stage 1 trains all three,
    stage 2 only the transformer (with the output layer)."""
    return {"mlp": mapper.mlp, "query": mapper.query, "transformer": nn.ModuleList([mapper.transformer, mapper.out])}
