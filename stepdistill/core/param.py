"""Conversions between the eps, x0 and v parameterisations; done in float64 because alpha_t is tiny near t = T."""

from __future__ import annotations


def x0_from_eps(x_t, eps, alpha, sigma):
    """x0 = (x_t - sigma_t eps) / alpha_t."""
    return (x_t.double() - sigma * eps.double()) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    """eps = (x_t - alpha_t x0) / sigma_t."""
    return (x_t.double() - alpha * x0.double()) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha * eps.double() - sigma * x0.double()


def x0_eps_from_v(x_t, v, alpha, sigma):
    """x0 = alpha_t x_t - sigma_t v and eps = sigma_t x_t + alpha_t v (alpha^2 + sigma^2 = 1)."""
    x_t, v = x_t.double(), v.double()
    return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def x0_eps_from_output(output, x_t, alpha, sigma, prediction_type: str):
    """Read a network output of any prediction type as (x0, eps), both float64."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, output, alpha, sigma), output.double()
    if prediction_type == "sample":
        return output.double(), eps_from_x0(x_t, output, alpha, sigma)
    if prediction_type == "v_prediction":
        return x0_eps_from_v(x_t, output, alpha, sigma)
    if prediction_type == "flow":
        # Rectified-flow velocity v = eps - x0 (alpha = 1 - sigma): x0 = x_t - sigma v, eps = x_t + alpha v.
        x_t, output = x_t.double(), output.double()
        return x_t - sigma * output, x_t + alpha * output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def target_of(x0, eps, alpha, sigma, prediction_type: str):
    """What a network of `prediction_type` regresses on (DDPM eq. 14 for eps; v for v_prediction; x0 for sample)."""
    if prediction_type == "epsilon":
        return eps.double()
    if prediction_type == "sample":
        return x0.double()
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
