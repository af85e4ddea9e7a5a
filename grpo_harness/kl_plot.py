"""Bias and spread of the k1/k2/k3 KL estimators against the true KL (a PNG and its data).

For each distance factor ``c`` of a sweep, a policy/reference pair of categoricals is built
from fixed random directions, ``pi = softmax(c * z_pi)`` and ``ref = softmax(c * z_ref)``
(``c = 0`` makes them equal), and the estimators' exact bias ``E_pi[k] - KL(pi||ref)`` and
per-token standard deviation ``sqrt(Var_pi[k])`` are computed by enumerating the support (no
sampling noise). The x axis is the true KL. Several random direction pairs are averaged.
"""

from __future__ import annotations

from pathlib import Path


def kl_estimator_sweep(
    distances=None, *, support: int = 10, n_directions: int = 4, seed: int = 0
) -> dict:
    """The plot's data: true KL and, per estimator, exact bias and std (averaged over pairs)."""
    import torch

    from grpo_core import kl_k1, kl_k2, kl_k3

    f64 = torch.float64
    if distances is None:
        distances = [float(x) for x in torch.linspace(0.0, 3.0, 25)]
    gen = torch.Generator().manual_seed(seed)
    dirs = [(torch.randn(support, generator=gen, dtype=f64),
             torch.randn(support, generator=gen, dtype=f64)) for _ in range(n_directions)]
    estimators = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    data = {"distance": list(distances), "true_kl": [],
            **{name: {"bias": [], "std": []} for name in estimators}}
    for c in distances:
        kls, stats = [], {name: ([], []) for name in estimators}
        for z_pi, z_ref in dirs:
            logp = torch.log_softmax(c * z_pi, -1)
            ref = torch.log_softmax(c * z_ref, -1)
            pi = logp.exp()
            kl = float((pi * (logp - ref)).sum())
            kls.append(kl)
            for name, fn in estimators.items():
                vals = fn(logp, ref)
                mean = float((pi * vals).sum())
                stats[name][0].append(mean - kl)
                stats[name][1].append(float((pi * (vals - mean) ** 2).sum()) ** 0.5)
        data["true_kl"].append(sum(kls) / len(kls))
        for name in estimators:
            data[name]["bias"].append(sum(stats[name][0]) / len(kls))
            data[name]["std"].append(sum(stats[name][1]) / len(kls))
    return data


def plot_kl_estimators(path, *, distances=None, support: int = 10, n_directions: int = 4,
                       seed: int = 0) -> dict:
    """Write a PNG of bias and std of k1/k2/k3 against the true KL; return the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = kl_estimator_sweep(distances, support=support, n_directions=n_directions, seed=seed)
    x = data["true_kl"]
    fig, (ax_bias, ax_std) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"k1": "-", "k2": "--", "k3": "-."}
    for name, style in styles.items():
        ax_bias.plot(x, data[name]["bias"], style, label=name)
        ax_std.plot(x, data[name]["std"], style, label=name)
    ax_bias.axhline(0.0, color="grey", linewidth=0.8)
    ax_bias.set(xlabel="true KL(pi || ref) [nats]", ylabel="bias  E[k] - KL",
                title="bias (exact, by enumeration)")
    ax_std.set(xlabel="true KL(pi || ref) [nats]", ylabel="std of one token's estimate",
               title="per-token standard deviation")
    ax_std.set_yscale("symlog", linthresh=1e-2)
    for ax in (ax_bias, ax_std):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"KL estimators on categorical pairs (support {support}, "
                 f"{n_directions} random directions)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return data
