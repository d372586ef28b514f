"""Interpolant, loss, samplers, guidance, inversion and attention-map hooks."""

import pytest
import torch

from helpers import randomize, tiny_sit
from mupad_core.models.attention_control import AttentionMapController
from mupad_core.models.conditions import Conditions
from mupad_core.transport import path
from mupad_core.transport.loss import LossConfig, alignment_loss, drop_conditions, training_loss
from mupad_core.transport.samplers import annealed, interval, invert, make_noise, sample


def conds(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditions(tokens={"image": torch.randn(batch, 5, 32, generator=g), "text": torch.randn(batch, 3, 24, generator=g)})


@pytest.fixture(scope="module")
def model():
    return randomize(tiny_sit(), std=0.03).eval()


def test_interpolant_convention():
    data, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = path.interpolate(data, noise, t)
    assert torch.allclose(xt[0], noise[0]) and torch.allclose(xt[2], data[2])
    v = path.velocity_target(data, noise)
    assert torch.allclose(path.data_prediction(xt, v, t), data, atol=1e-6)
    assert torch.allclose(path.noise_prediction(xt, v, t), noise, atol=1e-6)


def test_time_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = path.sample_time(4096, kind, generator=g)
        assert 0 < t.min() and t.max() < 1
    assert path.sample_time(4096, "logit_normal", generator=g).std() < path.sample_time(4096, "uniform", generator=g).std()
    with pytest.raises(ValueError):
        path.sample_time(2, "cosine")


def test_condition_dropout_rate():
    c = Conditions(tokens={"image": torch.zeros(4000, 1, 2), "text": torch.zeros(4000, 1, 2)})
    dropped = drop_conditions(c, 0.1, torch.Generator().manual_seed(0))
    for name in ("image", "text"):
        rate = 1 - dropped.presence[name].mean().item()
        assert 0.08 < rate < 0.12
    assert not torch.equal(dropped.presence["image"], dropped.presence["text"])  # independent per modality


def test_loss_terms_and_backward():
    m = randomize(tiny_sit(cls_dim=8, align_depth=1, align_dim=6))
    x = torch.randn(2, 4, 16, 16)
    terms = training_loss(m, x, conds(), cls_target=torch.randn(2, 8), teacher_features=torch.randn(2, 6, 4, 4),
                          config=LossConfig(cls_weight=0.5, align_weight=0.25), generator=torch.Generator().manual_seed(0))
    expected = terms.velocity + 0.5 * terms.cls + 0.25 * terms.align
    assert torch.allclose(terms.total, expected)
    terms.total.backward()
    assert m.projector.net[0].weight.grad is not None


def test_alignment_loss_is_negative_cosine():
    f = torch.randn(2, 6, 4, 4)
    assert alignment_loss(f, f).item() == pytest.approx(-1.0, abs=1e-5)
    assert alignment_loss(f, -f).item() == pytest.approx(1.0, abs=1e-5)
    tokens = f.flatten(2).transpose(1, 2)  # (B, N, D) square grid accepted
    assert alignment_loss(f, tokens).item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_same_seed_same_sample(model, method):
    c = conds()
    run = lambda seed: sample(model, make_noise((2, 4, 16, 16), seed), c, method=method, steps=6,  # noqa: E731
                              guidance=1.5, generator=torch.Generator().manual_seed(seed)).x
    a, b, other = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)


def test_guidance_zero_skips_unconditional_pass(model):
    noise = make_noise((2, 4, 16, 16), 0)
    plain = sample(model, noise, conds(), steps=8, guidance=0.0)
    assert plain.network_passes == 8
    guided = sample(model, noise, conds(), steps=8, guidance=annealed(2.5, 0.0))
    # Annealed 2.5 -> 0 is still > 0 at every step start: all 8 steps guided.
    assert guided.network_passes == 8 * 2
    assert not torch.allclose(plain.x, guided.x)
    interval_run = sample(model, noise, conds(), steps=8, guidance=interval(2.0, 0.0, 0.5))
    assert interval_run.network_passes == 5 * 2 + 3


def test_guidance_matches_manual_cfg(model):
    c = conds()
    x, t = torch.randn(2, 4, 16, 16), 0.3
    one = sample(model, x, c, steps=1, t_start=t, t_end=t + 0.1, guidance=2.0).x
    with torch.no_grad():
        tt = torch.full((2,), t)
        vc = model(x, tt, c).velocity
        vu = model(x, tt, None).velocity
    manual = x + 0.1 * (vc + 2.0 * (vc - vu))
    assert torch.allclose(one, manual, atol=1e-5)


