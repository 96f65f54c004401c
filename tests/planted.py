"""Implementations with planted divergences, each twin differing in one narrow way.

Used by the minimiser and sweep tests: the minimiser must reduce each to its essence.
"""
import torch
import torch.nn.functional as F

FAR = 100.0
BLUR_THRESHOLD = 0.031


# --- differs only when one point lies far from the rest ------------------------------
def norms(x, y):
    return x.norm(dim=-1).mean() + y.norm(dim=-1).mean()


def norms_clamped(x, y):
    # The twin silently clamps distances, as a "stabilised" fork might.
    return x.norm(dim=-1).clamp(max=FAR).mean() + y.norm(dim=-1).clamp(max=FAR).mean()


# --- differs only on duplicate points -------------------------------------------------
def _pairwise_sq(x):
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    return ((x[i] - x[j]) ** 2).sum(-1)


def spread_safe(x, y):
    d2 = _pairwise_sq(x)
    return d2.clamp_min(1e-20).sqrt().sum() + y.sum() * 0


def spread_naive(x, y):
    # sqrt'(0) = inf: NaN gradients as soon as two points coincide.
    return _pairwise_sq(x).sqrt().sum() + y.sum() * 0


# --- differs only for one class out of C ----------------------------------------------
def cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def cross_entropy_drops_last_class(logits, target):
    # Classic background-class bug: samples of the last class are silently weighted 0.5.
    weight = torch.ones(logits.shape[-1], dtype=logits.dtype)
    weight[-1] = 0.5
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return (per_sample * weight[target]).mean()


# --- differs only for blur below a threshold ------------------------------------------
def smooth_energy(x, y, blur=0.05):
    return torch.logsumexp(-torch.cdist(x, y) / blur, dim=-1).mean() * blur


def smooth_energy_forked(x, y, blur=0.05):
    value = torch.logsumexp(-torch.cdist(x, y) / blur, dim=-1).mean() * blur
    return value * 1.01 if blur < BLUR_THRESHOLD else value


# --- misbehaviour of a single implementation ------------------------------------------
def noisy_mse(input, target):
    return F.mse_loss(input, target) * (1 + 1e-3 * torch.rand(()))


def mse(input, target):
    return F.mse_loss(input, target)


_reserved = [0]


def out_of_memory_alike(input, target):
    # Fails the same way on every call, but, like a CUDA out-of-memory error, names how
    # much memory was held at that moment, which changes from call to call.
    _reserved[0] += 2
    if input.numel() > 4:
        # torch's own format: plain bytes under 1 KiB, then KiB, MiB, ...
        held = f"{_reserved[0] * 256} bytes" if _reserved[0] * 256 <= 1024 else f"{_reserved[0] / 4:.2f} KiB"
        raise RuntimeError(f"out of memory. Tried to allocate 256.00 TiB; this process has {600 + _reserved[0]:.2f} MiB in use. "
                           f"Of the allocated memory {held} is allocated by PyTorch")
    return F.mse_loss(input, target)


def mse_inplace(input, target):
    value = F.mse_loss(input, target.clone())
    target.data.mul_(0.5)  # the value is right, but the caller's tensor changed under it
    return value


def mse_list_sometimes(input, target):
    value = F.mse_loss(input, target)
    return [value] if input.numel() > 40 else value


def mse_vector(input, target):
    return (input - target) ** 2
