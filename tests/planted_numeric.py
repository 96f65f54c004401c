"""Numerical twins for the search and the minimiser: each pair agrees in exact arithmetic
and differs only where float32 runs out (or where a signature is unusual)."""
import torch
import torch.nn.functional as F


# --- softplus: exp overflows in float32 above 88.72 -----------------------------------
def softplus(x):
    return F.softplus(x).sum()


def softplus_naive(x):
    return torch.log1p(torch.exp(x)).sum()


# --- a one-argument and a three-argument pair (spec inference) -------------------------
def energy(x):
    return (x**2).mean()


def energy_twice_halved(x):
    return (x * x).sum() / x.numel()


def triplet(anchor, positive, negative):
    return F.triplet_margin_loss(anchor, positive, negative, margin=1.0)


def triplet_by_hand(anchor, positive, negative, *, margin=1.0):
    d_pos = F.pairwise_distance(anchor, positive)
    d_neg = F.pairwise_distance(anchor, negative)
    return torch.clamp_min(d_pos - d_neg + margin, 0).mean()


# --- SSIM from global statistics: float32 E[x^2] - E[x]^2 cancels on near-flat images ---
C1, C2 = 0.01**2, 0.03**2


def _ssim(x, y):
    dims = tuple(range(2, x.ndim))
    mx, my = x.mean(dims), y.mean(dims)
    vx = (x * x).mean(dims) - mx * mx  # the textbook shortcut: catastrophic cancellation
    vy = (y * y).mean(dims) - my * my
    cxy = (x * y).mean(dims) - mx * my
    return (((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))).mean()


def ssim_float32(x, y):
    return 1 - _ssim(x, y)


def ssim_float64(x, y):
    return (1 - _ssim(x.double(), y.double())).to(x.dtype)
