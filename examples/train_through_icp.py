"""Train a network through ICP: its pose estimate is refined by differentiable ICP and the loss is
taken after refinement, so gradients flow from the loss through the ICP iterations into the net.

A toy version of the depth experiment: a small MLP sees a global descriptor of the source cloud
and predicts the translation that brings it near the target; soft-correspondence ICP, unrolled,
does the rest.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import difficp


def make_batch(g: torch.Generator, batch: int, n: int) -> tuple[torch.Tensor, ...]:
    """Source clouds ``(B, N, 3)``, targets ``(B, N, 3)`` and true translations ``(B, 3)``."""
    target = torch.rand(batch, n, 3, generator=g)
    target[..., 2] = 0.3 * torch.sin(4 * target[..., 0])
    offset = 0.3 * (torch.rand(batch, 3, generator=g) - 0.5)
    return target - offset[:, None], target, offset


def main() -> None:
    quick = bool(os.environ.get("DIFFICP_EXAMPLE_QUICK"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    icp = difficp.ICP(
        correspondence="soft",
        temperature=1e-3,
        soft_k=8,
        max_iterations=3,
        max_distance=0.2,
        rejection="soft",
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    steps = 15 if quick else 100
    losses = []
    for step in range(steps):
        source, target, offset = make_batch(g, batch=8, n=128)
        # descriptor: mean position of each cloud (what a real network would learn to extract)
        features = torch.cat([source.mean(1), target.mean(1)], dim=-1)
        init = torch.eye(4).repeat(len(source), 1, 1)
        init[:, :3, 3] = net(features)
        result = icp(source, target, init=init)
        loss = (result.transform[:, :3, 3] - offset).square().sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()  # through the ICP iterations into the network
        optimiser.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss after ICP {loss.item():.2e}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"mean loss of the first 3 steps {first:.2e}, of the last 3 {last:.2e}")
    assert last < first


if __name__ == "__main__":
    main()
