"""Low-rank factorizations: EoRA error compensation and plain truncated SVD.

EoRA (Liu et al., 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation"): the compression error ΔW = W − Ŵ matters only through
its effect on real inputs, ‖ΔW Xᵀ‖. With the input covariance XᵀX = Q Λ Qᵀ, projecting the
error into the eigenspace scaled by √Λ, ΔW' = ΔW Q √Λ, turns that weighted norm into a plain
Frobenius norm, so the truncated SVD of ΔW' is the best rank-r fit for the weighted error.
Projecting back: B = U_r Σ_r, A = V_rᵀ Λ^{-1/2} Qᵀ, and ΔW ≈ B A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankFactors:
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def weighted_error(delta: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖Δ Xᵀ‖²_F / n expressed through the covariance: trace(Δ C Δᵀ)."""
    delta = delta.double()
    return float(torch.einsum("oi,ij,oj->", delta, covariance.double(), delta))


def eora_factors(delta: torch.Tensor, covariance: torch.Tensor, rank: int, eigen_floor: float = 1e-6) -> LowRankFactors:
    """The rank-`rank` B A minimizing trace((Δ − BA) C (Δ − BA)ᵀ) for input covariance C.

    Eigenvalues below ``eigen_floor × max eigenvalue`` (directions the inputs never take) are
    raised to that floor so the back projection stays finite.
    """
    delta = delta.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    floor = eigen_floor * max(float(eigenvalues.max()), 1e-12)
    root = eigenvalues.clamp_min(floor).sqrt()
    projected = (delta @ eigenvectors) * root  # ΔW Q √Λ
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = (vh[:rank] / root) @ eigenvectors.T  # V_rᵀ Λ^{-1/2} Qᵀ
    return LowRankFactors(a=a.float(), b=b.float())


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` of the squared total."""
    squares = singular_values.double().square()
    cumulative = squares.cumsum(0) / squares.sum().clamp_min(1e-300)
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1


def svd_factors(weight: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> LowRankFactors:
    """Truncated SVD W ≈ B A with the singular values split evenly (B = U√Σ, A = √Σ Vᵀ)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    if rank is None:
        rank = min(rank_for_energy(s, energy), s.numel())
    root = s[:rank].sqrt()
    return LowRankFactors(a=(root[:, None] * vh[:rank]).float(), b=(u[:, :rank] * root).float())


def shrinks(in_features: int, out_features: int, rank: int) -> bool:
    """Whether two factors of this rank hold fewer numbers than the dense matrix."""
    return rank * (in_features + out_features) < in_features * out_features
