"""Train a small CNN on scikit-learn's bundled digits with fastbn's batch norm.

    python examples/torch_digits_cnn.py [--steps 200] [--channels-last]

The model is written with ordinary ``torch.nn.BatchNorm2d``/``BatchNorm1d``;
``fastbn.torch.convert(model)`` swaps them for fastbn's drop-in modules
(same parameters, buffers and state-dict keys).  The script trains the model
twice from the same seed, once with PyTorch's batch norm and once converted,
and prints both loss curves, the largest relative difference between them
and the test accuracy.  Needs torch and scikit-learn.
"""

import argparse
import copy

import numpy as np
import torch
from torch import nn

import fastbn.torch as fbt


def digits(seed=0):
    """(x_train, y_train, x_test, y_test): 8x8 digit images as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_model(seed=0):
    """conv-BN-ReLU x2, pool, linear-BN1d-ReLU, linear: 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10))


def train(model, x, y, steps, batch=64, lr=0.05, channels_last=False):
    """SGD with momentum over fixed mini-batches; returns the per-step losses."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for step in range(steps):
        i = (step * batch) % (len(x) - batch + 1)
        xb = x[i:i + batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        loss = loss_fn(model(xb), y[i:i + batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    x, y, xt, yt = digits()
    torch_model = make_model()
    fast_model = fbt.convert(copy.deepcopy(torch_model))
    l_torch = train(torch_model, x, y, args.steps, channels_last=args.channels_last)
    l_fast = train(fast_model, x, y, args.steps, channels_last=args.channels_last)
    rel = np.abs(np.array(l_fast) - np.array(l_torch)) / np.abs(np.array(l_torch))
    for s in range(0, args.steps, max(args.steps // 10, 1)):
        print(f"step {s:4d}  loss torch {l_torch[s]:.6f}  fastbn {l_fast[s]:.6f}")
    print(f"max relative loss difference over {args.steps} steps: {rel.max():.2e}")
    print(f"test accuracy: torch {accuracy(torch_model, xt, yt):.3f}  "
          f"fastbn {accuracy(fast_model, xt, yt):.3f}")


if __name__ == "__main__":
    main()
