"""The constants of the Philox Gaussian generator (ops/philox.py), shared by the numba kernel and the
pure-torch fallback: both must use exactly these values for their numbers to be bit-identical."""
COUNTERS = 1024  # counters per group
GROUP = 4 * COUNTERS  # numbers per group
_M32 = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85  # Philox4x32 key increments
_ROUNDS = 10
_U24 = 5.9604644775390625e-08  # 2^-24
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135
# Series coefficients as fp32 (both implementations use exactly these values).
_LOG_C = (1 / 3, 0.2, 1 / 7, 1 / 9)
_SIN_C = (1 / 6, 1 / 120, 1 / 5040, 1 / 362880, 1 / 39916800, 1 / 6227020800)
_COS_C = (0.5, 1 / 24, 1 / 720, 1 / 40320, 1 / 3628800, 1 / 479001600)
