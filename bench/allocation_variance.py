"""Variance of the policy-gradient estimate under uniform, reference and neyman rollout allocation.

Model (docs/ALGORITHM.md §1). A step uses N prompts; prompt i gets n_i responses, correctness c_ij ~ Bernoulli(p_i),
and the batch gradient is the mean over prompts of the per-prompt mean of per-sample gradient signals (c_ij − p_i)·u_i,
with u_i a unit gradient direction. The per-sample variance is σ_i² = p_i(1 − p_i), so

    Var(batch gradient) = (1/N²) Σ_i σ_i² / n_i.

docs/ALGORITHM.md §1 minimises this quantity under Σ n_i = B (its minimiser is n_i ∝ σ_i, Neyman); the constant 1/N²
cancels in every ratio reported, so the script computes V(n) = Σ_i p_i(1 − p_i) / n_i and reports V/V_uniform.
Allocations come from `buffer.allocation.allocate_rollouts` driven by `prompt_priority` of a simulated history
(G draws of Bernoulli(p_i) per prompt), so the numbers include the estimation error of the priorities; the "oracle"
rows feed the same procedure the true p_i, and "bound" is the best any allocation within [n_min, n_max] can do
(continuous Neyman water-filling on the true σ_i).

Distributions of p_i: Beta(0.5, 0.5); a heavy-tailed mix (45% ~ Beta(0.1, 2): nearly always wrong, 45% ~
Beta(2, 0.1): nearly always right, 10% ~ Uniform(0.2, 0.8)); and, with --snapshot PATH, the plug-in success rates
k/G of the prompts in a buffer snapshot (buffer/state.py msgpack, or JSON {"prompts": [{"G": .., "k": ..}, ...]}).

--monte-carlo repeats the comparison with the variance of actual per-sequence gradients of a tiny random
LlamaForCausalLM (vocab 64, hidden 32, 2 layers) on synthetic prompts whose p_i are known exactly.

Run:
    python bench/allocation_variance.py                      # closed form, Beta(0.5,0.5) and heavy-tailed mix
    python bench/allocation_variance.py --snapshot runs/x/buffer_snapshot.msgpack --monte-carlo
    python bench/allocation_variance.py --quick              # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffer.allocation import allocate_rollouts, prompt_priority  # noqa: E402

METHODS = ("reference", "neyman", "oracle_reference", "oracle_neyman", "bound")
ORACLE_HISTORY = 1e6
"""Pseudo-count for the oracle: prompt_priority(G, p·G) with G this large is p(1 − p) up to 1e-6."""


def batch_gradient_variance(p: np.ndarray, n: np.ndarray) -> float:
    """Σ_i p_i(1 − p_i)/n_i: the batch-gradient variance of the Bernoulli model, without the constant 1/N²."""
    return float(np.sum(p * (1.0 - p) / np.asarray(n, dtype=float)))


def uniform_allocation(n_prompts: int, budget: int) -> np.ndarray:
    base, extra = divmod(budget, n_prompts)
    return np.array([base + (1 if i < extra else 0) for i in range(n_prompts)])


def neyman_bound(sigma: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Continuous minimiser of Σ σ_i²/n_i s.t. Σ n_i = budget, n_min <= n_i <= n_max: n_i = clip(c·σ_i).

    The water level c is found by bisection (Σ clip(c·σ) grows monotonically in c). All-zero σ: uniform.
    """
    if not np.any(sigma > 0):
        return np.full(len(sigma), budget / len(sigma))
    lo, hi = 0.0, n_max / sigma[sigma > 0].min()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.clip(mid * sigma, n_min, n_max).sum() < budget:
            lo = mid
        else:
            hi = mid
    return np.clip(hi * sigma, n_min, n_max)


def draw_success_probs(dist: str, n_prompts: int, rng: np.random.Generator,
                       snapshot_p: np.ndarray | None = None) -> np.ndarray:
    """p_i for one prompt set. "snapshot" resamples the snapshot's k/G with replacement."""
    if dist == "beta_0.5_0.5":
        return rng.beta(0.5, 0.5, n_prompts)
    if dist == "heavy_tail_mix":
        kind = rng.choice(3, size=n_prompts, p=[0.45, 0.45, 0.10])
        return np.where(kind == 0, rng.beta(0.1, 2.0, n_prompts),
                        np.where(kind == 1, rng.beta(2.0, 0.1, n_prompts), rng.uniform(0.2, 0.8, n_prompts)))
    if dist == "snapshot":
        return rng.choice(snapshot_p, size=n_prompts, replace=True)
    raise ValueError(f"unknown distribution {dist!r}")


