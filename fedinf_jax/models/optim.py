"""The optimiser every model here trains with (the agents and the evaluation classifier):
per-agent gradient clipping, AdamW on a warm-up + cosine schedule, and the EMA's decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(train_config) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` then cosine decay to ``end_lr_factor`` x it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
        end_value=train_config.learning_rate * train_config.end_lr_factor,
    )


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Per-agent gradient clipping (global norm), then AdamW on the warm-up + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(make_schedule(train_config), weight_decay=train_config.weight_decay),
    )


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay min(decay, (1 + step) / (10 + step)): short runs still average recent weights."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
