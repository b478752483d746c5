"""The two sides of the peer comparison (``peers/peer_diffusers.py``, ``accelerator/check.py``): the
paper's stack (K diffusers ``UNet2DConditionModel`` agents in PyTorch, called one after the
other) and fedinf_jax (stacked agents, one jitted program), on the same model config, random
weights (``from benchmarks.common import peer``)."""

import os

from benchmarks.common import timing


def diffusers_kwargs(model_config) -> dict:
    """``UNet2DConditionModel`` arguments for a ``config.model`` section (the paper's appendix B
    table for the ``paper`` preset). diffusers lists up blocks deepest first and calls the number
    of heads ``attention_head_dim``."""
    kwargs = dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=model_config.layers_per_block,
        block_out_channels=tuple(model_config.block_out_channels),
        cross_attention_dim=model_config.num_classes,
        down_block_types=tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in model_config.attention_levels
        ),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D"
            for a in reversed(model_config.up_attention_levels)
        ),
        norm_num_groups=model_config.norm_groups,
        attention_head_dim=model_config.num_heads,
    )
    if model_config.class_embedding:
        kwargs["num_class_embeds"] = model_config.num_classes
    return kwargs


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after a warm-up call (in which JAX compiles)."""
    return timing.time_calls(fn, repeats)[1]


def torch_side(config, k: int, b: int, steps: int, repeats: int, device: str = "cpu") -> dict:
    """The paper's stack on ``device``: K diffusers U-Nets called one after the other."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    kwargs = diffusers_kwargs(config.model)
    unets = [UNet2DConditionModel(**kwargs).eval().to(device) for _ in range(k)]
    params = sum(p.numel() for p in unets[0].parameters())
    class_labels = config.model.class_embedding
    y = torch.arange(b, device=device) % 10
    context = torch.nn.functional.one_hot(y, 10).float()[:, None, :]
    sigma_min, sigma_max = config.sde.sigma_min, config.sde.sigma_max

    def sigma(t):
        return sigma_min * (sigma_max / sigma_min) ** t

    @torch.no_grad()
    def federated_score(x, t):
        noise_level = torch.full((b,), 999.0 * t, device=device)
        labels = y if class_labels else None
        eps = [u(x, noise_level, context, class_labels=labels).sample for u in unets]
        return -torch.stack(eps).mean(0) / sigma(t)

    x0 = torch.randn(b, 1, 28, 28, device=device)
    result = {"params_per_agent": params}

    def synced(fn):  # CUDA runs asynchronously: a call ends when the device is done
        def call():
            out = fn()
            if device != "cpu":
                torch.cuda.synchronize()
            return out

        return call

    result["score_s"] = _median_time(synced(lambda: federated_score(x0, 0.5)), repeats)

    @torch.no_grad()
    def sample():  # the paper's loop: VE probability-flow ODE, Euler, over steps and agents
        x = x0 * sigma_max
        ts = torch.linspace(1.0, 1e-3, steps + 1)
        for i in range(steps):
            t, dt = float(ts[i]), float(ts[i + 1] - ts[i])
            g2 = 2 * sigma(t) ** 2 * torch.log(torch.tensor(sigma_max / sigma_min))
            x = x - 0.5 * g2 * federated_score(x, t) * dt
        return x

    if steps:
        result["sample_s"] = _median_time(synced(sample), repeats)
    return result


def euler_mean_sampler(lifted, comp, steps: int, num_agents: int | None = None):
    """The fedinf_jax sampler the timed loops run: ``steps`` Euler steps of the probability-flow
    ODE down to t = 1e-3 under the uniform mean of ``lifted``'s agent scores, no denoising
    (``num_agents``: K when the parameters carry padding agents, on a mesh)."""
    from fedinf_jax.data import digits
    from fedinf_jax.sampling import aggregators, federated_sampler, solvers

    spec = solvers.SolverSpec(
        method="ode",
        solver=solvers.make_solver("ode", "euler"),
        num_steps=steps,
        t_end=1e-3,
        denoise=False,
    )
    return federated_sampler.FederatedSampler(
        lifted, comp.sde, aggregators.mean(), spec, digits.IMAGE_SHAPE, num_agents=num_agents
    )


def jax_side(config, k: int, b: int, steps: int, repeats: int) -> dict:
    from benchmarks.common import federated_score
    from fedinf_jax.agents import runs
    from fedinf_jax.sampling import federated_sampler

    comp = runs.resolve(config)
    score = federated_score.build(comp, k, b)
    params, (_, _, y) = score.params, score.args
    first_s, score_s = timing.time_calls(lambda: score().block_until_ready(), repeats)
    result = {
        "params_per_agent": runs.count_params(params) // k,
        "strategy": comp.score_strategy,
        "map_unroll": comp.map_unroll,
        "dtype": config.model.dtype,
        "conv_impl": config.conv_impl,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "score_first_call_s": first_s,  # compiles
        "score_s": score_s,
    }
    if steps:
        sampler = euler_mean_sampler(score.lifted, comp, steps)
        keys = federated_sampler.sample_keys(0, b)
        result["sample_s"] = _median_time(
            lambda: sampler(params, keys, y).images.block_until_ready(), repeats
        )
    return result