def allocation_for(method: str, p: np.ndarray, history: int, rng: np.random.Generator, budget: int, n_min: int,
                   n_max: int) -> np.ndarray:
    """n_i of one method. Estimated priorities come from `history` Bernoulli(p_i) draws per prompt."""
    if method == "bound":
        return neyman_bound(np.sqrt(p * (1.0 - p)), budget, n_min, n_max)
    if method.startswith("oracle_"):
        counts = [ORACLE_HISTORY] * len(p)
        priorities = [prompt_priority(ORACLE_HISTORY, ORACLE_HISTORY * x) for x in p]
        mode = method.removeprefix("oracle_")
    else:
        counts = [history] * len(p)
        priorities = [prompt_priority(history, int(k)) for k in rng.binomial(history, p)]
        mode = method
    # initial_budget = n_min: a history of >= n_min responses needs no exploration top-up (ALGORITHM.md §1 step 2).
    return np.array(allocate_rollouts(counts, priorities, budget, n_min, n_max, n_min, mode=mode))


def variance_ratios(p: np.ndarray, history: int, rng: np.random.Generator, n_mean: int, n_min: int,
                    n_max: int) -> dict[str, float]:
    """V(method)/V(uniform) for one prompt set (NaN when every prompt has zero variance)."""
    budget = n_mean * len(p)
    v_uniform = batch_gradient_variance(p, uniform_allocation(len(p), budget))
    if v_uniform == 0:
        return {m: float("nan") for m in METHODS}
    return {m: batch_gradient_variance(p, allocation_for(m, p, history, rng, budget, n_min, n_max)) / v_uniform
            for m in METHODS}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and a normal 95% confidence interval of the mean over independent repeats."""
    x = np.asarray([v for v in values if np.isfinite(v)])
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def run_distribution(dist: str, history: int, repeats: int, seed: int, n_prompts: int, n_mean: int, n_min: int,
                     n_max: int, snapshot_p: np.ndarray | None = None) -> dict[str, tuple[float, float, float]]:
    """Repeat (draw a prompt set, draw histories, allocate) `repeats` times; mean and CI of each ratio."""
    rng = np.random.default_rng(seed)
    rows = [variance_ratios(draw_success_probs(dist, n_prompts, rng, snapshot_p), history, rng, n_mean, n_min,
                            n_max) for _ in range(repeats)]
    return {m: mean_ci([r[m] for r in rows]) for m in METHODS}


_COUNT_KEYS = (("total_samples", "total_correct"), ("samples", "correct"), ("G", "k"),
               ("sample_count", "correct_count"))
"""Per-prompt (G, k) field names tried in order; the buffer's undecayed totals come first."""


def _prompt_records(obj) -> list[dict]:
    """Every dict in the decoded document that carries one of the (G, k) field pairs (searched depth-first)."""
    if isinstance(obj, dict):
        if any(g in obj and k in obj for g, k in _COUNT_KEYS):
            return [obj]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return []
    return [rec for child in children for rec in _prompt_records(child)]


def load_snapshot_success(path: Path) -> np.ndarray:
    """Plug-in success rates k/G of the prompts with G > 0, from a buffer snapshot (msgpack) or a JSON file."""
    data = path.read_bytes()
    if path.suffix == ".json":
        doc = json.loads(data)
    else:
        import msgspec

        doc = msgspec.msgpack.decode(data)
    rates = []
    for rec in _prompt_records(doc):
        g_key, k_key = next((g, k) for g, k in _COUNT_KEYS if g in rec and k in rec)
        if rec[g_key] > 0:
            rates.append(rec[k_key] / rec[g_key])
    if not rates:
        raise ValueError(f"{path}: no per-prompt (G, k) with G > 0 found (looked for {_COUNT_KEYS})")
    return np.clip(np.asarray(rates, dtype=float), 0.0, 1.0)