def test_heun_is_more_accurate_than_euler_on_a_known_flow():
    # For data ~ N(mu, s^2) the exact velocity is known in closed form.
    mu, s = 2.0, 0.5

    class Exact(torch.nn.Module):
        def forward(self, x, t, conditions=None, cls=None, concat=None):
            tt = path.expand_t(t, x)
            var = tt**2 * s**2 + (1 - tt) ** 2
            mean_x0 = (1 - tt) * (x - tt * mu) / var  # E[noise | x_t]
            mean_x1 = mu + tt * s**2 * (x - tt * mu) / var
            return type("O", (), {"velocity": mean_x1 - mean_x0, "cls_velocity": None})()

    noise = make_noise((20000, 1), 0)
    target_mean, target_std = mu, s
    errs = {}
    for method in ("euler", "heun"):
        x = sample(Exact(), noise, method=method, steps=4).x
        errs[method] = abs(x.mean().item() - target_mean) + abs(x.std().item() - target_std)
    assert errs["heun"] < errs["euler"]
    x = sample(Exact(), noise, method="sde", steps=200, generator=torch.Generator().manual_seed(0)).x
    assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - s) < 0.02


def test_inversion_then_sampling_returns_the_input(model):
    c = conds()
    data = torch.randn(2, 4, 16, 16)
    noise = invert(model, data, c, steps=20, fixed_point_iters=6).x
    back = sample(model, noise, c, steps=20).x
    err = (back - data).abs().max().item()
    assert err < 1e-4, err
    # The naive (DDIM-style) inversion is measurably worse: the refinement matters.
    naive = invert(model, data, c, steps=20, fixed_point_iters=0).x
    naive_err = (sample(model, naive, c, steps=20).x - data).abs().max().item()
    assert naive_err > 10 * err


def test_attention_record_inject_and_parallel():
    model = randomize(tiny_sit(), std=0.15).eval()  # sharp attention, so maps differ between inputs
    x, t, c = torch.randn(2, 4, 16, 16), torch.full((2,), 0.4), conds()
    with torch.no_grad():
        plain = model(x, t, c).velocity
        rec = AttentionMapController("record")
        model.set_attention_processor(rec)
        recorded = model(x, t, c).velocity
        assert len(rec.maps) == len(model.blocks)
        assert torch.allclose(recorded, plain, rtol=1e-4, atol=1e-4)  # explicit softmax == fused SDPA
        # Injecting x's maps into x changes nothing; into another input y it does.
        inj = AttentionMapController("inject")
        inj.maps = rec.maps
        model.set_attention_processor(inj)
        own = model(x, t, c).velocity
        y = torch.randn_like(x)
        y_injected = model(y, t, c).velocity
        model.set_attention_processor(None)
        y_plain = model(y, t, c).velocity
        assert torch.allclose(own, plain, rtol=1e-4, atol=1e-4)
        assert (y_injected - y_plain).abs().max() > 1e-4
        # Parallel: [source; target] with source == target equals the plain pass.
        model.set_attention_processor(AttentionMapController("parallel"))
        both = model(torch.cat([x, x]), torch.cat([t, t]), Conditions.concat([c, c])).velocity
        model.set_attention_processor(None)
    assert torch.allclose(both[2:], plain, rtol=1e-4, atol=1e-4)


def test_ema_warms_up_instead_of_keeping_the_initial_weights():
    """With a fixed 0.999 decay, 1,500 steps keep 22% of the initial weights; the warm-up
    makes a short run's EMA follow the trained weights."""
    from mupad_core.train.ema import ema_decay_at, make_ema

    model = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_ema(model, decay=0.999)
    ema.update_parameters(model)  # the first update copies the (zero) initial weights
    for step in range(299):
        with torch.no_grad():
            model.weight.fill_(1.0)  # "trained" weights, far from the zero initialisation
        ema.update_parameters(model)
    assert ema.module.weight.mean() > 0.99  # fixed 0.999 would give 1 - 0.999**299 = 0.26
    assert ema_decay_at(0.999, 0) == 0.1 and ema_decay_at(0.999, 10**6) == 0.999
