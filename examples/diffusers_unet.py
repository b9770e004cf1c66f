"""Sample a diffusers UNet2DModel with flowsolve's solvers, through ``fs.adapters.from_diffusers``.

The UNet is tiny and randomly initialised from a config (nothing is downloaded), so its "images" are
noise-like: the point is the plumbing. A trained checkpoint goes the same way:
``UNet2DModel.from_pretrained(...)`` with its ``DDPMScheduler.from_pretrained(...)``.

1. ``from_diffusers(unet, scheduler)`` turns the discrete DDPM schedule into flowsolve's continuous
   ``DiscreteVP`` path (Lu et al. 2022, DPM-Solver, App. D.1) and the UNet's eps output into an eps-model.
2. Agreement: flowsolve's ``ddim`` on the scheduler's own steps (``grid_from_diffusers``) against
   diffusers' ``DDIMScheduler`` loop (Song et al. 2021, eta = 0, no clipping) from the same x_T.
3. Sampling: ``ddim``, ``dpm++2m`` (Lu et al. 2022b), ``unipc3-bh2`` (Zhao et al. 2023) and ``deis``
   on flowsolve's log-SNR grid, side by side in a PNG.

    python examples/diffusers_unet.py            # 32 x 32, 4 images, 10 steps
    python examples/diffusers_unet.py --quick    # CI sizes
    python examples/diffusers_unet.py --steps 20 --out /tmp/unet

Writes ``diffusers_unet.png``, ``diffusers_unet.txt`` and ``diffusers_unet.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import flowsolve as fs  # noqa: E402
from flowsolve.adapters import from_diffusers, grid_from_diffusers  # noqa: E402

SOLVERS = ["ddim", "dpm++2m", "unipc3-bh2", "deis"]


def tiny_unet(sample_size: int, seed: int):
    """A two-level UNet2DModel (about 0.2 M parameters) with random weights, from a config."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
    )
    return unet.eval().requires_grad_(False)


def diffusers_ddim(unet, scheduler, x_T: torch.Tensor) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0): the reference flowsolve's ddim must reproduce."""
    x = x_T.clone()
    for ts in scheduler.timesteps:
        eps = unet(x, ts).sample
        x = scheduler.step(eps, ts, x, eta=0.0).prev_sample
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 10; 4 with --quick)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"),
                    help="output folder (default: examples/output)")
    ap.add_argument("--quick", action="store_true", help="CI sizes: 16 x 16, 2 images, 4 steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (4 if args.quick else 10)
    if steps < 1:
        ap.error(f"--steps={steps} must be >= 1")
    size, batch = (16, 2) if args.quick else (32, 4)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # a tiny UNet: on a small shared CPU extra threads mostly add synchronisation

    from diffusers import DDIMScheduler

    unet = tiny_unet(size, args.seed)
    # clip_sample=False: diffusers' DDIM clips x0 to [-1, 1] by default, which is not the DDIM ODE
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="leading")
    model = from_diffusers(unet, scheduler)  # DiscreteVP path, eps prediction (the config's)
    scheduler.set_timesteps(steps)
    grid = grid_from_diffusers(scheduler)

    x_T = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    x_T = x_T * model.path.sigma(grid[:1]).float()  # the initial state is used as is: scale it yourself
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = diffusers_ddim(unet, scheduler, x_T)
        ref_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours, info = fs.sample(model, x_T, solver="ddim", grid=grid, return_info=True)
        ours_s = time.perf_counter() - t0
        agreement = float((ours - ref).abs().max())
        scale = float(ref.abs().max())
        results = [{"solver": "ddim (diffusers' steps)", "steps": steps, "nfe": info["nfe"], "seconds": ours_s,
                    "max_abs_diff_vs_diffusers_ddim": agreement}]
        images = {"diffusers DDIMScheduler": ref, "flowsolve ddim (same steps)": ours}
        for name in SOLVERS:
            t0 = time.perf_counter()
            x, info = fs.sample(model, x_T, solver=name, steps=steps, grid="logsnr", return_info=True)
            results.append({"solver": name, "grid": "logsnr", "steps": steps, "nfe": info["nfe"],
                            "seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(x).all())})
            images[f"{name} (logsnr, NFE {info['nfe']})"] = x

    summary = {"unet_parameters": sum(p.numel() for p in unet.parameters()), "image_shape": [batch, 3, size, size],
               "scheduler": "DDIMScheduler(linear betas, 1000 steps, clip_sample=False)", "steps": steps,
               "diffusers_ddim_seconds": ref_s, "max_abs_diff_vs_diffusers_ddim": agreement,
               "reference_max_abs": scale, "grid": grid.tolist(), "solvers": results,
               "all_finite": all(bool(torch.isfinite(v).all()) for v in images.values())}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(batch, len(images), figsize=(2.0 * len(images), 2.0 * batch + 0.4), squeeze=False)
    for j, (title, x) in enumerate(images.items()):
        for i in range(batch):
            img = x[i].permute(1, 2, 0)
            img = ((img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)).numpy()  # per-image min-max
            ax = axes[i][j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"random tiny UNet2DModel, {steps} steps; flowsolve ddim vs diffusers DDIM: max |diff| {agreement:.2e}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "diffusers_unet.png"), dpi=100)
    plt.close(fig)

    lines = [f"diffusers UNet2DModel ({summary['unet_parameters']} parameters, random init) {batch}x3x{size}x{size}, "
             f"float32, CPU, torch {torch.__version__}",
             f"flowsolve ddim on the scheduler's {steps} steps vs diffusers DDIMScheduler (eta 0): max |diff| "
             f"{agreement:.3e} (outputs up to {scale:.3g}); {ours_s:.2f} s vs {ref_s:.2f} s",
             f"{'solver':<12} {'grid':<8} {'steps':>5} {'NFE':>4} {'seconds':>8}"]
    lines += [f"{r['solver']:<12} {r['grid']:<8} {r['steps']:>5} {r['nfe']:>4} {r['seconds']:>8.2f}" for r in results[1:]]
    with open(os.path.join(args.out, "diffusers_unet.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "diffusers_unet.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
