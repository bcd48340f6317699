"""Batch normalization over every axis but the last (channels): NHWC conv maps and (N, D) dense inputs.

PyTorch conventions: batch statistics in training (biased variance to normalize, unbiased variance into
the running estimate), running statistics in eval, running = (1 - momentum) * running + momentum * batch.
Shapes: x (..., C), gamma/beta/running_mean/running_var (C,).
"""
from pipeline.nn.backend import get_array_module, parallel_rows


def channel_sum(a):
    """Per-channel sums of a (..., C), shape (C,).

    NumPy reduces a narrow (M, C) array along axis 0 slowly (C-long inner loops), so sum the wide view
    (N, rest) first and fold the (rest // C, C) remainder: same values, about 5x faster.
    """
    c = a.shape[-1]
    if a.ndim > 2:
        return a.reshape(a.shape[0], -1).sum(axis=0).reshape(-1, c).sum(axis=0)
    return a.sum(axis=0)


def channel_dot(a, b):
    """Per-channel sums of a*b for arrays (..., C), without materializing the product on NumPy."""
    xp = get_array_module(a)
    c = a.shape[-1]
    if xp.__name__ != "numpy":
        return channel_sum(a * b)
    if a.ndim > 2:
        return xp.einsum("ij,ij->j", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)).reshape(-1, c).sum(axis=0)
    return xp.einsum("ij,ij->j", a, b)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    """out with x's shape; in training the running statistics are updated in place.

    cache: (centred x (x - mean, x's shape), gamma, invstd (C,), train); in eval (x, running mean)
    stands for the centred x. Keeping x - mean rather than xhat saves a pass; backward folds invstd
    into per-channel factors. Passes run in row blocks on the
    engine's threads, each block's centring and squared sum done while it is in cache.
    """
    xp = get_array_module(x)
    c = x.shape[-1]
    m = x.size // c
    n = x.shape[0]
    dt = x.dtype.type
    if train:
        if m < 2:
            raise ValueError("batch norm in training needs more than one value per channel")
        mean = sum(parallel_rows(lambda rows: channel_sum(x[rows]), n, x)) / dt(m)
        xc = xp.empty_like(x)

        def centre(rows):
            xp.subtract(x[rows], mean, out=xc[rows])
            return channel_dot(xc[rows], xc[rows])

        var = sum(parallel_rows(centre, n, x)) / dt(m)
        invstd = dt(1.0) / xp.sqrt(var + dt(eps))
        running_mean *= dt(1.0 - momentum)
        running_mean += dt(momentum) * mean
        running_var *= dt(1.0 - momentum)
        running_var += dt(momentum * m / (m - 1)) * var
    else:
        # eval: out = x * scale + shift in two passes; x - mean only if a backward asks for it
        invstd = dt(1.0) / xp.sqrt(running_var + dt(eps))
        scale = gamma * invstd
        shift = beta - running_mean * scale
        out = xp.empty_like(x)

        def affine_eval(rows):
            xp.multiply(x[rows], scale, out=out[rows])
            out[rows] += shift

        parallel_rows(affine_eval, n, x)
        return out, ((x, running_mean.copy()), gamma, invstd, train)
    scale = gamma * invstd
    out = xp.empty_like(x)

    def affine(rows):
        xp.multiply(xc[rows], scale, out=out[rows])
        out[rows] += beta

    parallel_rows(affine, n, x)
    return out, (xc, gamma, invstd, train)


def batchnorm_backward(dout, cache):
    """(dx with dout's shape, dgamma (C,), dbeta (C,)).

    Training: dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)), xhat = (x - mean) * invstd.
    """
    xc, gamma, invstd, train = cache
    xp = get_array_module(dout)
    if isinstance(xc, tuple):  # eval forward kept (x, running mean)
        xc = xc[0] - xc[1]
    c = dout.shape[-1]
    m = dout.size // c
    n = dout.shape[0]
    dt = dout.dtype.type
    sums = parallel_rows(lambda rows: (channel_sum(dout[rows]), channel_dot(dout[rows], xc[rows])), n, dout)
    dbeta = sum(part[0] for part in sums)
    dgamma = sum(part[1] for part in sums) * invstd
    scale = gamma * invstd
    k_xc = scale * invstd * dgamma / dt(m)
    k_0 = scale * dbeta / dt(m)
    dx = xp.empty_like(dout)

    def grad(rows):
        xp.multiply(dout[rows], scale, out=dx[rows])
        if train:
            dx[rows] -= xc[rows] * k_xc
            dx[rows] -= k_0

    parallel_rows(grad, n, dout)
    return dx, dgamma, dbeta


def batchnorm_forward_naive(x, gamma, beta, running_mean, running_var, train, momentum=0.1, eps=1e-5):
    """Reference: the textbook formulas channel by channel (updates the running statistics in place)."""
    xp = get_array_module(x)
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    out = xp.empty_like(x2)
    m = x2.shape[0]
    for ch in range(c):
        col = x2[:, ch]
        if train:
            mu = col.sum() / m
            var = ((col - mu) ** 2).sum() / m
            running_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * mu
            running_var[ch] = (1 - momentum) * running_var[ch] + momentum * var * m / (m - 1)
        else:
            mu, var = running_mean[ch], running_var[ch]
        out[:, ch] = gamma[ch] * (col - mu) / xp.sqrt(var + eps) + beta[ch]
    return out.reshape(x.shape), (x, gamma, eps, train, running_mean, running_var)


def batchnorm_backward_naive(dout, cache):
    """Reference gradients through the chain rule written out step by step (CS231n's graph)."""
    x, gamma, eps, train, running_mean, running_var = cache
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    dy = dout.reshape(-1, c)
    m = x2.shape[0]
    if train:
        mu = x2.sum(axis=0) / m
        xc = x2 - mu
        var = (xc ** 2).sum(axis=0) / m
    else:
        mu, var = running_mean, running_var
        xc = x2 - mu
    std = (var + eps) ** 0.5
    xhat = xc / std
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    dxhat = dy * gamma
    if not train:
        return (dxhat / std).reshape(x.shape), dgamma, dbeta
    dxc = dxhat / std
    dstd = -(dxhat * xc).sum(axis=0) / std ** 2
    dvar = 0.5 * dstd / std
    dxc += 2.0 * xc * dvar / m
    dmu = -dxc.sum(axis=0)
    dx = dxc + dmu / m
    return dx.reshape(x.shape), dgamma, dbeta