# --------------------------------------------------------------------------- Monte Carlo on a tiny model


def tiny_model(seed: int):
    """Random LlamaForCausalLM, vocab 64, hidden 32, 2 layers: small enough for thousands of per-sample grads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      attn_implementation="eager")  # eager attention batches under vmap; SDPA falls back to a loop
    return LlamaForCausalLM(cfg).eval()


def synthetic_prompts(model, n_prompts: int, prompt_len: int, rng: np.random.Generator):
    """Random prompts; "correct" = first response token in a set S_i chosen so that p_i = π(S_i | prompt) spreads
    over [0, 1] (targets ~ Beta(0.5, 0.5)). p_i is then known exactly from the model's first-token distribution."""
    import torch

    prompts = torch.as_tensor(rng.integers(0, 64, size=(n_prompts, prompt_len)))
    with torch.no_grad():
        first = torch.softmax(model(prompts).logits[:, -1].double(), dim=-1).numpy()  # [N, V]
    correct_sets, p = np.zeros((n_prompts, 64), dtype=bool), np.zeros(n_prompts)
    for i, target in enumerate(rng.beta(0.5, 0.5, n_prompts)):
        order = rng.permutation(64)
        take = int(np.searchsorted(np.cumsum(first[i, order]), target))
        correct_sets[i, order[:take]] = True
        p[i] = first[i, correct_sets[i]].sum()
    return prompts, torch.as_tensor(correct_sets), p


def per_sample_gradients(model, prompts, correct_sets, p, prompt_ids, response_len: int, gen):
    """Sample one response per entry of `prompt_ids`; return flattened (c − p)·∇ log π(response) [S, P] and c."""
    import torch
    from torch.func import functional_call, grad, vmap

    seq = _sample(model, prompts[prompt_ids], response_len, gen)  # [S, prompt_len + T]
    plen = prompts.shape[1]
    correct = correct_sets[prompt_ids, seq[:, plen]].double()
    weight = correct - torch.as_tensor(p)[prompt_ids]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def weighted_logprob(prm, tokens, w):
        logits = functional_call(model, prm, (tokens[None],)).logits[0, plen - 1:-1]  # [T, V]
        return w * torch.log_softmax(logits, -1).gather(-1, tokens[plen:, None]).sum()

    grads = vmap(grad(weighted_logprob), in_dims=(None, 0, 0))(params, seq, weight.float())
    return torch.cat([g.reshape(len(seq), -1) for g in grads.values()], dim=1).double(), correct


