"""Registration error metrics of the ModelNet benchmark.

DCP's six (Wang & Solomon 2019): MSE, RMSE and MAE of the Euler angles (``zyx``, degrees; the
error of each angle is taken separately and averaged over pairs *and* the three angles) and of
the translation vector (averaged over pairs and the three coordinates). Plus the isotropic
rotation error (geodesic angle of ``R_gt^T R_est``, degrees), the translation error
``|t_est - t_gt|``, and the success rate at (1 degree, 0.01).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

SUCCESS_ROT_DEG = 1.0
SUCCESS_TRANS = 0.01


def euler_zyx_deg(R: np.ndarray) -> np.ndarray:
    """``(B, 3, 3)`` rotations -> ``(B, 3)`` angles ``(z, y, x)`` in degrees, as DCP reports them.

    With ``R = Rx @ Ry @ Rz`` the extrinsic ``zyx`` sequence returns ``(az, ay, ax)``.
    """
    return Rotation.from_matrix(np.asarray(R, dtype=np.float64)).as_euler("zyx", degrees=True)


def dcp_metrics(
    R_est: np.ndarray, t_est: np.ndarray, R_gt: np.ndarray, t_gt: np.ndarray
) -> dict[str, float]:
    """DCP's six metrics.

    Args:
        R_est, R_gt: ``(B, 3, 3)``; t_est, t_gt: ``(B, 3)``.
    Returns:
        ``MSE_R, RMSE_R, MAE_R`` (degrees^2 / degrees) and ``MSE_t, RMSE_t, MAE_t`` (units of t).
    """
    dr = euler_zyx_deg(R_est) - euler_zyx_deg(R_gt)
    dt = np.asarray(t_est, np.float64) - np.asarray(t_gt, np.float64)
    mse_r, mse_t = float(np.mean(dr**2)), float(np.mean(dt**2))
    return {
        "MSE_R": mse_r,
        "RMSE_R": float(np.sqrt(mse_r)),
        "MAE_R": float(np.mean(np.abs(dr))),
        "MSE_t": mse_t,
        "RMSE_t": float(np.sqrt(mse_t)),
        "MAE_t": float(np.mean(np.abs(dt))),
    }


def isotropic_errors(
    R_est: np.ndarray, t_est: np.ndarray, R_gt: np.ndarray, t_gt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair rotation error ``arccos((tr(R_gt^T R_est) - 1) / 2)`` (deg) and ``|t_est - t_gt|``.

    Returns two ``(B,)`` arrays.
    """
    R_est, R_gt = np.asarray(R_est, np.float64), np.asarray(R_gt, np.float64)
    # |R_est - R_gt|_F = 2 sqrt(2) sin(angle / 2): the same angle as the arccos of the trace, but
    # well conditioned near 0 (arccos turns float32 round-off of 1e-7 into 0.03 degrees).
    chord = np.linalg.norm(R_est - R_gt, axis=(1, 2)) / (2.0 * np.sqrt(2.0))
    rot = np.degrees(2.0 * np.arcsin(np.clip(chord, 0.0, 1.0)))
    trans = np.linalg.norm(np.asarray(t_est, np.float64) - np.asarray(t_gt, np.float64), axis=-1)
    return rot, trans


def success_rate(
    rot_err_deg: np.ndarray,
    trans_err: np.ndarray,
    max_rot_deg: float = SUCCESS_ROT_DEG,
    max_trans: float = SUCCESS_TRANS,
) -> float:
    """Share of pairs, rotation error < ``max_rot_deg`` and translation < ``max_trans``."""
    ok = (np.asarray(rot_err_deg) < max_rot_deg) & (np.asarray(trans_err) < max_trans)
    return float(ok.mean()) if ok.size else float("nan")


def all_metrics(
    R_est: np.ndarray, t_est: np.ndarray, R_gt: np.ndarray, t_gt: np.ndarray
) -> dict[str, float]:
    """DCP's six plus the isotropic errors (mean and median) and the success rate."""
    out = dcp_metrics(R_est, t_est, R_gt, t_gt)
    rot, trans = isotropic_errors(R_est, t_est, R_gt, t_gt)
    out.update(
        {
            "rot_err_deg_mean": float(rot.mean()),
            "rot_err_deg_median": float(np.median(rot)),
            "trans_err_mean": float(trans.mean()),
            "trans_err_median": float(np.median(trans)),
            "success_rate": success_rate(rot, trans),
        }
    )
    return out
