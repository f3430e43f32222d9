"""What trains at which step size: the AdamW parameter groups of a model and the learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def make_optimizer(model: nn.Module, lr: float, head_lr: float, text_lr: float,
                   weight_decay: float) -> torch.optim.AdamW:
    """AdamW over what trains: the heads and the temperature at head_lr (--head_lr), the image tower at lr
    (--lr), the text tower at text_lr (--text_lr, default --lr: a pretrained transformer layer wants a smaller
    step than a CNN block; MiniLM's last layer collapsed at the bench's 3e-4). Matrices decay; biases, norms
    and the temperature do not (decaying them only hurts)."""
    heads, towers, no_decay, text, text_no_decay = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("text_tower."):
            (text if p.ndim >= 2 else text_no_decay).append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        elif name.startswith(("image_head", "text_head")):
            heads.append(p)
        else:
            towers.append(p)
    groups = [{"params": heads, "lr": head_lr, "weight_decay": weight_decay},
              {"params": towers, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": head_lr, "weight_decay": 0.0},
              {"params": text, "lr": text_lr, "weight_decay": weight_decay},
              {"params": text_no_decay, "lr": text_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
