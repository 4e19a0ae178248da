"""A training-side sketch: feed pre-extracted features to a model step.

    merge-cli extract --input examples/media --out feats.h5
    python examples/train_step.py feats.h5

It reads the features through `FeatureDataset` in DataLoader worker processes, packs a batch of
variable-length samples into one token sequence (with `cu_seqlens`, as varlen attention wants),
and runs one optimizer step of a toy model. With `--output merged` features (the default without a
projector) the SpatialMergeProjector is part of what is trained; with `projected` features the
tokens are already at the LLM width and go straight in.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from merge_cli import FeatureDataset, SpatialMergeProjector, open_features


def collate(samples):
    """Variable-length samples -> one packed (sum of tokens, D) tensor plus where each starts."""
    tokens = [s.tokens.reshape(-1, s.tokens.shape[-1]) for s in samples]  # (t * h/2 * w/2, D) each
    lengths = torch.tensor([len(t) for t in tokens])
    cu_seqlens = torch.zeros(len(tokens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return {
        "keys": [s.key for s in samples],
        "tokens": torch.cat(tokens),
        "cu_seqlens": cu_seqlens,
        "grid_thw": torch.tensor([list(s.grid_thw) for s in samples]),  # like Qwen2-VL's image_grid_thw
    }


class ToyVisionLanguageStep(nn.Module):
    """Stands in for the LLM: vision tokens -> (projector) -> a small head and a made-up loss."""

    def __init__(self, output: str, token_dim: int, llm_dim: int = 64):
        super().__init__()
        self.output = output
        if output == "merged":
            # The stored tokens are 2x2-merged tower features (4C wide, before ln_q): train the projector.
            self.projector = SpatialMergeProjector(llm_dim=llm_dim, vit_dim=token_dim // 4)
            width = llm_dim
        else:
            self.projector = None
            width = token_dim
        self.head = nn.Linear(width, 1)

    def forward(self, batch) -> torch.Tensor:
        tokens = batch["tokens"].float()
        if self.projector is not None:
            tokens = self.projector.project_merged(tokens)  # (N, 4C) -> (N, llm_dim)
        scores = self.head(tokens).squeeze(-1)  # (N,)
        per_sample = torch.segment_reduce(scores, "mean", offsets=batch["cu_seqlens"])
        return (per_sample**2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", help="a merge-cli output, e.g. feats.h5")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with open_features(args.features) as features:
        output, token_dim = features.attrs["output"], int(features.attrs["token_dim"])
        print(f"{len(features)} samples, output {output}, tokens {token_dim} wide, tower {features.attrs['tower']}")

    dataset = FeatureDataset(args.features)  # each worker process opens its own file handles
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate
    )
    model = ToyVisionLanguageStep(output, token_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, batch in enumerate(loader):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: {len(batch['keys'])} samples, {len(batch['tokens'])} tokens, loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
