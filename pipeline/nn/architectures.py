"""Named architectures as plain data: lists of layer-spec dicts, as they would come from TOML.

The final dense layer has 10 units (the digits); build_model sets it to num_classes for a named
architecture, and gives a dense spec without "units" num_classes.
"""


def _conv(filters, kernel, stride=1, padding="valid", bias=True):
    return {"type": "conv2d", "filters": filters, "kernel": kernel, "stride": stride, "padding": padding,
            "bias": bias}


def _conv_bn_relu(filters, kernel, stride=1, padding="valid"):
    """No conv bias: the BatchNorm right after subtracts it again, so its true gradient is 0 and Adam would
    only move it by +-lr on rounding noise (torchvision's ResNets build such convs with bias=False too)."""
    return [_conv(filters, kernel, stride, padding, bias=False), {"type": "batchnorm"}, {"type": "relu"}]


def _conv_relu_bn(filters, kernel, stride=1, padding="valid"):
    """Keras' `Conv2D(..., activation='relu')` then `BatchNormalization()`: the order of Deotte's kernel.
    The bias stays: the ReLU between makes it matter."""
    return [_conv(filters, kernel, stride, padding), {"type": "relu"}, {"type": "batchnorm"}]


def _deotte(block):
    return [
        *block(32, 3), *block(32, 3), *block(32, 5, 2, "same"),
        {"type": "dropout", "rate": 0.4},
        *block(64, 3), *block(64, 3), *block(64, 5, 2, "same"),
        {"type": "dropout", "rate": 0.4},
        *block(128, 4),
        {"type": "flatten"}, {"type": "dropout", "rate": 0.4},
        {"type": "dense", "units": 10},
    ]


SEED_SMALL = [
    _conv(8, 3, padding=1), {"type": "relu"}, {"type": "maxpool", "size": 2},
    _conv(16, 3, padding=1), {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 128}, {"type": "relu"},
    {"type": "dense", "units": 10},
]

LENET5 = [
    _conv(6, 5, padding=2), {"type": "relu"}, {"type": "maxpool", "size": 2},
    _conv(16, 5), {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 120}, {"type": "relu"},
    {"type": "dense", "units": 84}, {"type": "relu"},
    {"type": "dense", "units": 10},
]

# Chris Deotte's Kaggle MNIST net: 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4 -> 1, BatchNorm before ReLU
DEOTTE = _deotte(_conv_bn_relu)
# The same net in the order of Deotte's own kernel: ReLU, then BatchNorm
DEOTTE_RELU_BN = _deotte(_conv_relu_bn)

# The `quick` preset's net: BatchNorm lets two small conv blocks pass 99 % in a few epochs.
SMALL_BN = [
    *_conv_bn_relu(16, 3, padding=1), {"type": "maxpool", "size": 2},
    *_conv_bn_relu(32, 3, padding=1), {"type": "maxpool", "size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 128}, {"type": "relu"},
    {"type": "dense", "units": 10},
]

ARCHITECTURES = {
    "seed_small": SEED_SMALL,
    "lenet5": LENET5,
    "deotte": DEOTTE,
    "deotte_relu_bn": DEOTTE_RELU_BN,
    "small_bn": SMALL_BN,
}
