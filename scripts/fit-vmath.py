#!/usr/bin/env python3
"""Fits the coefficients of src/model/vmath.rs and prints them as Rust constants.

    python3 -m pip install numpy scipy   # any recent versions
    python3 scripts/fit-vmath.py

erf(x) ~ x P(x^2) / Q(x^2) on [0, CLAMP] (P degree 5, Q degree 5, Q(0) = 1), fitted for the
smallest maximum absolute error by Lawson-reweighted linearised least squares (Loeb's
iteration) on Chebyshev nodes. exp(r) ~ 1 + c1 r + ... + c6 r^6 on [-ln2/2, ln2/2], fitted for
the smallest maximum relative error the same way. The script then evaluates both exactly as
the Rust code does (f32 coefficients, f32 Horner with fused multiply-adds) on a dense grid and
prints the maximum errors that src/model/vmath.rs's tests assert.
"""
import numpy as np
from scipy.special import erf

CLAMP = 3.925  # erf(3.925) = 1 - 8e-9: beyond it erf rounds to 1 in f32




def fit_erf(dp=5, dq=5, iters=30):
    x = np.sort(np.cos(np.linspace(0, np.pi, 6000)) * CLAMP / 2 + CLAMP / 2)
    s, y = x * x, erf(x)
    q_prev, w = np.ones_like(x), np.ones_like(x)
    for _ in range(iters):
        cols = [x * s**i for i in range(dp + 1)] + [-y * s**j for j in range(1, dq + 1)]
        a = np.stack(cols, 1) * (w / q_prev)[:, None]
        sol, *_ = np.linalg.lstsq(a, y * w / q_prev, rcond=None)
        p, q = sol[: dp + 1], np.concatenate([[1.0], sol[dp + 1 :]])
        q_prev = np.polyval(q[::-1], s)
        err = x * np.polyval(p[::-1], s) / q_prev - y
        w = w * np.sqrt(np.abs(err) + 1e-30)
        w /= w.max()
    return p, q


def fit_exp(deg=6, iters=40):
    half_ln2 = np.log(2) / 2
    r = np.cos(np.linspace(0, np.pi, 4000)) * half_ln2
    y = np.exp(r)
    w = np.ones_like(r)
    for _ in range(iters):
        a = np.stack([r**i for i in range(1, deg + 1)], 1) / y[:, None] * w[:, None]
        c, *_ = np.linalg.lstsq(a, (y - 1) / y * w, rcond=None)
        err = (1 + sum(ci * r ** (i + 1) for i, ci in enumerate(c))) / y - 1
        w = w * np.sqrt(np.abs(err) + 1e-30)
        w /= w.max()
    return np.concatenate([[1.0], c])


def f32(v):
    return np.asarray(v, dtype=np.float64).astype(np.float32)


def fma(a, b, c):  # one rounding, as vfmadd
    return f32(a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64))


def horner(coef, s):
    acc = np.full_like(s, f32(coef[-1]))
    for c in coef[-2::-1]:
        acc = fma(acc, s, np.full_like(s, f32(c)))
    return acc


def erf32(p, q, x):
    x = f32(np.clip(x, -CLAMP, CLAMP))
    s = f32(x.astype(np.float64) ** 2)
    return f32(f32(x.astype(np.float64) * horner(p, s)).astype(np.float64) / horner(q, s))


def exp32(c, x):
    x = f32(x)
    n = np.floor(f32(x.astype(np.float64) * f32(1.4426950408889634)).astype(np.float64) + 0.5).astype(np.float32)
    r = fma(n, np.full_like(n, f32(-0.693145751953125)), x)
    r = fma(n, np.full_like(n, f32(-1.428606765330187e-06)), r)
    return f32(horner(c, r).astype(np.float64) * 2.0 ** n.astype(np.float64))


p, q = fit_erf()
c = fit_exp()
xs = np.linspace(-6, 6, 4_000_001)
e_erf = np.abs(erf32(p, q, xs).astype(np.float64) - erf(xs)).max()
xe = np.linspace(-87.3, 88.7, 4_000_001)
e_exp = np.abs(exp32(c, xe).astype(np.float64) / np.exp(f32(xe).astype(np.float64)) - 1).max()
fmt = lambda v: ", ".join(repr(float(f32(t))) for t in v)
print(f"const ERF_CLAMP: f32 = {CLAMP};")
print(f"const ERF_P: [f32; {len(p)}] = [{fmt(p)}];")
print(f"const ERF_Q: [f32; {len(q)}] = [{fmt(q)}];")
print(f"const EXP_C: [f32; {len(c)}] = [{fmt(c)}];")
print(f"// max |erf32 - erf| on [-6, 6]: {e_erf:.3g}; max relative exp32 error on [-87.3, 88.7]: {e_exp:.3g}")