def _sample(model, prompts, response_len: int, gen):
    """Ancestral sampling at temperature 1 with an explicit generator (reproducible, no KV cache needed)."""
    import torch

    seq = prompts
    with torch.no_grad():
        for _ in range(response_len):
            probs = torch.softmax(model(seq).logits[:, -1].double(), dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return seq


def gradient_variances(model, prompts, correct_sets, p, samples: int, response_len: int, seed: int) -> np.ndarray:
    """Unbiased trace of the per-sample gradient covariance of each prompt, from `samples` sampled responses."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = np.zeros(len(p))
    for i in range(len(p)):
        g, _ = per_sample_gradients(model, prompts, correct_sets, p, torch.full((samples,), i), response_len, gen)
        mean_sq = float((g * g).sum(dim=1).mean())
        out[i] = samples / (samples - 1) * (mean_sq - float((g.mean(dim=0) ** 2).sum()))
    return out


def monte_carlo(n_prompts: int, samples: int, repeats: int, history: int, seed: int, n_mean: int, n_min: int,
                n_max: int) -> dict:
    """Allocations from Bernoulli priorities, judged by the tiny model's actual gradient variance Σ σ̂_i²/n_i."""
    rng = np.random.default_rng(seed)
    model = tiny_model(seed)
    prompts, correct_sets, p = synthetic_prompts(model, n_prompts, 6, rng)
    sigma_sq = gradient_variances(model, prompts, correct_sets, p, samples, 4, seed)
    budget = n_mean * n_prompts
    v_uniform = float(np.sum(sigma_sq / uniform_allocation(n_prompts, budget)))
    rows = []
    for _ in range(repeats):
        row = {m: float(np.sum(sigma_sq / allocation_for(m, p, history, rng, budget, n_min, n_max))) / v_uniform
               for m in METHODS if m != "bound"}
        row["bound"] = float(np.sum(sigma_sq / neyman_bound(np.sqrt(sigma_sq), budget, n_min, n_max))) / v_uniform
        rows.append(row)
    proxy = p * (1 - p)
    return {"n_prompts": n_prompts, "samples_per_prompt": samples, "p": p.tolist(), "sigma_sq": sigma_sq.tolist(),
            "corr_sigma_sq_vs_bernoulli": float(np.corrcoef(sigma_sq, proxy)[0, 1]),
            "ratios": {m: mean_ci([r[m] for r in rows]) for m in METHODS}}


# --------------------------------------------------------------------------------------------- report


def plot_ratios(table: dict[str, dict], path: Path) -> None:
    """Grouped bars of V/V_uniform with 95% CIs, one group per distribution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        means = [table[d][method][0] for d in table]
        errs = [[table[d][method][0] - table[d][method][1] for d in table],
                [table[d][method][2] - table[d][method][0] for d in table]]
        ax.bar(np.arange(len(table)) + (j - (len(METHODS) - 1) / 2) * width, means, width, yerr=errs, label=method)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(table)), list(table), fontsize=8)
    ax.set(ylabel="gradient variance / uniform", title="Batch-gradient variance at equal budget (lower is better)")
    ax.legend(fontsize=8, ncol=len(METHODS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshot", type=Path, help="buffer snapshot (msgpack) or JSON {'prompts': [{'G','k'}]}")
    ap.add_argument("--histories", type=int, nargs="+", default=[8, 16, 64], help="G of the simulated histories")
    ap.add_argument("--repeats", type=int, default=200, help="independent prompt sets + histories per cell")
    ap.add_argument("--prompts", type=int, default=512, help="N prompts per step (paper: 512)")
    ap.add_argument("--n-mean", type=int, default=16)
    ap.add_argument("--n-min", type=int, default=8)
    ap.add_argument("--n-max", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--monte-carlo", action="store_true", help="also judge allocations by a tiny model's gradients")
    ap.add_argument("--quick", action="store_true", help="30 repeats, one history size, small Monte Carlo")
    ap.add_argument("--img", type=Path, default=Path("docs/img/allocation_variance.png"))
    ap.add_argument("--json-out", type=Path, help="write every number here as JSON")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.histories = 30, [16]
    dists = {"beta_0.5_0.5": None, "heavy_tail_mix": None}
    if args.snapshot:
        dists["snapshot"] = load_snapshot_success(args.snapshot)
        print(f"snapshot: {len(dists['snapshot'])} prompts with history, mean success {dists['snapshot'].mean():.3f}")
    table = {}
    for dist, snap in dists.items():
        for history in args.histories:
            table[f"{dist} G={history}"] = run_distribution(dist, history, args.repeats, args.seed, args.prompts,
                                                            args.n_mean, args.n_min, args.n_max, snap)
    print(f"V/V_uniform, mean [95% CI] over {args.repeats} repeats; N={args.prompts}, n_mean={args.n_mean}, "
          f"bounds [{args.n_min}, {args.n_max}]")
    for name, row in table.items():
        print(f"  {name:24s} " + "  ".join(f"{m} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for m, v in row.items()))
    plot_ratios(table, args.img)
    print(f"wrote {args.img}")
    report = {"closed_form": table}
    if args.monte_carlo:
        n_prompts, samples = (8, 16) if args.quick else (24, 32)
        # Bounds scaled down with the budget (paper 16 in [8, 24] -> 8 in [4, 12]) to keep the model run short.
        mc = monte_carlo(n_prompts, samples, args.repeats, 16, args.seed, 8, 4, 12)
        report["monte_carlo"] = mc
        print(f"Monte Carlo (tiny Llama, {n_prompts} prompts x {samples} sampled responses, n_mean 8 in [4, 12], "
              f"G=16): corr(σ̂², p(1-p)) = {mc['corr_sigma_sq_vs_bernoulli']:.3f}")
        print("  " + "  ".join(f"{m} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for m, v in mc["ratios"].items()))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
