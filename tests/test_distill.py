"""Reflow distillation: a student that samples in one pass what its teacher needs many for."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mupad_core.train.distill import reflow_loss, teacher_sample
from mupad_core.transport import path


class ToyFlow(nn.Module):
    """A velocity MLP on 2-D points, called like a MupadSiT (x, t, conditions, concat=, cls=)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, conditions=None, concat=None, cls=None):
        flat = x.reshape(x.shape[0], 2)
        return SimpleNamespace(velocity=self.net(torch.cat([flat, t[:, None].float()], 1)).reshape(x.shape),
                               cls_velocity=None)


def data(n, generator):
    """Four well-separated modes: independent pairs make curved paths, one Euler step lands between modes."""
    centres = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])
    return (centres[torch.randint(0, 4, (n,), generator=generator)] + 0.1 * torch.randn(n, 2, generator=generator)
            ).reshape(n, 2, 1, 1)


def test_reflow_makes_one_step_match_the_teachers_many_steps():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = ToyFlow()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(1000):  # plain flow matching on independent (noise, data) pairs
        x = data(256, generator)
        noise = torch.randn(x.shape, generator=generator)
        t = torch.rand(256, generator=generator)
        loss = ((teacher(path.interpolate(x, noise, t), t).velocity - (x - noise)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.requires_grad_(False)
    student = ToyFlow()
    student.load_state_dict(teacher.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(500):
        terms = reflow_loss(student, teacher, torch.zeros(256, 2, 1, 1), None, 16, generator)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    noise = torch.randn(512, 2, 1, 1, generator=generator)
    reference = teacher_sample(teacher, noise, None, 64)  # where the teacher's ODE takes each noise
    one_step_teacher = teacher_sample(teacher, noise, None, 1)
    one_step_student = teacher_sample(student, noise, None, 1)
    err_teacher = (one_step_teacher - reference).pow(2).sum(1).mean()
    err_student = (one_step_student - reference).pow(2).sum(1).mean()
    assert err_student < 0.3 * err_teacher, (float(err_student), float(err_teacher))


def test_mupad_train_distills_a_bundled_model_into_a_loadable_student(tmp_path):
    from mupad_core.demo import sample_slide_path
    from mupad_core.generate.handles import load_handle
    from mupad_core.models.checkpoint import load_model, read_pipeline
    from mupad_core.train.config import ConfigError, load_config
    from mupad_core.train.run import train

    config = {"name": "student", "out_dir": str(tmp_path / "runs"), "task": "he2ihc", "vae": "taef2",
              "template": "source", "distill": {"teacher": "demo-he2ihc", "teacher_steps": 2, "student_steps": 3},
              "data": {"kind": "slides", "slides": [str(sample_slide_path())], "patch_px": 64, "mpp": 2.0,
                       "length": 16, "source_view": "haematoxylin"},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-4, "checkpoint_every": 3, "log_every": 1}}
    path_ = tmp_path / "student.yaml"
    path_.write_text(yaml.safe_dump(config))
    result = train(load_config(path_), progress_bar=False, log=lambda m: None)
    assert all(np.isfinite(r["loss_total"]) for r in result.history)
    pipeline = read_pipeline(result.model_dir)
    assert pipeline["teacher_steps"] == 2 and pipeline["distilled_from"].endswith("demo-he2ihc")
    assert pipeline["source_view"] == "haematoxylin"  # the teacher's view of the source, kept
    from mupad_core.generate.config import StainConfig

    assert pipeline["steps"] == 3 and StainConfig.for_model(str(result.model_dir)).steps == 3  # made for 3 passes
    from mupad_core.zoo import resolve_model

    student, teacher = load_model(result.model_dir), load_model(resolve_model("demo-he2ihc"))
    assert student.config.hidden_size == teacher.config.hidden_size  # the teacher's architecture
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert load_handle(str(result.model_dir), "he2ihc").model_id == str(result.model_dir)

    config["data"]["source_view"] = "rgb"  # a student must see the source as its teacher does
    path_.write_text(yaml.safe_dump({**config, "name": "blind"}))
    with pytest.raises(ConfigError, match="source_view is 'rgb' but the teacher .* sees its source as 'haematoxylin'"):
        train(load_config(path_), progress_bar=False, log=lambda m: None)
    path_.write_text(yaml.safe_dump({**config, "distill": {"teacher": "demo-he2ihc", "student_steps": 0}}))
    with pytest.raises(ConfigError, match="distill.student_steps"):
        load_config(path_)


def test_a_text_model_distils_with_its_guidance_into_an_unguided_few_step_student(tmp_path):
    """Guidance distillation: pairs from the bundled text -> H&E teacher's guided ODE under each
    crop's own caption; the student records guidance 0 (one pass a step) and generates."""
    from PIL import Image

    from mupad_core.demo import sample_slide_path
    from mupad_core.generate.roi import load_generator
    from mupad_core.models.checkpoint import load_model, read_pipeline
    from mupad_core.models.conditions import Conditions
    from mupad_core.slide import open_slide
    from mupad_core.train.config import ConfigError, load_config
    from mupad_core.train.run import train
    from mupad_core.transport.samplers import GuidedVelocity
    from mupad_core.zoo import resolve_model

    captions = ["H&E FFPE section of squamous epithelium", "H&E FFPE section of dermis with collagen"]
    rows = ["source,caption,split"]
    with open_slide(sample_slide_path()) as reader:  # real tissue of the bundled slide at its 0.5 µm/px
        for i, (x, y) in enumerate([(1000, 1400), (1300, 1900)]):
            Image.fromarray(reader.read_region(0, x, y, 256, 256)[..., :3]).save(tmp_path / f"crop{i}.png")
            rows.append(f"crop{i}.png,{captions[i]},train")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = {"name": "text-student", "out_dir": str(tmp_path / "runs"), "task": "text2he", "vae": "taef2",
              "conditions": {"text": {"encoder": "minilm"}},
              "distill": {"teacher": "demo-text2he", "teacher_steps": 2, "student_steps": 2, "teacher_guidance": 2.0},
              "data": {"kind": "manifest", "manifest": str(tmp_path / "manifest.csv"), "split": "train",
                       "mpp": 0.5, "crop_px": 256},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-4, "checkpoint_every": 2, "log_every": 1}}
    path_ = tmp_path / "student.yaml"
    path_.write_text(yaml.safe_dump(config))
    result = train(load_config(path_), progress_bar=False, log=lambda m: None)
    assert all(np.isfinite(r["loss_total"]) for r in result.history)
    pipeline = read_pipeline(result.model_dir)
    assert pipeline["guidance"] == 0.0 and pipeline["distilled_guidance"] == 2.0 and pipeline["steps"] == 2
    assert pipeline["conditions"] == ["text"] and pipeline["encoders"]["text"]["name"] == "minilm"
    gen = load_generator(str(result.model_dir))
    tile = gen.generate(64, 64, gen.conditions(text=captions[0]), steps=2, guidance=0.0, seed=0)
    assert tile.shape == (3, 64, 64) and float(tile.std()) > 0.01

    # The teacher's pairs follow the guided ODE: one Euler step is x + v_c + 2 (v_c - v_u).
    teacher = load_model(resolve_model("demo-text2he")).eval()
    tokens = gen.conditions(text=captions[1])
    noise = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided = teacher_sample(teacher, noise, None, 1, tokens, guidance=2.0)
        v_c = teacher(noise, torch.zeros(1), tokens).velocity
        v_u = teacher(noise, torch.zeros(1), tokens.without("text")).velocity
        plain = teacher_sample(teacher, noise, None, 1, tokens)
    assert torch.allclose(guided, noise + v_c + 2.0 * (v_c - v_u), atol=1e-4)
    assert not torch.allclose(guided, plain, atol=1e-3)  # the guidance is in the pairs
    assert isinstance(tokens, Conditions) and GuidedVelocity(teacher, tokens).drop == ("text",)

    path_.write_text(yaml.safe_dump({**config, "conditions": {}, "template": "source"}))
    with pytest.raises(ConfigError, match="distill.teacher_guidance"):
        load_config(path_)
