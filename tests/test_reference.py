"""Self-checks of the NumPy references in tests/reference.py (no jaxlrp needed).

The conv matrix is checked against ``jax.lax.conv_general_dilated`` (plain XLA, not the library under test);
the rules against hand-computed values and the identities between them that follow from DESIGN.md section 2
(conservation, Gamma(0) == Epsilon, AlphaBeta(1, 0) == ZPlus, ...)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from tests import reference as ref
except ImportError:  # tests/ on sys.path (pytest rootdir-relative import)
    import reference as ref

jax.config.update("jax_enable_x64", False)


CONV_CASES = {
    # name: (in_spatial, cin, kernel_spatial, cout, kwargs)
    "3x3_pad1": ((6, 7), 3, (3, 3), 4, dict(padding=((1, 1), (1, 1)))),
    "3x3_same_stride2": ((8, 7), 3, (3, 3), 4, dict(padding="SAME", strides=(2, 2))),
    "3x3_valid_stride2": ((9, 8), 2, (3, 3), 3, dict(padding="VALID", strides=(2, 2))),
    "3x3_dil2_same": ((7, 8), 2, (3, 3), 3, dict(padding="SAME", dilation=(2, 2))),
    "asym_pad": ((6, 6), 2, (2, 3), 3, dict(padding=((0, 2), (1, 0)), strides=(1, 2))),
    "grouped": ((5, 6), 4, (3, 3), 6, dict(padding="SAME", feature_group_count=2)),
    "depthwise": ((5, 6), 4, (3, 3), 8, dict(padding="SAME", feature_group_count=4)),
    "1d": ((11,), 3, (4,), 5, dict(padding="SAME", strides=(2,), dilation=(2,))),
}


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_matrix_matches_lax(name):
    in_sp, cin, k_sp, cout, kw = CONV_CASES[name]
    rng = np.random.default_rng(0)
    G = kw.get("feature_group_count", 1)
    K = rng.normal(size=k_sp + (cin // G, cout))
    x = rng.normal(size=(1,) + in_sp + (cin,))
    nd = len(in_sp)
    sp = "HWD"[:nd] if nd > 1 else "W"
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32),
        window_strides=kw.get("strides", (1,) * nd), padding=kw["padding"],
        rhs_dilation=kw.get("dilation"), dimension_numbers=dn, feature_group_count=G,
        precision=jax.lax.Precision.HIGHEST)
    M = ref.conv_matrix(K, in_sp, **kw)
    y_ref = M @ x.reshape(-1)
    assert y_ref.shape == (y.size,)
    np.testing.assert_allclose(np.asarray(y).reshape(-1), y_ref, rtol=1e-5, atol=1e-5)


def test_flat_fan_in_at_borders():
    # 3x3 conv, pad 1, RGB: 27 inside, 18 at an edge, 12 at a corner.
    M = ref.conv_matrix(np.ones((3, 3, 3, 1)), (5, 5), padding=((1, 1), (1, 1)))
    n = M.sum(1).reshape(5, 5)
    assert n[2, 2] == 27 and n[0, 2] == 18 and n[0, 0] == 12 and n[4, 4] == 12
    # dilation 2, SAME: inside 27; at the corner only the taps at offsets 0, +2 per axis -> 4 * 3 = 12.
    M = ref.conv_matrix(np.ones((3, 3, 3, 1)), (7, 7), padding="SAME", dilation=(2, 2))
    n = M.sum(1).reshape(7, 7)
    assert n[3, 3] == 27 and n[0, 0] == 12
    # depthwise: fan-in counts one input channel per tap
    M = ref.conv_matrix(np.ones((3, 3, 1, 4)), (5, 5), padding="SAME", feature_group_count=4)
    assert M.sum(1).reshape(5, 5, 4)[2, 2, 0] == 9


def test_stab():
    np.testing.assert_array_equal(ref.stab(np.array([0.0, 2.0, -2.0]), 0.5), [0.5, 2.5, -2.5])


def test_hand_computed_values():
    W = np.array([[1.0, -2.0], [3.0, 0.5]])
    b = np.array([0.5, -1.0])
    x = np.array([2.0, -1.0])
    R = np.array([1.0, 2.0])
    # z = [1*2 + -2*-1 + .5, 3*2 + .5*-1 - 1] = [4.5, 4.5]
    e = 0.0
    np.testing.assert_allclose(ref.epsilon(W, b, x, R, eps=e),
                               x * (W.T @ (R / 4.5)))
    np.testing.assert_allclose(ref.zero(W, b, x, R), [2 * (1 / 4.5 + 3 * 2 / 4.5), -1 * (-2 / 4.5 + 0.5 * 2 / 4.5)])
    # zplus: W+ = [[1,0],[3,.5]], W- = [[0,-2],[0,0]]; x+ = [2,0], x- = [0,-1]
    # z+ = W+x+ + W-x- + b+ = [2 + 2 + .5, 6 + 0 + 0] = [4.5, 6]
    s = R / np.array([4.5, 6.0])
    exp = np.array([2 * (1 * s[0] + 3 * s[1]), -1 * (-2 * s[0] + 0 * s[1])])
    np.testing.assert_allclose(ref.zplus(W, b, x, R, eps=0.0), exp)
    # zbox: L = -1, H = 3 -> den = Wx - W+L - W-H = [4, 5.5] - [-1, -3.5] - [-6, 0] = [11, 9]
    s = R / np.array([11.0, 9.0])
    exp = x * (W.T @ s) - (-1) * (np.maximum(W, 0).T @ s) - 3 * (np.minimum(W, 0).T @ s)
    np.testing.assert_allclose(ref.zbox(W, b, x, R, low=-1, high=3, eps=0.0), exp)
    # wsquare: W^2 1 + b^2 = [5.25, 10.25]
    s = R / np.array([5.25, 10.25])
    np.testing.assert_allclose(ref.wsquare(W, b, x, R, eps=0.0), (W * W).T @ s)
    np.testing.assert_allclose(ref.flat(W, b, x, R, eps=0.0), [1.5, 1.5])


def _rand_layer(seed, n_in=16, n_out=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_out, n_in)), rng.normal(size=n_out), rng.normal(size=n_in), rng.normal(size=n_out))


@pytest.mark.parametrize("seed", range(5))
def test_rule_identities(seed):
    W, b, x, R = _rand_layer(seed)
    # conservation with zero bias and no stabiliser
    for rule, kw in [(ref.epsilon, {}), (ref.zplus, {}), (ref.alphabeta, {}), (ref.wsquare, {}),
                     (ref.alphabeta, dict(alpha=1.0, beta=0.0))]:
        Rx = rule(W, b, x, R, eps=0.0, zero_bias=True, **kw)
        np.testing.assert_allclose(Rx.sum(), R.sum(), rtol=1e-10, err_msg=rule.__name__)
    np.testing.assert_allclose(ref.zbox(W, b, x, R, low=-3.0, high=3.0, eps=0.0).sum(), R.sum(), rtol=1e-10)
    np.testing.assert_allclose(ref.flat(W, b, x, R, eps=0.0).sum(), R.sum(), rtol=1e-10)
    # the bias absorbs its share: sum R_x = sum R * (z - b) / z for epsilon
    z = W @ x + b
    np.testing.assert_allclose(ref.zero(W, b, x, R).sum(), (R * (z - b) / z).sum(), rtol=1e-10)
    # Gamma(0) == Epsilon, AlphaBeta(1, 0) == ZPlus
    np.testing.assert_allclose(ref.gamma(W, b, x, R, gamma=0.0), ref.epsilon(W, b, x, R), rtol=1e-10)
    np.testing.assert_allclose(ref.alphabeta(W, b, x, R, alpha=1.0, beta=0.0), ref.zplus(W, b, x, R), rtol=1e-10)
    # Gamma conserves per output sign with zero bias: outputs with z > 0 send R * (zu - 0)/zu ...
    Rx = ref.gamma(W, b, x, R, gamma=0.7, eps=0.0, zero_bias=True)
    np.testing.assert_allclose(Rx.sum(), R[(W @ x) != 0].sum(), rtol=1e-10)
    # a large gamma approaches ZPlus on the outputs with z > 0 (and the negative analogue elsewhere)
    zc = W @ x
    Rp = np.where(zc > 0, R, 0.0)
    np.testing.assert_allclose(ref.gamma(W, b, x, Rp, gamma=1e9, eps=0.0, zero_bias=True),
                               ref.zplus(W, b, x, Rp, eps=0.0, zero_bias=True), rtol=1e-6, atol=1e-9)


def test_epsilon_matches_gradient_form():
    # R_x = x * grad_x [ sum_j z_j(x) * c_j ] with c = R / stab(z) held constant  (DESIGN.md gradient form)
    W, b, x, R = _rand_layer(3)
    z = W @ x + b
    c = R / ref.stab(z, 0.1)
    g = jax.grad(lambda xx: jnp.sum((jnp.asarray(W) @ xx + b) * c))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(x * np.asarray(g), ref.epsilon(W, b, x, R, eps=0.1), rtol=1e-5, atol=1e-6)


def test_batched_and_zbox_broadcast():
    rng = np.random.default_rng(1)
    M = ref.conv_matrix(rng.normal(size=(3, 3, 2, 3)), (4, 4), padding="SAME")
    b = ref.conv_bias(rng.normal(size=3), (4, 4))
    X = rng.uniform(-1, 1, size=(2, 4, 4, 2))
    R = rng.normal(size=(2, 4, 4, 3))
    low, high = np.array([-1.5, -2.0]), np.array([1.0, 2.5])
    out = ref.batched(ref.zbox, M, b, X, R, low=low, high=high)
    for i in range(2):
        exp = ref.zbox(M, b, X[i].reshape(-1), R[i].reshape(-1),
                       low=np.broadcast_to(low, (4, 4, 2)).reshape(-1),
                       high=np.broadcast_to(high, (4, 4, 2)).reshape(-1))
        np.testing.assert_allclose(out[i].reshape(-1), exp)
