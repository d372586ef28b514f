"""Text-image alignment with a CLIP-style dual encoder the test builds, trains and saves itself."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from mupad_core.demo import sample_slide_path
from mupad_core.evaluate.alignment import TextImageEncoder, text_image_alignment

CAPTIONS = ["dense dark nuclei", "pink eosin stroma", "white empty glass", "purple mixed tissue"]
# Level-0 x, y of 64-px crops of the bundled slide: its darkest, pinkest, emptiest and a purple one.
CROPS = [(1152, 1664), (896, 2880), (2112, 0), (1152, 960)]


def tiny_clip(folder):
    """A 2-layer CLIP with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                   ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model, fast


def crops():
    from mupad_core.slide import open_slide

    with open_slide(sample_slide_path()) as reader:
        tiles = [reader.read_region(0, x, y, 64, 64) for x, y in CROPS]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255


def test_alignment_of_a_trained_dual_encoder_beats_shuffled_captions(tmp_path):
    folder = tmp_path / "clip"
    model, tokenizer = tiny_clip(folder)
    images = crops()
    encoder = TextImageEncoder(folder)
    before = text_image_alignment(encoder, images, CAPTIONS)
    # Contrastive training on the four pairs (what CLIP fine-tuning does), then saved again.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    pixels = (torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
              - encoder.mean) / encoder.std
    for _ in range(200):
        loss = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                     return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    after = text_image_alignment(TextImageEncoder(folder), images, CAPTIONS)
    assert after["top1_retrieval"] == 1.0 and after["cosine"] > after["cosine_shuffled"] + 0.3, after
    assert after["cosine"] - after["cosine_shuffled"] > before["cosine"] - before["cosine_shuffled"]


def test_mupad_eval_reports_alignment_from_a_captions_table(tmp_path, capsys):
    from mupad_core.cli import main

    folder = tmp_path / "clip"
    tiny_clip(folder)
    for name in ("pred", "ref"):
        (tmp_path / name).mkdir()
    images = (crops().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    rows = ["image,caption"]
    for i, (tile, caption) in enumerate(zip(images, CAPTIONS)):
        Image.fromarray(tile).save(tmp_path / "pred" / f"p{i}.png")
        Image.fromarray(tile).save(tmp_path / "ref" / f"p{i}.png")
        rows.append(f"images/p{i}.png,{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    code = main(["eval", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "-o", str(tmp_path / "r"),
                 "--resamples", "10", "--captions", str(tmp_path / "pairs.csv"), "--text-image-encoder", str(folder)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "r" / "report.json").read_text())
    alignment = results["sets"][0]["alignment"]
    assert alignment["pairs"] == 4 and alignment == {**results["reference"]["alignment"]}
    assert "Text-image alignment" in (tmp_path / "r" / "report.md").read_text()
    code = main(["eval", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "-o", str(tmp_path / "s"),
                 "--captions", str(tmp_path / "pairs.csv")])
    assert code == 1 and "--text-image-encoder" in capsys.readouterr().err
