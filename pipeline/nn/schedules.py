"""Learning-rate schedules: a callable global_step -> lr (a Python float).

  constant      base_lr
  step          base_lr * lr_decay ** (epoch // step_epochs)
  exponential   base_lr * lr_decay ** epoch                    (epoch = global_step // steps_per_epoch)
  cosine        linear warm-up over warmup_epochs to base_lr, then half a cosine down to 0 at the end
  onecycle      PyTorch's OneCycleLR (cosine annealing): base_lr/25 -> base_lr over the first
                warmup_epochs (30 % of training when 0), then down to base_lr/25/1e4 at the last step
Steps past the end keep the last value.
"""
import math

from pipeline.nn.errors import EngineError

SCHEDULES = ("constant", "step", "exponential", "cosine", "onecycle")


def _annealing_cos(start, end, pct):
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def make_schedule(name, base_lr, epochs, steps_per_epoch, lr_decay=0.95, step_epochs=10, warmup_epochs=0.0):
    """lr(global_step) for the schedule `name` (see the module docstring)."""
    name = str(name).lower()
    if name not in SCHEDULES:
        raise EngineError(f"unknown schedule '{name}' (known: {', '.join(SCHEDULES)})")
    base_lr, steps_per_epoch = float(base_lr), max(int(steps_per_epoch), 1)
    total = max(int(epochs) * steps_per_epoch, 1)
    warmup = int(round(float(warmup_epochs) * steps_per_epoch))

    if name == "constant":
        return lambda step: base_lr
    if name == "step":
        every = max(int(step_epochs), 1)
        return lambda step: base_lr * lr_decay ** ((int(step) // steps_per_epoch) // every)
    if name == "exponential":
        return lambda step: base_lr * lr_decay ** (int(step) // steps_per_epoch)
    if name == "cosine":
        def cosine(step):
            step = int(step)
            if step < warmup:
                return base_lr * (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
        return cosine

    # onecycle, as torch.optim.lr_scheduler.OneCycleLR(max_lr=base_lr, total_steps=total)
    pct_start = float(warmup_epochs) / epochs if warmup_epochs and epochs else 0.3
    initial, peak = base_lr / 25.0, base_lr
    final = initial / 1e4
    phase1_end = float(pct_start * total) - 1.0
    phase2_end = float(total - 1)

    def onecycle(step):
        step = min(int(step), total - 1)
        if step <= phase1_end:
            return _annealing_cos(initial, peak, step / phase1_end if phase1_end > 0 else 1.0)
        span = phase2_end - phase1_end
        return _annealing_cos(peak, final, (step - phase1_end) / span if span > 0 else 1.0)
    return onecycle
