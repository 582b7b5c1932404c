"""The latent diffusion loss regresses what the scheduler says the UNet predicts (noise,
velocity or clean latents), with the matching Min-SNR weights, in training and in the
held-out loss alike."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from mmpeft.minigpt5.checkpoint import training_scheduler
from mmpeft.minigpt5.evaluation import conditioning_gap
from mmpeft.minigpt5.model import diffusion_target, latent_diffusion_loss, min_snr_weights

GAMMA = 5.0


class StubUNet(nn.Module):
    """A stand-in UNet whose prediction depends on the noisy latents, the timestep and the
    condition, so a wrong target or weight changes the loss."""

    def forward(self, noisy, t, encoder_hidden_states):
        shift = encoder_hidden_states.float().mean(dim=(1, 2))[:, None, None, None]
        return SimpleNamespace(sample=0.5 * noisy + shift + t.float()[:, None, None, None] / 1000)


def _inputs(n=32):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 77, 16, generator=gen)


def _by_hand(scheduler, latents, cond, seed, target_of, weight_of):
    """Draw noise and timesteps as `latent_diffusion_loss` does, and score the stub's
    prediction against `target_of(noise, a)` with weights `weight_of(snr)`."""
    torch.manual_seed(seed)
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    a = scheduler.alphas_cumprod[t][:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = StubUNet()(noisy, t, cond).sample
    per_sample = ((pred - target_of(noise, a)) ** 2).mean(dim=(1, 2, 3))
    snr = a.flatten() / (1 - a.flatten())
    assert (snr > GAMMA).any() and (snr < GAMMA).any()  # both sides of the Min-SNR cap are drawn
    return (per_sample * weight_of(snr)).mean(), noise, t


def test_v_prediction_regresses_the_velocity_with_the_v_form_of_min_snr():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, cond = _inputs()
    torch.manual_seed(0)
    loss = latent_diffusion_loss(StubUNet(), scheduler, latents, cond, GAMMA)

    def velocity(noise, a):
        return a.sqrt() * noise - (1 - a).sqrt() * latents

    expected, noise, t = _by_hand(scheduler, latents, cond, 0, velocity,
                                  lambda snr: snr.clamp(max=GAMMA) / (snr + 1))
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, t),
                               scheduler.get_velocity(latents, noise, t))
    torch.testing.assert_close(loss, expected)
    # what the loss would be with the noise as the target, or with the epsilon weights
    as_noise, _, _ = _by_hand(scheduler, latents, cond, 0, lambda noise, a: noise,
                              lambda snr: snr.clamp(max=GAMMA) / (snr + 1))
    eps_weights, _, _ = _by_hand(scheduler, latents, cond, 0, velocity, lambda snr: snr.clamp(max=GAMMA) / snr)
    assert abs(loss - as_noise) > 0.05 * loss and abs(loss - eps_weights) > 0.05 * loss


def test_epsilon_loss_is_the_noise_mse_with_min_snr_over_snr_as_before():
    scheduler = DDPMScheduler(prediction_type="epsilon")
    latents, cond = _inputs()
    torch.manual_seed(1)
    loss = latent_diffusion_loss(StubUNet(), scheduler, latents, cond, GAMMA)
    expected, _, _ = _by_hand(scheduler, latents, cond, 1, lambda noise, a: noise,
                              lambda snr: snr.clamp(max=GAMMA) / snr)
    torch.testing.assert_close(loss, expected)
    torch.manual_seed(1)
    unweighted = latent_diffusion_loss(StubUNet(), scheduler, latents, cond, None)
    plain, _, _ = _by_hand(scheduler, latents, cond, 1, lambda noise, a: noise, torch.ones_like)
    torch.testing.assert_close(unweighted, plain)


def test_sample_prediction_regresses_the_clean_latents_with_min_snr():
    scheduler = DDPMScheduler(prediction_type="sample")
    latents, cond = _inputs()
    torch.manual_seed(2)
    loss = latent_diffusion_loss(StubUNet(), scheduler, latents, cond, GAMMA)
    expected, _, _ = _by_hand(scheduler, latents, cond, 2, lambda noise, a: latents,
                              lambda snr: snr.clamp(max=GAMMA))
    torch.testing.assert_close(loss, expected)


def test_min_snr_weights_take_the_form_of_the_target():
    alphas = torch.tensor([0.99, 5 / 6, 0.5])  # SNR 99, 5, 1
    t = torch.tensor([0, 1, 2])
    torch.testing.assert_close(min_snr_weights(alphas, t, GAMMA, "epsilon"), torch.tensor([5 / 99, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights(alphas, t, GAMMA, "v_prediction"), torch.tensor([5 / 100, 5 / 6, 0.5]))
    torch.testing.assert_close(min_snr_weights(alphas, t, GAMMA, "sample"), torch.tensor([5.0, 5.0, 1.0]))


def test_an_unsupported_prediction_type_is_named_with_the_supported_ones():
    scheduler = DDPMScheduler(prediction_type="flow")  # diffusers only objects when it steps
    latents, cond = _inputs(2)
    message = "prediction_type 'flow' is not supported; supported: epsilon, v_prediction, sample"
    with pytest.raises(ValueError, match=message):
        latent_diffusion_loss(StubUNet(), scheduler, latents, cond, GAMMA)
    with pytest.raises(ValueError, match=message):
        training_scheduler(SimpleNamespace(scheduler=DDIMScheduler(prediction_type="flow")))


def test_the_training_scheduler_keeps_the_pipelines_prediction_type():
    # SD 2.1 (768 px) ships a DDIM scheduler config with prediction_type v_prediction
    pipeline = SimpleNamespace(scheduler=DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear"))
    scheduler = training_scheduler(pipeline)
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.alphas_cumprod, pipeline.scheduler.alphas_cumprod)


class _Mapper(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.dtype = dtype

    def unconditional(self, n_vokens, batch=1):
        return torch.zeros(batch, 77, 16, dtype=self.dtype)


class Bf16UNet(StubUNet):
    """The stub as a bf16 UNet: like a real one, it refuses inputs in another dtype."""

    def forward(self, noisy, t, encoder_hidden_states):
        if (noisy.dtype, encoder_hidden_states.dtype) != (torch.bfloat16, torch.bfloat16):
            raise RuntimeError(f"bf16 UNet given {noisy.dtype} latents and {encoder_hidden_states.dtype} conditions")
        return super().forward(noisy, t, encoder_hidden_states)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_held_out_loss_scores_the_same_target_as_training(kind):
    scheduler = DDPMScheduler(prediction_type=kind)
    model = SimpleNamespace(unet=StubUNet(), noise_scheduler=scheduler, mapper=_Mapper(), voken_ids=list(range(8)))
    latents, cond = _inputs(6)
    gap = conditioning_gap(model, cond, latents, draws=1, seed=4)
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (len(latents),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
    right = ((StubUNet()(noisy, t, cond).sample - target) ** 2).mean()
    assert gap["right"] == pytest.approx(right.item(), rel=1e-5)
    if kind == "v_prediction":
        as_noise = ((StubUNet()(noisy, t, cond).sample - noise) ** 2).mean()
        assert abs(gap["right"] - as_noise.item()) > 0.05 * gap["right"]


def test_the_held_out_loss_runs_a_bf16_model_with_the_same_draws_as_float32():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, cond = _inputs(6)
    full = conditioning_gap(SimpleNamespace(unet=StubUNet(), noise_scheduler=scheduler, mapper=_Mapper(),
                                            voken_ids=list(range(8))), cond, latents, draws=2, seed=4)
    bf16 = SimpleNamespace(unet=Bf16UNet(), noise_scheduler=scheduler, mapper=_Mapper(torch.bfloat16),
                           voken_ids=list(range(8)))
    half = conditioning_gap(bf16, cond.bfloat16(), latents.bfloat16(), draws=2, seed=4)
    for name in ("right", "shuffled", "unconditional"):
        assert half[name] == pytest.approx(full[name], rel=0.03), name
